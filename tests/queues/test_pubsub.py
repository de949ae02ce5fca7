"""Pub/Sub backend against the real emulator: credential sources, discovery, leases, attempts, set-aside.

The shared contract (tests/queues/test_contract.py) covers claim/ack/nack/release/wait; these are the
Pub/Sub-specific parts: which subscriptions a ``--certs-dir`` file makes us serve, what happens to names that
exist in two projects, the lease being renewed past the subscription's own ack deadline, runner-local attempt
counts on subscriptions without a dead-letter policy, and that nothing of ours outlives ``aclose``.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from pathlib import Path

import pytest
import trio
from support.pubsub_emulator import NEEDS, PubSubEmulator, pubsub_emulator_fixture  # noqa: F401

from studio_runner.errors import ConfigError
from studio_runner.queues.pubsub import ORIGIN_ATTR, REASON_ATTR, PubSubDelivery, PubSubQueue
from studio_runner.queues.pubsub_sources import read_credential

pytestmark = pytest.mark.expected_skip(NEEDS)


def project() -> str:
    return f"proj-{uuid.uuid4().hex[:8]}"


def credential(folder: Path, name: str, project_id: str) -> Path:
    """For the emulator a JSON naming the project is enough (it ignores credentials)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps({"type": "service_account", "project_id": project_id}))
    return path


async def receive_soon(backend: PubSubQueue, queue: str, timeout: float = 10.0) -> PubSubDelivery:
    with trio.fail_after(timeout):
        while (delivery := await backend.receive(queue)) is None:
            await trio.sleep(0.1)
    return delivery


def test_certs_dir_files_are_sources_added_and_removed_at_rescan(pubsub_emulator: PubSubEmulator,
                                                                 tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    em = pubsub_emulator
    p1, p2 = project(), project()
    a, b, both = em.unique(), em.unique(), em.unique()
    em.create(a, project=p1)
    em.create(b, project=p2)
    em.create(both, project=p1)
    em.create(both, project=p2)
    em.create(a + "_set_aside", project=p1, dead_letter=False)  # ours: never served
    certs = tmp_path / "certs"
    credential(certs, "1-first.json", p1)
    (certs / ".hidden.json").write_text(json.dumps({"project_id": p2}))
    (certs / "broken.json").write_text("{not json")
    (certs / "subfolder").mkdir()
    em.publish(both, b'{"from": "p2"}', project=p2)
    em.publish(both, b'{"from": "p1"}', project=p1)

    async def main() -> None:
        async with PubSubQueue(certs_dir=certs) as backend:
            with caplog.at_level(logging.WARNING, logger="studio_runner.queues.pubsub"):
                names = await backend.discover()
            assert a in names and both in names and b not in names
            assert a + "_set_aside" not in names
            assert "broken.json" in caplog.text and "{not json" not in caplog.text

            credential(certs, "2-second.json", p2)
            with caplog.at_level(logging.WARNING, logger="studio_runner.queues.pubsub"):
                names = await backend.discover()
            assert {a, b, both} <= set(names) and names.count(both) == 1
            assert f"subscription {both} exists in projects {p1} and {p2}" in caplog.text
            d = await receive_soon(backend, both)  # served from the file listed first
            assert d.body == b'{"from": "p1"}' and d.subscription.startswith(f"projects/{p1}/")
            await d.ack()

            (certs / "1-first.json").unlink()
            names = await backend.discover()
            assert a not in names and {b, both} <= set(names)
            d = await receive_soon(backend, both)  # now the only owner is p2
            assert d.body == b'{"from": "p2"}'
            await d.ack()

    trio.run(main)


def test_the_lease_outlives_the_subscriptions_ack_deadline_while_renewed(
        pubsub_emulator: PubSubEmulator) -> None:
    em = pubsub_emulator
    name = em.unique()
    em.create(name, ack_deadline=10)
    em.publish(name, b'{"n": 1}')

    async def main() -> None:
        async with PubSubQueue(project=em.project, lease=10) as runner, \
                PubSubQueue(project=em.project, lease=10) as other:
            d = await receive_soon(runner, name)
            for _ in range(3):  # 15 s in all, past the 10 s deadline, renewed every 5 s
                await trio.sleep(5)
                await d.keep_alive()
                assert await other.receive(name) is None
            assert not d.lost.is_set()
            await d.ack()
            await trio.sleep(11)  # an ack that did not take would show as a redelivery by now
            assert await other.receive(name) is None

    trio.run(main)


def test_without_a_dead_letter_policy_attempts_are_counted_by_this_runner_only(
        pubsub_emulator: PubSubEmulator) -> None:
    em = pubsub_emulator
    name = em.unique()
    em.create(name, dead_letter=False)
    em.publish(name, b'{"n": 1}')

    async def main() -> None:
        async with PubSubQueue(project=em.project) as first:
            seen = []
            for settle in ("nack", "release", "nack"):
                d = await receive_soon(first, name)
                seen.append(d.attempt)
                await getattr(d, settle)()
            assert seen == [1, 2, 2]
        async with PubSubQueue(project=em.project) as second:
            d = await receive_soon(second, name)
            assert d.attempt == 1  # documented: nothing tells another runner about earlier attempts
            await d.ack()

    trio.run(main)


def test_set_aside_keeps_the_body_attributes_and_reason_on_its_own_topic(
        pubsub_emulator: PubSubEmulator) -> None:
    em = pubsub_emulator
    name = em.unique()
    em.create(name)
    em.publish(name, b'{"bad": true}', origin="client")

    async def main() -> None:
        async with PubSubQueue(project=em.project) as backend:
            d = await receive_soon(backend, name)
            await d.set_aside("malformed: no experiment")
            assert await backend.receive(name) is None
            assert name + "_set_aside" not in await backend.discover()

    trio.run(main)
    [kept] = em.pull_all(name + "_set_aside")
    assert bytes(kept.data) == b'{"bad": true}'
    assert kept.attributes[REASON_ATTR] == "malformed: no experiment"
    assert kept.attributes[ORIGIN_ATTR] == em.subscription(name)
    assert kept.attributes["origin"] == "client"
    assert em.pull_all(name) == []


def test_aclose_leaves_no_thread_and_hands_held_messages_back(pubsub_emulator: PubSubEmulator) -> None:
    em = pubsub_emulator
    names = [em.unique() for _ in range(3)]
    for name in names:
        em.create(name, dead_letter=False)  # attempts counted by the runner: the hold leaves no trace

    async def main() -> None:
        backend = PubSubQueue(project=em.project, watch_window=30)
        await backend.start()
        em.publish(names[0], b'{"n": 0}')
        await backend.wait_for_work(names, 5)  # a hold on names[0], long pulls on the other two
        assert any(t.name.startswith("pubsub-") for t in threading.enumerate())
        with trio.fail_after(10):  # closing the channel ends the 30 s pulls at once
            await backend.aclose()
        assert not [t.name for t in threading.enumerate() if t.name.startswith("pubsub-")]
        async with PubSubQueue(project=em.project) as other:
            d = await receive_soon(other, names[0], timeout=3)  # given back at close, not at its deadline
            assert d.attempt == 1
            await d.ack()

    trio.run(main)


def test_a_deleted_subscription_neither_breaks_nor_spins_the_wait(pubsub_emulator: PubSubEmulator) -> None:
    em = pubsub_emulator
    name = em.unique()
    em.create(name)

    async def main() -> None:
        async with PubSubQueue(project=em.project) as backend:
            assert name in await backend.discover()
            em.delete_subscription(name)
            assert not await backend.exists(name)
            assert await backend.receive(name) is None
            with trio.move_on_after(2.5):
                await backend.wait_for_work([name], 10)
            assert name not in await backend.discover()

    trio.run(main)


def test_configuration_mistakes_show_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--certs-dir or --pubsub-project"):
        PubSubQueue()
    with pytest.raises(ConfigError, match="10 s to 10 min"):
        PubSubQueue(project="p", lease=5)

    async def main() -> None:
        with pytest.raises(ConfigError, match="is not a directory"):
            await PubSubQueue(certs_dir=tmp_path / "missing").start()

    trio.run(main)


def test_a_service_account_file_gives_its_project_and_real_credentials(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    good = tmp_path / "sa.json"
    good.write_text(json.dumps({
        "type": "service_account", "project_id": "my-proj", "private_key_id": "k1", "private_key": pem,
        "client_email": "runner@my-proj.iam.gserviceaccount.com", "client_id": "1",
        "token_uri": "https://oauth2.googleapis.com/token"}))
    proj, creds = read_credential(good, emulator=False)
    assert proj == "my-proj" and creds.service_account_email == "runner@my-proj.iam.gserviceaccount.com"
    assert read_credential(good, emulator=True) == ("my-proj", None)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"project_id": "p", "private_key": "-----BEGIN PRIVATE KEY-----\nsecret"}))
    with pytest.raises(ConfigError) as info:
        read_credential(bad, emulator=False)
    assert "secret" not in str(info.value)
    (tmp_path / "noproj.json").write_text("{}")
    with pytest.raises(ConfigError, match="no project_id"):
        read_credential(tmp_path / "noproj.json", emulator=True)

"""What only the SQS backend does, against the moto server over HTTP (the contract suite covers the rest):
the certs directory (accounts added, removed, broken, colliding), keeping a message invisible while its
experiment runs, continuing a message past SQS's 12-hour visibility cap (shrunk to seconds here) without
losing it or running it twice, and response queues."""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from support.s3server import MotoS3

from studio_runner.queues.sqs import (
    ATTEMPT_ATTR,
    HOLD_PREFIX,
    ORIGIN_ID_ATTR,
    SqsDelivery,
    SqsQueue,
)
from studio_runner.queues.sqs_accounts import AccountError, read_account
from studio_runner.storage.base import Credentials

OTHER_REGION = "eu-west-1"  # moto keeps each region's queues apart: a second "account" with its own queues


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    trio.run(scenario)


def make_queue(server: MotoS3, region: str | None = None, prefix: str = "sqs_t") -> tuple[Any, str, str]:
    client = sqs_client(server, region)
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    return client, name, client.create_queue(QueueName=name)["QueueUrl"]


def sqs_client(server: MotoS3, region: str | None = None) -> Any:
    client = server.client("sqs")
    if region is None:
        return client
    import boto3

    creds = server.credentials
    return boto3.session.Session().client("sqs", endpoint_url=server.sqs_endpoint_url, region_name=region,
                                          aws_access_key_id=creds.access_key,
                                          aws_secret_access_key=creds.secret_key)


def visible(client: Any, url: str) -> int:
    attrs = client.get_queue_attributes(QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages"])
    return int(attrs["Attributes"]["ApproximateNumberOfMessages"])


def hold_queues(client: Any) -> list[str]:
    return list(client.list_queues(QueueNamePrefix=HOLD_PREFIX).get("QueueUrls", []))


# --- the certs directory ---------------------------------------------------------------------------------


def test_account_folders_are_read_like_the_go_runner(tmp_path: Path) -> None:
    named = tmp_path / "named"
    named.mkdir()
    (named / "credentials").write_text("[default]\naws_access_key_id = AK1\naws_secret_access_key = SK1\n")
    (named / "config").write_text("[profile default]\nregion = us-east-2\nendpoint_url = http://h:1\n")
    (named / ".hidden").write_text("ignored")
    files = read_account(named)
    assert (files.label, files.access_key, files.secret_key, files.region, files.endpoint_url) == (
        "named", "AK1", "SK1", "us-east-2", "http://h:1")
    assert "SK1" not in repr(files)

    secret_mount = tmp_path / "mount"  # a Kubernetes secret: any two key names, region tells them apart
    secret_mount.mkdir()
    (secret_mount / "a").write_text("[default]\nregion=eu-west-3\n")
    (secret_mount / "b").write_text("[default]\naws_access_key_id=AK2\naws_secret_access_key=SK2\n")
    files = read_account(secret_mount)
    assert (files.access_key, files.region, files.endpoint_url) == ("AK2", "eu-west-3", None)

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "credentials").write_text("aws_secret_access_key = VERY-SECRET-VALUE\n")  # no section header
    (bad / "config").write_text("[default]\nregion = us-east-1\n")
    with pytest.raises(AccountError) as err:
        read_account(bad)
    assert "VERY-SECRET-VALUE" not in str(err.value) and "bad" in str(err.value)
    (bad / "credentials").write_text("[default]\naws_access_key_id = AK\n")
    with pytest.raises(AccountError, match="aws_secret_access_key"):
        read_account(bad)
    (bad / "credentials").unlink()
    with pytest.raises(AccountError, match="found 1 file"):
        read_account(bad)


def test_a_broken_account_is_skipped_and_the_others_served(
        s3_server: MotoS3, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _client, name, _url = make_queue(s3_server)
    certs = tmp_path / "certs"
    s3_server.write_aws_account(certs / "good")
    s3_server.write_aws_account(certs / "wrong-key",
                                Credentials(s3_server.credentials.access_key, "NOT-THE-SECRET-123"))
    (certs / "half").mkdir()
    (certs / "half" / "credentials").write_text("[default]\n")

    async def scenario() -> None:
        async with SqsQueue(certs) as backend:
            with caplog.at_level(logging.INFO):
                names = await backend.discover()
                assert name in names
                assert await backend.discover() == names  # the same problems are not logged again

    run(scenario)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("wrong-key" in w for w in warnings) == 1, warnings
    assert sum("half" in w for w in warnings) == 1, warnings
    assert "NOT-THE-SECRET-123" not in caplog.text
    assert s3_server.credentials.secret_key not in caplog.text


def test_accounts_added_and_removed_at_run_time(s3_server: MotoS3, tmp_path: Path) -> None:
    _c, home_queue, _u = make_queue(s3_server)
    other, far_queue, far_url = make_queue(s3_server, OTHER_REGION)
    other.send_message(QueueUrl=far_url, MessageBody='{"n": "far"}')
    certs = tmp_path / "certs"
    s3_server.write_aws_account(certs / "home")

    async def scenario() -> None:
        async with SqsQueue(certs, visibility_timeout=10) as backend:
            names = await backend.discover()
            assert home_queue in names and far_queue not in names
            assert await backend.receive(far_queue) is None
            s3_server.write_aws_account(certs / "far", region=OTHER_REGION)
            names = await backend.discover()
            assert home_queue in names and far_queue in names
            d = await backend.receive(far_queue)
            assert d is not None and d.body == b'{"n": "far"}'
            shutil.rmtree(certs / "far")
            names = await backend.discover()
            assert far_queue not in names and home_queue in names
            assert await backend.exists(far_queue)  # its running experiment is not aborted
            await d.ack()  # a delivery of a removed account still settles with its own client
            assert visible(other, far_url) == 0
            assert await backend.receive(far_queue) is None
            other.send_message(QueueUrl=far_url, MessageBody='{"n": "later"}')
            assert await backend.receive(far_queue) is None  # no new work from a removed account

    run(scenario)


def test_a_queue_name_in_two_accounts_is_served_from_one(
        s3_server: MotoS3, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    client, name, url = make_queue(s3_server)
    certs = tmp_path / "certs"
    s3_server.write_aws_account(certs / "a")
    s3_server.write_aws_account(certs / "b")  # the same account twice: every queue collides
    client.send_message(QueueUrl=url, MessageBody="{}")

    async def scenario() -> None:
        async with SqsQueue(certs) as backend:
            with caplog.at_level(logging.WARNING):
                names = await backend.discover()
                await backend.discover()
            assert names.count(name) == 1
            d = await backend.receive(name)
            assert d is not None
            await d.ack()

    run(scenario)
    collisions = [r.getMessage() for r in caplog.records if name in r.getMessage()]
    assert len(collisions) == 1 and "served from a only" in collisions[0]


def test_the_runners_own_queues_are_never_served(s3_server: MotoS3, tmp_path: Path) -> None:
    client, name, url = make_queue(s3_server)
    client.send_message(QueueUrl=url, MessageBody='{"bad": 1}')
    certs = tmp_path / "certs"
    s3_server.write_aws_account(certs / "main")
    aside = f"studio-runner-set-aside-t{uuid.uuid4().hex[:8]}"

    async def scenario() -> None:
        async with SqsQueue(certs, set_aside_queue=aside) as backend:
            d = await backend.receive(name)
            assert d is not None
            await d.set_aside("malformed")
            names = await backend.discover()
            assert name in names and aside not in names
            assert not any(n.startswith("studio-runner-") for n in names)

    run(scenario)
    client.delete_queue(QueueUrl=client.get_queue_url(QueueName=aside)["QueueUrl"])


def test_a_missing_certs_directory_is_a_configuration_error(tmp_path: Path) -> None:
    from studio_runner.errors import ConfigError

    async def scenario() -> None:
        with pytest.raises(ConfigError, match="not a directory"):
            await SqsQueue(tmp_path / "nope").start()

    run(scenario)


# --- holding a message while its experiment runs ---------------------------------------------------------


def test_keep_alive_keeps_the_message_from_other_runners_until_the_holder_dies(
        s3_server: MotoS3, tmp_path: Path) -> None:
    client, name, url = make_queue(s3_server)
    client.send_message(QueueUrl=url, MessageBody='{"n": 1}')
    certs = tmp_path / "certs"
    s3_server.write_aws_account(certs / "main")

    async def scenario() -> None:
        holder, other = SqsQueue(certs, visibility_timeout=3), SqsQueue(certs, visibility_timeout=3)
        try:
            d = await holder.receive(name)
            assert d is not None and d.attempt == 1
            for _ in range(8):  # 8 s, well past the 3 s visibility: renewals keep it
                await trio.sleep(1)
                await d.keep_alive()
                assert await other.receive(name) is None
            assert not d.lost.is_set()
            # the holder dies: nothing renews, nothing gives back; it comes back by itself, counted
            with trio.fail_after(10):
                while (again := await other.receive(name)) is None:
                    await trio.sleep(0.3)
            assert (again.body, again.attempt, again.message_id) == (b'{"n": 1}', 2, d.message_id)
            await d.keep_alive()  # too late: the holder learns it lost the claim
            assert d.lost.is_set() and d.lost_reason
            await d.ack()  # must not delete what the other runner now holds
            await again.ack()
            assert visible(client, url) == 0
        finally:
            await other.aclose()

    run(scenario)


# --- the visibility cap ----------------------------------------------------------------------------------

CAP = dict(visibility_timeout=3, visibility_cap=10, cap_margin=2, hold_grace=4)


async def renew_until(d: SqsDelivery, continuations: int, others: list[SqsQueue], name: str,
                      timeout: float = 60) -> None:
    """The supervisor's keep-alive loop (every second here), while other runners try to take the work."""
    with trio.fail_after(timeout):
        while d.continuations < continuations:
            await trio.sleep(1)
            await d.keep_alive()
            assert not d.lost.is_set(), d.lost_reason
            for other in others:  # its rescan sweeps the private queues: a live holder's copy stays
                await other.discover()
                assert await other.receive(name) is None, "another runner got a message still running"


def test_a_message_outlives_the_visibility_cap_without_running_twice(s3_server: MotoS3,
                                                                     tmp_path: Path) -> None:
    client, name, url = make_queue(s3_server)
    client.send_message(QueueUrl=url, MessageBody='{"long": true}')
    certs = tmp_path / "certs"
    s3_server.write_aws_account(certs / "main")

    async def scenario() -> None:
        async with SqsQueue(certs, **CAP) as holder, SqsQueue(certs, **CAP) as other:
            d = await holder.receive(name)
            assert d is not None
            started = time.monotonic()
            await renew_until(d, 3, [other], name)
            assert time.monotonic() - started > 2 * CAP["visibility_cap"] - 3 * CAP["cap_margin"] - 2
            assert visible(client, url) == 0
            assert len(hold_queues(client)) >= 1
            for _ in range(3):  # still running, still nobody else's
                await trio.sleep(1)
                await d.keep_alive()
                assert await other.receive(name) is None
            assert d.attempt == 1
            await d.ack()
            assert hold_queues(client) == []  # its private queue went with it
            await other.discover()
            assert await other.receive(name) is None and visible(client, url) == 0

    run(scenario)


@pytest.mark.parametrize("settle", ["nack", "release"])
def test_settling_a_continued_message_puts_it_back_in_its_queue(
        s3_server: MotoS3, tmp_path: Path, settle: str) -> None:
    client, name, url = make_queue(s3_server)
    client.send_message(QueueUrl=url, MessageBody='{"long": true}')
    certs = tmp_path / "certs"
    s3_server.write_aws_account(certs / "main")

    async def scenario() -> None:
        async with SqsQueue(certs, **CAP) as backend:
            d = await backend.receive(name)
            assert d is not None
            await renew_until(d, 1, [], name)
            await getattr(d, settle)()
            again = await backend.receive(name)
            assert again is not None
            assert (again.body, again.message_id) == (d.body, d.message_id)
            assert again.attempt == (2 if settle == "nack" else 1)
            await again.ack()
            assert hold_queues(client) == []

    run(scenario)


def test_a_continued_message_whose_runner_died_goes_back_to_its_queue(
        s3_server: MotoS3, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    client, name, url = make_queue(s3_server)
    client.send_message(QueueUrl=url, MessageBody='{"long": true}',
                        MessageAttributes={ATTEMPT_ATTR: {"DataType": "String", "StringValue": "2"}})
    certs = tmp_path / "certs"
    s3_server.write_aws_account(certs / "main")

    async def scenario() -> None:
        holder = SqsQueue(certs, **CAP)
        d = await holder.receive(name)
        assert d is not None and d.attempt == 2
        await renew_until(d, 1, [], name)
        # the holder dies here (kill -9): no renewal, no give-back; its private copy becomes visible
        async with SqsQueue(certs, **CAP) as sweeper:
            started = time.monotonic()
            with trio.fail_after(30), caplog.at_level(logging.WARNING):
                while (again := await sweeper.receive(name)) is None:
                    await sweeper.discover()
                    await trio.sleep(0.5)
            waited = time.monotonic() - started
            assert waited >= CAP["visibility_timeout"] - 1  # not while the holder could still be alive
            assert (again.body, again.attempt, again.message_id) == (b'{"long": true}', 3, d.message_id)
            assert hold_queues(client) == []
            await again.ack()
        await d.keep_alive()
        assert d.lost.is_set()

    run(scenario)
    assert any("lost its runner" in r.getMessage() for r in caplog.records)


def test_the_attempt_and_origin_survive_a_release(s3_server: MotoS3, tmp_path: Path) -> None:
    client, name, url = make_queue(s3_server)
    client.send_message(QueueUrl=url, MessageBody="{}")
    certs = tmp_path / "certs"
    s3_server.write_aws_account(certs / "main")

    async def scenario() -> None:
        async with SqsQueue(certs) as backend:
            d = await backend.receive(name)
            assert d is not None
            await d.nack()
            d2 = await backend.receive(name)
            assert d2 is not None and d2.attempt == 2
            await d2.release()
            raw = client.receive_message(QueueUrl=url, MessageAttributeNames=["All"],
                                         AttributeNames=["All"])["Messages"][0]
            attrs = {k: v["StringValue"] for k, v in raw["MessageAttributes"].items()}
            assert attrs[ATTEMPT_ATTR] == "2" and attrs[ORIGIN_ID_ATTR] == d.message_id
            client.delete_message(QueueUrl=url, ReceiptHandle=raw["ReceiptHandle"])

    run(scenario)


# --- response queues -------------------------------------------------------------------------------------


def test_reports_go_to_the_response_queue_when_it_exists(s3_server: MotoS3, tmp_path: Path) -> None:
    client, name, _url = make_queue(s3_server)
    certs = tmp_path / "certs"
    s3_server.write_aws_account(certs / "main")

    async def scenario() -> None:
        async with SqsQueue(certs) as backend:
            assert not await backend.response_queue_exists(name)
            with pytest.raises(LookupError):
                await backend.publish_response(name, b"{}")
            response_url = client.create_queue(QueueName=f"{name}_response")["QueueUrl"]
            assert await backend.response_queue_exists(name)
            for n in range(3):
                await backend.publish_response(name, f'{{"n": {n}}}'.encode())
            got = []
            while msgs := client.receive_message(QueueUrl=response_url,
                                                 MaxNumberOfMessages=10).get("Messages"):
                got += [m["Body"] for m in msgs]
                for m in msgs:
                    client.delete_message(QueueUrl=response_url, ReceiptHandle=m["ReceiptHandle"])
            assert sorted(got) == ['{"n": 0}', '{"n": 1}', '{"n": 2}']
            client.delete_queue(QueueUrl=response_url)

    run(scenario)

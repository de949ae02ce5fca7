"""Encrypted and signed requests from the real StudioML 0.0.49 client (``public_key_path`` and
``signing_key_path``), opened by the runner's intake gate and run by the real runner CLI in local mode and
over RabbitMQ; every kind of tampering is refused (set aside once, reason logged) while the next good message
on the queue runs.

Envelopes come from the client library itself, in its own venv: ``studio run`` for the end-to-end tests, and
``EncryptedPayloadBuilder.construct`` (with a stand-in experiment whose ``to_dict`` returns our document) for
the in-process gate tests, so the plaintext can be compared byte for byte with the clear request the client
would have sent.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import subprocess
import textwrap
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika
import pytest
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from support.rabbitmq import channel, get_one, publish_like_studioml, ready_count
from support.runner import Sandbox, read_member
from support.s3server import MotoS3
from support.studioml_client import local_mode_config, studio_run
from test_studioml_rabbitmq import Deployment

from studio_runner import crypto
from studio_runner.errors import RequestInvalid, RequestRefused
from studio_runner.gate import RequestGate
from studio_runner.keyring import PASSPHRASE_FILE, PRIVATE_KEY_FILE, Keyring
from studio_runner.queues.rmq_link import QUEUE_HEADER, REASON_HEADER, SET_ASIDE_QUEUE
from studio_runner.request import parse_request

PASSPHRASE = "runner passphrase 7f3a"
SECRET = "s3cr3t-Value-of-the-experimenter-9q"

# --------------------------------------------------------------------------- keys and the client


@dataclass
class Keys:
    """A runner's key directories and the client's key files, made fresh for a test."""

    base: Path
    runner_key: rsa.RSAPrivateKey
    signer: Ed25519PrivateKey

    @property
    def encrypt_dir(self) -> Path:
        return self.base / "certs" / "message"

    @property
    def signatures(self) -> Path:
        return self.base / "certs" / "signing"

    @property
    def public_key_path(self) -> Path:
        return self.base / "client" / "runner-public.pem"

    @property
    def signing_key_path(self) -> Path:
        return self.base / "client" / "signing-key"

    def authorized_line(self, signer: Ed25519PrivateKey | None = None) -> str:
        key = (signer or self.signer).public_key()
        blob = key.public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH)
        return f"{blob.decode()} experimenter@example\n"

    def trust(self, name: str, signer: Ed25519PrivateKey | None = None) -> None:
        """Put a verification key for queues starting ``name`` into --request-signatures-dir."""
        self.signatures.mkdir(parents=True, exist_ok=True)
        staged = self.signatures / f".{name}.tmp"  # hidden while written, then renamed in
        staged.write_text(self.authorized_line(signer))
        staged.rename(self.signatures / name)

    def client_config(self) -> str:
        return f"public_key_path: {self.public_key_path}\nsigning_key_path: {self.signing_key_path}\n"

    def runner_env(self, clear_text: bool = True) -> dict[str, str]:
        return {"STUDIO_RUNNER_ENCRYPT_DIR": str(self.encrypt_dir),
                "STUDIO_RUNNER_REQUEST_SIGNATURES_DIR": str(self.signatures),
                "STUDIO_RUNNER_RESPONSE_SIGNATURES_DIR": str(self.base / "certs" / "response"),
                "STUDIO_RUNNER_CLEAR_TEXT_MESSAGES": "true" if clear_text else "false"}

    def gate(self, clear_text: bool = True, max_size: int = 4 << 20) -> RequestGate:
        keyring = Keyring(self.encrypt_dir, self.signatures, self.base / "certs" / "response")
        return RequestGate(clear_text=clear_text, max_size=max_size, keyring=keyring)


def make_keys(base: Path, bits: int = 2048) -> Keys:
    """The runner key in the Go runner's form (PKCS#1, legacy ``Proc-Type: 4,ENCRYPTED``, passphrase file);
    the client gets the PKCS#1 public PEM and an OpenSSH Ed25519 private key, the files 0.0.49 reads."""
    keys = Keys(base, rsa.generate_private_key(public_exponent=65537, key_size=bits),
                Ed25519PrivateKey.generate())
    for path in (keys.encrypt_dir / PRIVATE_KEY_FILE, keys.encrypt_dir / PASSPHRASE_FILE,
                 keys.public_key_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    encryption = ser.BestAvailableEncryption(PASSPHRASE.encode())
    (keys.encrypt_dir / PRIVATE_KEY_FILE).write_bytes(keys.runner_key.private_bytes(
        ser.Encoding.PEM, ser.PrivateFormat.TraditionalOpenSSL, encryption))
    (keys.encrypt_dir / PASSPHRASE_FILE).write_text(PASSPHRASE)
    keys.public_key_path.write_bytes(keys.runner_key.public_key().public_bytes(ser.Encoding.PEM,
                                                                               ser.PublicFormat.PKCS1))
    keys.signing_key_path.write_bytes(keys.signer.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.OpenSSH,
                                                                ser.NoEncryption()))
    keys.signatures.mkdir(parents=True, exist_ok=True)
    return keys


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    made = make_keys(tmp_path_factory.mktemp("keys"))
    made.trust("local_")
    return made


_CLIENT_BUILD = """
import json, sys
from types import SimpleNamespace
from studio.encrypted_payload_builder import EncryptedPayloadBuilder
from studio.payload_builders.unencrypted_payload_builder import UnencryptedPayloadBuilder
builder = EncryptedPayloadBuilder("test", sys.argv[1], sys.argv[2])
out = []
for doc in json.loads(sys.stdin.read()):
    exp_doc = doc["experiment"]
    exp = SimpleNamespace(to_dict=lambda d=exp_doc: d, **{k: exp_doc.get(k) for k in
          ("status", "pythonver", "time_added", "max_duration", "resources_needed")})
    clear = json.dumps(UnencryptedPayloadBuilder("clear").construct(exp, doc["config"], []))
    out.append([clear, json.dumps(builder.construct(exp, doc["config"], []))])
print(json.dumps(out))
"""


def client_envelopes(studioml_bin: Path, keys: Keys, docs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(clear request, envelope) pairs as the client's own builders serialise them."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    done = subprocess.run([str(studioml_bin / "python"), "-c", _CLIENT_BUILD, str(keys.public_key_path),
                           str(keys.signing_key_path)], input=json.dumps(docs), env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return [(clear, envelope) for clear, envelope in json.loads(done.stdout)]


def request_doc(key: str = "enc_1") -> dict[str, Any]:
    return {
        "experiment": {
            "key": key, "args": ["'a b'"], "filename": "hello.py", "pythonenv": ["tabulate==0.9.0"],
            "project": None, "pythonver": "3.11", "status": "waiting", "time_added": 1631664000.5213,
            "max_duration": "20m", "resources_needed": {"cpus": 1, "ram": "1g", "hdd": "2g", "gpus": 0},
            "artifacts": {"workspace": {
                "unpack": True, "mutable": False, "key": f"experiments/{key}/workspace.tar",
                "qualified": f"s3://store.example:9000/bucket/experiments/{key}/workspace.tar",
                "credentials": {"aws": {"access_key": "AKIAEXAMPLE", "secret_access_key": SECRET,
                                        "region": "us-west-2"}}}},
        },
        "config": {"experimentLifetime": "30m", "env": {"API_TOKEN": SECRET, "MODE": "test"}},
    }


# --------------------------------------------------------------------------- tampering


def _edit(envelope: str, change: Callable[[dict[str, Any]], None]) -> str:
    doc = json.loads(envelope)
    change(doc["message"])
    return json.dumps(doc)


def _flip_b64(text: str, index: int) -> str:
    raw = bytearray(base64.b64decode(text))
    raw[index] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


def flip_sealed(envelope: str) -> str:
    def change(m: dict[str, Any]) -> None:
        wrapped, sealed = m["payload"].split(",")
        m["payload"] = f"{wrapped},{_flip_b64(sealed, len(base64.b64decode(sealed)) // 2)}"
        m["signature"] = crypto.sign(SIGNER_OF[envelope], m["payload"])  # a valid signer, a bad box
    return _edit(envelope, change)


def flip_wrapped(envelope: str) -> str:
    def change(m: dict[str, Any]) -> None:
        wrapped, sealed = m["payload"].split(",")
        m["payload"] = f"{_flip_b64(wrapped, 7)},{sealed}"
        m["signature"] = crypto.sign(SIGNER_OF[envelope], m["payload"])
    return _edit(envelope, change)


def flip_payload_unsigned(envelope: str) -> str:
    """One byte of the sealed part flipped and *not* re-signed: the signature catches it first."""
    def change(m: dict[str, Any]) -> None:
        wrapped, sealed = m["payload"].split(",")
        m["payload"] = f"{wrapped},{_flip_b64(sealed, 40)}"
    return _edit(envelope, change)


def flip_signature(envelope: str) -> str:
    return _edit(envelope, lambda m: m.update(signature=_flip_b64(m["signature"], 5)))


def foreign_signer(envelope: str) -> str:
    stranger = Ed25519PrivateKey.generate()
    return _edit(envelope, lambda m: m.update(signature=crypto.sign(stranger, m["payload"]),
                                               fingerprint=crypto.fingerprint(stranger.public_key())))


SIGNER_OF: dict[str, Ed25519PrivateKey] = {}
"""Envelope text -> the signing key that made it, for tampering that keeps a valid signature (to reach the
decryption checks behind the signature check)."""

TAMPERING: dict[str, tuple[Callable[[str], str], str]] = {
    "sealed-byte": (flip_sealed, "sealed request fails its authentication"),
    "wrapped-key-byte": (flip_wrapped, "wrapped key does not decrypt"),
    "payload-byte-unsigned": (flip_payload_unsigned, "signature does not verify"),
    "signature-byte": (flip_signature, "signature does not verify"),
    "unknown-signer": (foreign_signer, "signature does not verify"),
    "no-signature": (lambda e: _edit(e, lambda m: m.pop("signature")), "not signed"),
    "empty-fingerprint": (lambda e: _edit(e, lambda m: m.update(fingerprint="")), "fingerprint is missing"),
    "payload-not-a-string": (lambda e: _edit(e, lambda m: m.update(payload=["x"])), "non-empty string"),
}


# --------------------------------------------------------------------------- the gate, in process


@pytest.fixture(scope="module")
def pairs(studioml_bin: Path, keys: Keys) -> list[tuple[str, str]]:
    made = client_envelopes(studioml_bin, keys, [request_doc("enc_1"), request_doc("enc_2")])
    for _, envelope in made:
        SIGNER_OF[envelope] = keys.signer
    return made


@pytest.mark.slow
@pytest.mark.parametrize("bits", [2048, 4096])
def test_client_envelope_decrypts_to_exactly_the_clear_request(studioml_bin: Path, tmp_path: Path, bits: int,
                                                               caplog):
    caplog.set_level(logging.DEBUG)
    keys = make_keys(tmp_path, bits)
    keys.trust("rmq_")
    [(clear, envelope)] = client_envelopes(studioml_bin, keys, [request_doc()])
    message = json.loads(envelope)["message"]
    assert set(message) == {"experiment", "time_added", "experiment_lifetime", "resources_needed", "payload",
                            "signature", "fingerprint"}
    assert SECRET not in envelope and "hello.py" not in envelope  # only the advisory header is clear
    assert message["fingerprint"] == crypto.fingerprint(keys.signer.public_key())
    assert len(base64.b64decode(message["payload"].split(",")[0])) == bits // 8
    plaintext = crypto.decrypt_payload(keys.runner_key, message["payload"])
    assert plaintext == clear.encode("utf-8")  # byte for byte what the clear builder serialises

    gate = keys.gate()
    assert gate.costly(envelope.encode())
    request = gate.open(envelope.encode(), "rmq_team_queue")
    assert request.raw == parse_request(clear).raw == json.loads(clear)
    assert request.experiment.key == "enc_1" and request.config.env["API_TOKEN"] == SECRET
    assert SECRET not in caplog.text and PASSPHRASE not in caplog.text


@pytest.mark.slow
def test_the_clear_header_is_advisory_the_decrypted_body_runs(keys: Keys, pairs):
    _, envelope = pairs[0]
    forged = _edit(envelope, lambda m: m.update(resources_needed={"cpus": 64, "gpus": 8},
                                                experiment={"status": "done", "pythonver": "2.7"}))
    request = keys.gate().open(forged, "local_x")  # the header is not signed; it changes nothing
    assert request.experiment.resources.cpus == 1 and request.experiment.pythonver == "3.11"


@pytest.mark.slow
@pytest.mark.parametrize("case", TAMPERING)
def test_tampered_envelopes_are_refused_and_the_next_good_one_opens(keys: Keys, pairs, case, caplog):
    tamper, reason = TAMPERING[case]
    gate = keys.gate()
    bad = tamper(pairs[0][1])
    with pytest.raises(RequestRefused, match=reason) as caught:
        gate.open(bad.encode(), "local_enc")
    assert isinstance(caught.value, RequestInvalid)  # the supervisor's set-aside path
    assert SECRET not in str(caught.value) and PASSPHRASE not in str(caught.value)
    assert gate.open(pairs[1][1].encode(), "local_enc").experiment.key == "enc_2"
    assert SECRET not in caplog.text


@pytest.mark.slow
def test_a_wrong_fingerprint_is_logged_but_the_signature_decides(keys: Keys, pairs, caplog):
    other = crypto.fingerprint(Ed25519PrivateKey.generate().public_key())
    relabelled = _edit(pairs[0][1], lambda m: m.update(fingerprint=other))
    assert keys.gate().open(relabelled, "local_enc").experiment.key == "enc_1"
    assert f"claims signing key {other}" in caplog.text


@pytest.mark.slow
def test_no_key_for_the_queue_no_keyring_and_a_wrong_passphrase_are_refusals(keys: Keys, pairs,
                                                                              tmp_path: Path, caplog):
    envelope = pairs[0][1]
    with pytest.raises(RequestRefused, match=r"no request signature key for queue 'rmq_other'"):
        keys.gate().open(envelope, "rmq_other")  # only local_ is trusted
    with pytest.raises(RequestRefused, match="no keys configured"):
        RequestGate().open(envelope, "local_enc")
    broken = Keys(tmp_path, keys.runner_key, keys.signer)
    (broken.encrypt_dir / PASSPHRASE_FILE).parent.mkdir(parents=True)
    (broken.encrypt_dir / PRIVATE_KEY_FILE).parent.mkdir(parents=True)
    (broken.encrypt_dir / PRIVATE_KEY_FILE).write_bytes((keys.encrypt_dir / PRIVATE_KEY_FILE).read_bytes())
    (broken.encrypt_dir / PASSPHRASE_FILE).write_text("wrong-passphrase-Zz9")
    broken.trust("local_")
    with pytest.raises(RequestRefused, match="wrong passphrase") as caught:
        broken.gate().open(envelope, "local_enc")
    assert "Zz9" not in str(caught.value) and "Zz9" not in caplog.text and PASSPHRASE not in caplog.text


@pytest.mark.slow
def test_clear_text_off_refuses_clear_requests_and_still_opens_envelopes(keys: Keys, pairs):
    clear, envelope = pairs[0]
    gate = keys.gate(clear_text=False)
    with pytest.raises(RequestRefused, match="clear-text request, and --clear-text-messages is false"):
        gate.open(clear.encode(), "local_enc")
    assert gate.open(envelope.encode(), "local_enc").experiment.key == "enc_1"
    assert keys.gate(clear_text=True).open(clear.encode(), "local_enc").experiment.key == "enc_1"


def test_an_oversized_message_is_refused_before_it_is_parsed():
    gate = RequestGate(max_size=1000)
    not_json = b"\xff" * 1001  # would be "not UTF-8" if it were parsed
    expected = r"1001 bytes\), larger than --max-message-size 1000 B; not parsed"
    with pytest.raises(RequestRefused, match=expected):
        gate.open(not_json, "local_x")
    exact = json.dumps(request_doc()).encode()
    assert RequestGate(max_size=len(exact)).open(exact, "local_x").experiment.key == "enc_1"
    with pytest.raises(RequestRefused, match="larger than"):
        RequestGate(max_size=len(exact) - 1).open(exact, "local_x")
    with pytest.raises(RequestRefused, match="larger than"):  # str bodies count their UTF-8 bytes
        RequestGate(max_size=3).open("éé", "local_x")


# --------------------------------------------------------------------------- the runner CLI, local mode

HELLO = textwrap.dedent("""\
    import sys
    print("hello from an encrypted request", sys.argv[1:])
    """)


def project(base: Path) -> Path:
    folder = base / "project"
    folder.mkdir(exist_ok=True)
    (folder / "hello.py").write_text(HELLO)
    return folder


def submit_local(studioml_bin: Path, box: Sandbox, config: Path, queue: str, *args: str) -> tuple[str, Path]:
    """``studio run`` to a local queue; returns the experiment key and the message file it wrote."""
    before = set(box.pending(queue))
    key = studio_run(studioml_bin, config, box.base, project(box.base), f"--queue={queue}", "hello.py", *args)
    [name] = set(box.pending(queue)) - before
    return key, box.queue_root / queue / name


def add_message(box: Sandbox, queue: str, body: str, age: float = 0.0) -> Path:
    """Place a message file atomically, with its mtime ``age`` seconds in the past (oldest runs first)."""
    staged = box.base / f"staged-{uuid.uuid4().hex}"
    staged.write_text(body)
    stamp = time.time() - age
    os.utime(staged, (stamp, stamp))
    target = box.queue_root / queue / str(uuid.uuid4())
    target.parent.mkdir(parents=True, exist_ok=True)
    staged.rename(target)
    return target


def output_of(store: Path, key: str) -> Path:
    """Where the runner puts an experiment's output for the client's local storage (``local_mode_config``)."""
    return store / "studiostore" / "experiments" / key / "output.tar"


def output_text(store: Path, key: str) -> str:
    return read_member(output_of(store, key), "output")


def reasons(box: Sandbox, queue: str) -> list[str]:
    return sorted(p.read_text() for p in box.set_aside(queue) if p.name.endswith(".reason.txt"))


@pytest.mark.slow
def test_local_mode_runs_the_encrypted_request_and_sets_tampered_ones_aside(
        sandbox: Sandbox, studioml_bin: Path, keys: Keys, tmp_path: Path):
    config = local_mode_config(tmp_path / "config.yaml", tmp_path / "store", keys.client_config())
    key, message = submit_local(studioml_bin, sandbox, config, "local_enc", "x y")
    good = message.read_text()
    assert crypto.fingerprint(keys.signer.public_key()) in good and "hello.py" not in good
    SIGNER_OF[good] = keys.signer
    cases = ["sealed-byte", "wrapped-key-byte", "signature-byte", "unknown-signer"]
    for age, case in enumerate(cases, start=10):  # older than the good message: they are taken first
        add_message(sandbox, "local_enc", TAMPERING[case][0](good), age=age)

    result = sandbox.run_once(timeout=600, **keys.runner_env())
    assert result.returncode == 1, result.stderr[-5000:]  # --once: 1 when anything did not succeed
    assert "hello from an encrypted request ['x y']" in output_text(tmp_path / "store", key)
    assert sandbox.pending("local_enc") == []
    got = reasons(sandbox, "local_enc")
    assert len(got) == len(cases), got
    for case in cases:
        assert any(TAMPERING[case][1] in text for text in got), (case, got)
    assert result.stderr.count("refused, setting it aside") == len(cases)
    assert PASSPHRASE not in result.stderr + result.stdout


@pytest.mark.slow
def test_clear_text_messages_false_sets_clear_requests_aside_and_runs_encrypted_ones(
        sandbox: Sandbox, studioml_bin: Path, keys: Keys, tmp_path: Path):
    clear_config = local_mode_config(tmp_path / "clear.yaml", tmp_path / "store")
    enc_config = local_mode_config(tmp_path / "enc.yaml", tmp_path / "store", keys.client_config())
    clear_key, clear_file = submit_local(studioml_bin, sandbox, clear_config, "local_only_enc", "clear")
    os.utime(clear_file, (time.time() - 30, time.time() - 30))
    enc_key, _ = submit_local(studioml_bin, sandbox, enc_config, "local_only_enc", "sealed")

    result = sandbox.run_once(timeout=600, **keys.runner_env(clear_text=False))
    assert result.returncode == 1, result.stderr[-5000:]  # --once: 1 when anything did not succeed
    assert "hello from an encrypted request ['sealed']" in output_text(tmp_path / "store", enc_key)
    assert not output_of(tmp_path / "store", clear_key).exists()
    [reason] = reasons(sandbox, "local_only_enc")
    assert "--clear-text-messages is false" in reason
    assert sandbox.pending("local_only_enc") == []


def wait_for(check: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert proc.poll() is None, f"the runner exited while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.slow
def test_a_key_dropped_into_the_signatures_dir_is_used_for_the_next_message(
        sandbox: Sandbox, studioml_bin: Path, tmp_path: Path):
    keys = make_keys(tmp_path / "fresh")  # no key trusted yet
    config = local_mode_config(tmp_path / "config.yaml", tmp_path / "store", keys.client_config())
    first_key, first = submit_local(studioml_bin, sandbox, config, "local_drop", "first")
    second_key, second = submit_local(studioml_bin, sandbox, config, "local_drop", "second")
    bodies = [first.read_text(), second.read_text()]
    first.unlink()
    second.unlink()

    proc = sandbox.start(**keys.runner_env())
    try:
        add_message(sandbox, "local_drop", bodies[0])
        wait_for(lambda: len(reasons(sandbox, "local_drop")) == 1, 120, "the unsigned-for message", proc)
        assert "no request signature key for queue 'local_drop'" in reasons(sandbox, "local_drop")[0]
        keys.trust("local_d")  # a prefix of the queue name, dropped in while the runner runs
        add_message(sandbox, "local_drop", bodies[1])
        wait_for(lambda: output_of(tmp_path / "store", second_key).exists(), 300, "the second experiment",
                 proc)
        wait_for(lambda: sandbox.pending("local_drop") == [], 60, "the acknowledgement", proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    assert "hello from an encrypted request ['second']" in output_text(tmp_path / "store", second_key)
    assert not output_of(tmp_path / "store", first_key).exists()
    assert len(reasons(sandbox, "local_drop")) == 1
    assert "request signature key for queues starting 'local_d' loaded" in output


# --------------------------------------------------------------------------- over RabbitMQ


def take_set_aside(amqp_url: str, queue: str) -> list[tuple[dict[str, Any], bytes]]:
    """Take (ack) the messages set aside from ``queue``; others' set-aside messages go back untouched."""
    mine: list[tuple[dict[str, Any], bytes]] = []
    with channel(amqp_url) as ch:
        try:
            ch.queue_declare(SET_ASIDE_QUEUE, passive=True)
        except pika.exceptions.ChannelClosedByBroker:
            return mine
        while True:
            method, props, body = ch.basic_get(SET_ASIDE_QUEUE, auto_ack=False)
            if method is None:
                break
            headers = props.headers or {}
            if headers.get(QUEUE_HEADER) == queue:
                ch.basic_ack(method.delivery_tag)
                mine.append((headers, body))
        # closing the channel returns every message not acknowledged
    return mine


@pytest.fixture
def deployment(s3_server: MotoS3, rabbitmq_url: str, unique_queue: str, tmp_path: Path) -> Deployment:
    return Deployment(s3_server, rabbitmq_url, unique_queue, tmp_path)


@pytest.mark.slow
def test_encrypted_request_over_rabbitmq_runs_and_a_tampered_one_is_set_aside(
        deployment: Deployment, sandbox: Sandbox, studioml_bin: Path, tmp_path: Path):
    keys = make_keys(tmp_path / "keys")
    keys.trust("rmq_test_")
    config = deployment.config
    config.write_text(config.read_text() + keys.client_config())
    key = studio_run(studioml_bin, config, tmp_path / "home", project(tmp_path),
                     f"--queue={deployment.queue}", "hello.py", "over", "rmq")
    taken = get_one(deployment.amqp_url, deployment.queue)
    assert taken is not None
    good = taken[2].decode()
    secret = deployment.server.credentials.secret_key
    assert "payload" in json.loads(good)["message"] and secret not in good  # credentials travel sealed
    publish_like_studioml(deployment.amqp_url, deployment.queue, flip_signature(good))
    publish_like_studioml(deployment.amqp_url, deployment.queue, good)
    assert ready_count(deployment.amqp_url, deployment.queue) == 2

    result = deployment.run_runner(sandbox, timeout=600, **keys.runner_env(clear_text=False))
    assert result.returncode == 1, result.stderr[-5000:]  # --once: 1 when anything did not succeed
    assert deployment.metadata(key)["studioml"]["outcome"]["status"] == "success"
    output = deployment.member(f"experiments/{key}/output.tar", "output")
    assert "hello from an encrypted request ['over', 'rmq']" in output
    assert ready_count(deployment.amqp_url, deployment.queue) == 0
    [(headers, body)] = take_set_aside(deployment.amqp_url, deployment.queue)
    assert "signature does not verify" in headers[REASON_HEADER]
    aside, sent = json.loads(body)["message"], json.loads(good)["message"]
    assert aside["payload"] == sent["payload"] and aside["signature"] != sent["signature"]  # as published
    assert result.stderr.count("refused, setting it aside") == 1
    for text in (result.stderr, output):
        assert secret not in text and PASSPHRASE not in text


"""The runner's keys on disk: every private-key form the spec names, passphrase handling, lazy load and
reload, and the per-queue key directories (longest prefix, changes at run time without a restart)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from studio_runner import crypto
from studio_runner.errors import RequestRefused
from studio_runner.keyring import (
    PASSPHRASE_FILE,
    PRIVATE_KEY_FILE,
    KeyDirectory,
    Keyring,
    PrivateKeySource,
    parse_response_key,
    parse_signature_key,
)

PASSPHRASE = b"correct horse battery staple"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def numbers(key: rsa.RSAPrivateKey) -> int:
    return key.private_numbers().d


def install(encrypt_dir: Path, key_pem: bytes, passphrase: bytes | None) -> None:
    (encrypt_dir / PRIVATE_KEY_FILE).parent.mkdir(parents=True, exist_ok=True)
    (encrypt_dir / PRIVATE_KEY_FILE).write_bytes(key_pem)
    if passphrase is not None:
        (encrypt_dir / PASSPHRASE_FILE).parent.mkdir(parents=True, exist_ok=True)
        (encrypt_dir / PASSPHRASE_FILE).write_bytes(passphrase)


def pem(key: rsa.RSAPrivateKey, fmt: ser.PrivateFormat, passphrase: bytes | None) -> bytes:
    enc = ser.BestAvailableEncryption(passphrase) if passphrase else ser.NoEncryption()
    return key.private_bytes(ser.Encoding.PEM, fmt, enc)


FORMS = {
    "pkcs1": (ser.PrivateFormat.TraditionalOpenSSL, None, b"-----BEGIN RSA PRIVATE KEY-----\nMII"),
    "pkcs1-legacy-encrypted": (ser.PrivateFormat.TraditionalOpenSSL, PASSPHRASE, b"Proc-Type: 4,ENCRYPTED"),
    "pkcs8": (ser.PrivateFormat.PKCS8, None, b"-----BEGIN PRIVATE KEY-----"),
    "pkcs8-encrypted": (ser.PrivateFormat.PKCS8, PASSPHRASE, b"-----BEGIN ENCRYPTED PRIVATE KEY-----"),
    "openssh": (ser.PrivateFormat.OpenSSH, None, b"-----BEGIN OPENSSH PRIVATE KEY-----"),
}


@pytest.mark.parametrize("form", FORMS)
def test_private_key_forms_load(tmp_path: Path, rsa_key, form):
    fmt, passphrase, marker = FORMS[form]
    data = pem(rsa_key, fmt, passphrase)
    assert marker in data
    install(tmp_path, data, passphrase)
    assert numbers(PrivateKeySource(tmp_path).get()) == numbers(rsa_key)


@pytest.mark.parametrize("form", ["pkcs1", "pkcs8"])
def test_an_unencrypted_key_ignores_a_passphrase_file(tmp_path: Path, rsa_key, form):
    """A Kubernetes secret mount has a passphrase whether or not the key needs one."""
    install(tmp_path, pem(rsa_key, FORMS[form][0], None), b"unused\n")
    assert numbers(PrivateKeySource(tmp_path).get()) == numbers(rsa_key)


def test_a_passphrase_file_with_a_trailing_newline_opens_the_key(tmp_path: Path, rsa_key):
    install(tmp_path, pem(rsa_key, ser.PrivateFormat.TraditionalOpenSSL, PASSPHRASE), PASSPHRASE + b"\n")
    assert numbers(PrivateKeySource(tmp_path).get()) == numbers(rsa_key)


@pytest.mark.expected_skip("needs the openssl command")
@pytest.mark.parametrize("args", [["genrsa", "-aes256", "-traditional"], ["genrsa", "-aes256"]],
                         ids=["genrsa-aes256-traditional", "genrsa-aes256-pkcs8"])
def test_keys_made_by_openssl_genrsa_load(tmp_path: Path, args):
    """``openssl genrsa -aes256`` (OpenSSL 3 writes PKCS#8 unless -traditional, which is the Go runner's
    Proc-Type/DEK-Info form)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    key_file = tmp_path / "made.pem"
    subprocess.run(["openssl", *args, "-passout", f"pass:{PASSPHRASE.decode()}", "-out", str(key_file),
                    "2048"], check=True, capture_output=True)
    data = key_file.read_bytes()
    if "-traditional" in args:
        assert b"Proc-Type: 4,ENCRYPTED" in data and b"DEK-Info: AES-256-CBC" in data
    install(tmp_path / "enc", data, PASSPHRASE)
    assert PrivateKeySource(tmp_path / "enc").get().key_size == 2048


@pytest.mark.parametrize("form", ["pkcs1-legacy-encrypted", "pkcs8-encrypted"])
def test_a_wrong_passphrase_is_a_refusal_reason_that_names_no_secret(tmp_path: Path, rsa_key, form, caplog):
    caplog.set_level(logging.DEBUG)
    install(tmp_path, pem(rsa_key, FORMS[form][0], PASSPHRASE), b"not the passphrase")
    source = PrivateKeySource(tmp_path)
    with pytest.raises(RequestRefused, match="wrong passphrase") as caught:
        source.get()
    assert str(PRIVATE_KEY_FILE) in str(caught.value)
    for text in (str(caught.value), caplog.text):
        assert "not the passphrase" not in text and PASSPHRASE.decode() not in text
    assert "wrong passphrase" in caplog.text
    # remembered for the same files: no second key derivation per message
    with pytest.raises(RequestRefused):
        source.get()
    assert source.loads == 1
    (tmp_path / PASSPHRASE_FILE).write_bytes(PASSPHRASE)  # the secret is fixed: next message works
    assert numbers(source.get()) == numbers(rsa_key) and source.loads == 2


@pytest.mark.parametrize("setup,reason", [
    ("missing", "does not exist"),
    ("no-passphrase", "encrypted and there is no passphrase"),
    ("garbage", "not a readable private key"),
    ("ec", "not an RSA key"),
])
def test_unusable_private_keys_are_refusals(tmp_path: Path, rsa_key, setup, reason):
    if setup == "no-passphrase":
        install(tmp_path, pem(rsa_key, ser.PrivateFormat.PKCS8, PASSPHRASE), None)
    elif setup == "garbage":
        install(tmp_path, b"-----BEGIN RSA PRIVATE KEY-----\nbm90IGEga2V5\n-----END RSA PRIVATE KEY-----\n",
                None)
    elif setup == "ec":
        key = ec.generate_private_key(ec.SECP256R1())
        install(tmp_path, key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()),
                None)
    with pytest.raises(RequestRefused, match=reason):
        PrivateKeySource(tmp_path).get()


def test_the_private_key_is_read_lazily_and_again_when_it_changes(tmp_path: Path, rsa_key):
    source = PrivateKeySource(tmp_path / "absent")  # nothing there: constructing it must not fail
    assert source.loads == 0
    install(tmp_path / "absent", pem(rsa_key, ser.PrivateFormat.PKCS8, None), None)
    first = source.get()
    assert source.get() is first and source.loads == 1  # unchanged files: not read again
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    install(tmp_path / "absent", pem(other, ser.PrivateFormat.TraditionalOpenSSL, PASSPHRASE), PASSPHRASE)
    assert numbers(source.get()) == numbers(other) and source.loads == 2


# --- key directories --------------------------------------------------------------------------------------


def ed_line(key: Ed25519PrivateKey, comment: str = "user@host") -> str:
    blob = key.public_key().public_bytes(ser.Encoding.OpenSSH, ser.PublicFormat.OpenSSH).decode()
    return f"{blob} {comment}\n"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fp(found) -> str | None:
    return None if found is None else crypto.fingerprint(found.key)


def test_lookup_is_exact_name_then_longest_prefix(tmp_path: Path, caplog):
    keys = {name: Ed25519PrivateKey.generate() for name in ("rmq_", "rmq_cpu_", "rmq_cpu_andrei", "sqs_")}
    for name, key in keys.items():
        (tmp_path / name).write_text(ed_line(key))
    (tmp_path / ".hidden_rmq_cpu_andrei_x").write_text(ed_line(Ed25519PrivateKey.generate()))
    (tmp_path / "rmq_cpu_andrei_x").mkdir()  # a subdirectory is not a key
    (tmp_path / "info").write_text("placeholder\n")
    (tmp_path / "rmq_bad").write_text("ssh-rsa AAAAB3NzaC1yc2E= someone\n")
    linked = Ed25519PrivateKey.generate()
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "k").write_text(ed_line(linked))
    (tmp_path / "local_").symlink_to(tmp_path / "target" / "k")  # secret mounts are symlinks
    directory = KeyDirectory(tmp_path, parse_signature_key, "request signature")
    expect = {
        "rmq_cpu_andrei": "rmq_cpu_andrei", "rmq_cpu_andrei_x": "rmq_cpu_andrei", "rmq_cpu_bob": "rmq_cpu_",
        "rmq_gpu": "rmq_", "rmq_bad_queue": "rmq_", "sqs_x": "sqs_", "local_q": "local_",
    }
    for queue, name in expect.items():
        found = directory.lookup(queue)
        assert found is not None and found.name == name, queue
    assert fp(directory.lookup("local_q")) == crypto.fingerprint(linked.public_key())
    assert fp(directory.lookup("rmq_cpu_bob")) == crypto.fingerprint(keys["rmq_cpu_"].public_key())
    assert directory.lookup("rm") is None and directory.lookup("info_queue") is None
    assert "rmq_bad ignored" in caplog.text and str(tmp_path / "info") not in caplog.text


def test_keys_added_changed_and_removed_at_run_time_take_effect(tmp_path: Path):
    clock = Clock()
    directory = KeyDirectory(tmp_path, parse_signature_key, "request signature", rescan_interval=5.0,
                             clock=clock)
    assert directory.lookup("rmq_q") is None
    first, second = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    (tmp_path / "rmq_").write_text(ed_line(first))  # a new file changes the directory: seen at once
    assert fp(directory.lookup("rmq_q")) == crypto.fingerprint(first.public_key())
    scans = directory.scans
    for _ in range(100):  # unchanged directory within the interval: one stat per lookup, no rescan
        directory.lookup("rmq_q")
    assert directory.scans == scans
    (tmp_path / "rmq_").write_text(ed_line(second))  # edited in place: the directory did not change
    os.utime(tmp_path / "rmq_", ns=(1, 1))
    clock.now += 5.0
    assert fp(directory.lookup("rmq_q")) == crypto.fingerprint(second.public_key())
    (tmp_path / "rmq_").unlink()
    assert directory.lookup("rmq_q") is None


def test_a_missing_directory_has_no_keys_and_later_ones_are_found(tmp_path: Path):
    directory = KeyDirectory(tmp_path / "later", parse_signature_key, "request signature")
    assert directory.lookup("rmq_x") is None
    (tmp_path / "later").mkdir()
    key = Ed25519PrivateKey.generate()
    (tmp_path / "later" / "rmq_x").write_text(ed_line(key))
    assert fp(directory.lookup("rmq_x")) == crypto.fingerprint(key.public_key())


def test_response_keys_load_pkcs1_and_spki_and_follow_the_prefix_rule(tmp_path: Path, rsa_key):
    responses = tmp_path / "responses"
    responses.mkdir()
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (responses / "rmq_").write_bytes(rsa_key.public_key().public_bytes(ser.Encoding.PEM,
                                                                       ser.PublicFormat.PKCS1))
    (responses / "rmq_team_").write_bytes(other.public_key().public_bytes(
        ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo))
    (responses / "sqs_").write_text(ed_line(Ed25519PrivateKey.generate()))  # not an RSA PEM: ignored
    ring = Keyring(tmp_path / "enc", tmp_path / "signing", responses)
    found = ring.response_key("rmq_other")
    assert found is not None and found.public_numbers() == rsa_key.public_key().public_numbers()
    found = ring.response_key("rmq_team_a")
    assert found is not None and found.public_numbers() == other.public_key().public_numbers()
    assert ring.response_key("sqs_x") is None and ring.response_key("local_x") is None
    with pytest.raises(ValueError, match="not an RSA public key"):
        parse_response_key(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
            ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo))

"""The envelope primitives (studio_runner.crypto) against independent constructions: cryptography's own OAEP
with other hash choices, SSH wire-format signatures, ``ssh-keygen``'s fingerprint. Envelopes from the real
StudioML client are in test_encrypted_requests.py."""

from __future__ import annotations

import base64
import shutil
import struct
import subprocess
from pathlib import Path

import nacl.secret
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from studio_runner import crypto
from studio_runner.errors import RequestInvalid, RequestRefused


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def signer() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def flip(text: str, part: int, index: int) -> str:
    """``payload`` with one byte of its ``part`` (0 wrapped key, 1 sealed box) inverted, re-encoded."""
    parts = text.split(",")
    raw = bytearray(base64.b64decode(parts[part]))
    raw[index] ^= 0xFF
    parts[part] = base64.b64encode(bytes(raw)).decode()
    return ",".join(parts)


def test_seal_and_sign_round_trip_through_decrypt_and_verify(rsa_key, signer):
    clear = b'{"experiment": {"key": "k\\u00e9"}, "config": {}}'
    payload = crypto.seal(rsa_key.public_key(), clear)
    wrapped, sealed = crypto.split_payload(payload)
    assert len(wrapped) == 256 and len(sealed) == len(clear) + 40  # spec: nonce 24 + MAC 16
    crypto.verify(signer.public_key(), payload, crypto.sign(signer, payload))
    assert crypto.decrypt_payload(rsa_key, payload) == clear


@pytest.mark.parametrize("part,index,reason", [
    (1, 0, "fails its authentication"),      # nonce
    (1, 30, "fails its authentication"),     # MAC
    (1, -1, "fails its authentication"),     # ciphertext
    (0, 0, "does not decrypt"),
    (0, -1, "does not decrypt"),
])
def test_one_flipped_byte_anywhere_is_refused(rsa_key, part, index, reason):
    payload = crypto.seal(rsa_key.public_key(), b'{"experiment": {}}')
    with pytest.raises(RequestRefused, match=reason):
        crypto.decrypt_payload(rsa_key, flip(payload, part, index))


@pytest.mark.parametrize("oaep", [
    padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None),
    padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA256(), label=None),  # MGF1 matters
    padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=b"studio"),
], ids=["sha1", "mgf1-sha1", "label"])
def test_only_oaep_sha256_with_mgf1_sha256_and_no_label_unwraps(rsa_key, oaep):
    key = bytes(range(32))
    sealed = bytes(nacl.secret.SecretBox(key).encrypt(b"{}"))
    good = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    assert crypto.unwrap_key(rsa_key, rsa_key.public_key().encrypt(key, good)) == key
    other = base64.b64encode(rsa_key.public_key().encrypt(key, oaep)).decode()
    with pytest.raises(RequestRefused, match="does not decrypt"):
        crypto.decrypt_payload(rsa_key, f"{other},{base64.b64encode(sealed).decode()}")


def test_a_wrapped_key_that_is_not_32_bytes_is_refused(rsa_key):
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    wrapped = rsa_key.public_key().encrypt(bytes(16), oaep)
    with pytest.raises(RequestRefused, match="16 bytes, not 32"):
        crypto.unwrap_key(rsa_key, wrapped)


@pytest.mark.parametrize("payload,reason", [
    ("AAAA", "found 1 part"),
    ("AAAA,AAAA,AAAA", "found 3 part"),
    ("AA A,AAAA", "wrapped key .* not valid base64"),
    ("AAAA,AAA", "sealed request .* not valid base64"),  # missing padding: the client always pads
    ("AAAA,é", "not valid base64"),
    ("AAAA," + base64.b64encode(bytes(39)).decode(), "shorter than its nonce and MAC"),
    ("\ud800,AAAA", "not valid base64"),
])
def test_malformed_payloads_are_refused_with_the_part_named(rsa_key, payload, reason):
    with pytest.raises(RequestRefused, match=reason) as caught:
        crypto.decrypt_payload(rsa_key, payload)
    assert isinstance(caught.value, RequestInvalid)  # the supervisor's set-aside path catches it


def test_wrapped_key_for_another_key_size_is_refused_before_rsa(rsa_key):
    other = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    payload = crypto.seal(other.public_key(), b"{}")
    with pytest.raises(RequestRefused, match="128 bytes; this runner's 2048-bit key needs 256"):
        crypto.decrypt_payload(rsa_key, payload)


def test_signature_raw_and_ssh_wire_format_both_verify(signer):
    payload = "d3JhcHBlZA==,c2VhbGVk"
    raw = signer.sign(payload.encode())
    crypto.verify(signer.public_key(), payload, base64.b64encode(raw).decode())
    wire = struct.pack(">I", 11) + b"ssh-ed25519" + struct.pack(">I", 64) + raw
    crypto.verify(signer.public_key(), payload, base64.b64encode(wire).decode())
    with pytest.raises(RequestRefused, match="83 bytes, not a 64-byte"):  # wire format, wrong type name
        bad = struct.pack(">I", 11) + b"ssh-ed25518" + struct.pack(">I", 64) + raw
        crypto.verify(signer.public_key(), payload, base64.b64encode(bad).decode())


@pytest.mark.parametrize("mutate,reason", [
    (lambda sig, p: base64.b64encode(bytes([sig[0] ^ 1]) + sig[1:]).decode(), "does not verify"),
    (lambda sig, p: base64.b64encode(sig[:63]).decode(), "63 bytes, not a 64-byte"),
    (lambda sig, p: "not base64!", "not valid base64"),
    # signed over the decoded bytes instead of the payload string: not what the client does
    (lambda sig, p: base64.b64encode(Ed25519PrivateKey.generate().sign(p.encode())).decode(), "not verify"),
])
def test_bad_signatures_are_refused(signer, mutate, reason):
    payload = crypto.seal(rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key(), b"{}")
    sig = signer.sign(payload.encode())
    with pytest.raises(RequestRefused, match=reason):
        crypto.verify(signer.public_key(), payload, mutate(sig, payload))


def test_the_signature_covers_the_whole_payload_string_including_the_comma(signer):
    payload = "QUJD,REVG"
    signature = crypto.sign(signer, payload)
    with pytest.raises(RequestRefused):
        crypto.verify(signer.public_key(), "QUJDREVG", signature)
    with pytest.raises(RequestRefused):
        crypto.verify(signer.public_key(), payload + ",", signature)


@pytest.mark.expected_skip("needs ssh-keygen (openssh-client)")
def test_fingerprint_matches_ssh_keygen(tmp_path: Path, signer):
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen is not installed")
    line = signer.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                            serialization.PublicFormat.OpenSSH)
    (tmp_path / "key.pub").write_bytes(line + b" someone@example\n")
    out = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(tmp_path / "key.pub")],
                         capture_output=True, text=True, check=True).stdout
    assert out.split()[1] == crypto.fingerprint(signer.public_key())
    assert not crypto.fingerprint(signer.public_key()).endswith("=")


def test_authorized_key_lines(signer):
    blob = signer.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                            serialization.PublicFormat.OpenSSH).decode()
    expected = crypto.fingerprint(signer.public_key())
    for text in (blob, f"{blob} user@host\n", f"# a comment\n\n{blob} c", f'from="10.0.0.1" {blob} c'):
        assert crypto.fingerprint(crypto.parse_authorized_key(text)) == expected
    rsa_line = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    for bad in (rsa_line, "", "# only a comment\n", "ssh-ed25519", "ssh-ed25519 AAAAnotakey"):
        with pytest.raises(ValueError):
            crypto.parse_authorized_key(bad)

"""The StudioML request envelope, byte for byte (../shared/spec/message.md §7), with no file or key-store I/O.

What the studioml 0.0.49 client (``EncryptedPayloadBuilder``) sends when its configuration has
``public_key_path``::

    payload     = b64(RSA-OAEP(runner key, k)) "," b64(nonce ‖ SecretBox(k).encrypt(clear request))
    signature   = b64(Ed25519 signature over payload.encode("utf-8"))      (raw 64 bytes)
    fingerprint = "SHA256:" b64(sha256(ssh wire blob of the signing key)) without "=" padding

OAEP uses SHA-256 for the hash *and* MGF1, with an empty label. The Go runner also accepts a signature in SSH
wire format (``string "ssh-ed25519", string sig``); so do we. Every failure is a
:class:`~studio_runner.errors.RequestRefused` whose reason names the part that failed and never holds key
material or plaintext. :func:`seal` and :func:`sign` are the sending side, for tests and for the encrypted
``_response`` reports that use the same construction.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct

import nacl.exceptions
import nacl.secret
import nacl.utils
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

from studio_runner.errors import RequestRefused

KEY_SIZE = nacl.secret.SecretBox.KEY_SIZE  # 32
NONCE_SIZE = nacl.secret.SecretBox.NONCE_SIZE  # 24
MAC_SIZE = nacl.secret.SecretBox.MACBYTES  # 16
SIGNATURE_SIZE = 64
SSH_ED25519 = b"ssh-ed25519"


def _oaep() -> padding.OAEP:
    return padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def b64decode_strict(text: str, what: str) -> bytes:
    """Standard alphabet with padding, nothing else (the client's ``base64.b64encode``; Go's StdEncoding)."""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise RequestRefused(f"{what} is not valid base64", field="message") from None


def split_payload(payload: str) -> tuple[bytes, bytes]:
    """``payload`` -> (wrapped key, sealed box), both decoded; exactly one comma, as the client writes it."""
    parts = payload.split(",")
    if len(parts) != 2:
        raise RequestRefused(f"message.payload must be two base64 parts joined by one comma, found "
                             f"{len(parts)} part(s)", field="message.payload")
    wrapped = b64decode_strict(parts[0], "the wrapped key (message.payload before the comma)")
    sealed = b64decode_strict(parts[1], "the sealed request (message.payload after the comma)")
    if len(sealed) < NONCE_SIZE + MAC_SIZE:
        raise RequestRefused(f"the sealed request is {len(sealed)} bytes, shorter than its nonce and MAC",
                             field="message.payload")
    return wrapped, sealed


def unwrap_key(private_key: RSAPrivateKey, wrapped: bytes) -> bytes:
    """RSA-OAEP(SHA-256, MGF1-SHA-256, empty label) decryption of the one-time SecretBox key."""
    if len(wrapped) != private_key.key_size // 8:
        bits = private_key.key_size
        raise RequestRefused(f"the wrapped key is {len(wrapped)} bytes; this runner's {bits}-bit key needs "
                             f"{bits // 8} (encrypted for another runner?)", field="message.payload")
    try:
        key = private_key.decrypt(wrapped, _oaep())
    except ValueError:
        raise RequestRefused("the wrapped key does not decrypt with this runner's private key (tampered, or "
                             "encrypted for another runner's public key)", field="message.payload") from None
    if len(key) != KEY_SIZE:
        raise RequestRefused(f"the unwrapped key is {len(key)} bytes, not {KEY_SIZE}",
                             field="message.payload")
    return key


def open_sealed(key: bytes, sealed: bytes) -> bytes:
    """Open ``nonce ‖ XSalsa20-Poly1305`` (NaCl SecretBox); a flipped bit anywhere fails the MAC."""
    try:
        return bytes(nacl.secret.SecretBox(key).decrypt(sealed))
    except nacl.exceptions.CryptoError:
        raise RequestRefused("the sealed request fails its authentication (tampered or truncated)",
                             field="message.payload") from None


def decrypt_payload(private_key: RSAPrivateKey, payload: str) -> bytes:
    """The clear request's bytes (UTF-8 JSON) inside ``message.payload``."""
    wrapped, sealed = split_payload(payload)
    return open_sealed(unwrap_key(private_key, wrapped), sealed)


def _ssh_string(data: bytes, offset: int) -> tuple[bytes, int]:
    if offset + 4 > len(data):
        raise ValueError("truncated length")
    (length,) = struct.unpack_from(">I", data, offset)
    end = offset + 4 + length
    if end > len(data):
        raise ValueError("truncated string")
    return data[offset + 4:end], end


def signature_bytes(signature: str) -> bytes:
    """The 64-byte Ed25519 signature in ``message.signature``: SSH wire format first (as Go tries it), else
    the raw value the client sends."""
    blob = b64decode_strict(signature, "message.signature")
    try:
        kind, offset = _ssh_string(blob, 0)
        raw, offset = _ssh_string(blob, offset)
        if kind == SSH_ED25519 and offset == len(blob) and len(raw) == SIGNATURE_SIZE:
            return raw
    except ValueError:
        pass
    if len(blob) != SIGNATURE_SIZE:
        raise RequestRefused(f"message.signature is {len(blob)} bytes, not a {SIGNATURE_SIZE}-byte Ed25519 "
                             "signature", field="message.signature")
    return blob


def verify(public_key: Ed25519PublicKey, payload: str, signature: str) -> None:
    """Check ``signature`` over the payload string's UTF-8 bytes (comma included)."""
    raw = signature_bytes(signature)
    try:
        public_key.verify(raw, payload.encode("utf-8", "surrogatepass"))
    except InvalidSignature:
        raise RequestRefused("message.signature does not verify", field="message.signature") from None


def ssh_blob(public_key: Ed25519PublicKey) -> bytes:
    """SSH wire encoding ``string "ssh-ed25519", string key`` (what fingerprints hash)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return struct.pack(">I", len(SSH_ED25519)) + SSH_ED25519 + struct.pack(">I", len(raw)) + raw


def fingerprint(public_key: Ed25519PublicKey) -> str:
    """``SHA256:…`` exactly as ``ssh-keygen -l -E sha256`` and the client print it."""
    digest = hashlib.sha256(ssh_blob(public_key)).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def parse_authorized_key(text: str) -> Ed25519PublicKey:
    """The first key line of an authorized_keys text (``ssh-ed25519 AAAA… comment``; options before the type
    are skipped). Other key types are refused: the envelope is always signed with Ed25519."""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if "ssh-ed25519" not in fields or fields.index("ssh-ed25519") + 1 >= len(fields):
            raise ValueError(f"not an ssh-ed25519 key line (type {fields[0][:40]!r})")
        at = fields.index("ssh-ed25519")
        key = serialization.load_ssh_public_key(f"ssh-ed25519 {fields[at + 1]}".encode("ascii"))
        if not isinstance(key, Ed25519PublicKey):  # pragma: no cover - the type word decides the class
            raise ValueError("not an Ed25519 key")
        return key
    raise ValueError("no key line")


# --- the sending side -------------------------------------------------------------------------------------


def seal(recipient: RSAPublicKey, plaintext: bytes) -> str:
    """``message.payload`` for ``plaintext``, as the client builds it (fresh key and nonce every call)."""
    key = nacl.utils.random(KEY_SIZE)
    sealed = bytes(nacl.secret.SecretBox(key).encrypt(plaintext))
    wrapped = recipient.encrypt(key, _oaep())
    return base64.b64encode(wrapped).decode("ascii") + "," + base64.b64encode(sealed).decode("ascii")


def sign(signer: Ed25519PrivateKey, payload: str) -> str:
    """``message.signature``: raw Ed25519 over the payload's UTF-8 bytes, base64."""
    return base64.b64encode(signer.sign(payload.encode("utf-8"))).decode("ascii")

"""Encrypted, signed StudioML envelopes built in the test, exactly as ../shared/spec/message.md §7 says.

Written from the spec with cryptography and PyNaCl, not with studio_runner.crypto, so a test that opens these
envelopes with the runner checks the runner against the spec rather than against itself. Every part (key,
nonce, wrapped key, sealed box, signature) can be given or taken apart, for tests that damage one of them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.secret
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

PASSPHRASE = b"fuzz passphrase, not a secret"


def oaep() -> padding.OAEP:
    """RSA-OAEP with SHA-256 as hash and MGF1 hash, empty label (spec §7 step 3)."""
    return padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass(frozen=True)
class KeySet:
    """The runner's RSA key pair and one experimenter's Ed25519 signing key."""

    rsa_key: rsa.RSAPrivateKey
    signer: Ed25519PrivateKey

    @classmethod
    def generate(cls, rsa_bits: int = 2048) -> KeySet:
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits),
                   Ed25519PrivateKey.generate())

    @property
    def authorized_key(self) -> str:
        """The ``ssh-ed25519 AAAA… comment`` line a runner keeps per queue-name prefix (queues.md §5)."""
        line = self.signer.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH).decode("ascii")
        return f"{line} fuzz@test\n"

    @property
    def fingerprint(self) -> str:
        """``SHA256:`` + unpadded b64 of sha256(SSH wire blob) (spec §7 step 6)."""
        raw = self.signer.public_key().public_bytes(serialization.Encoding.Raw,
                                                    serialization.PublicFormat.Raw)
        blob = struct.pack(">I", 11) + b"ssh-ed25519" + struct.pack(">I", len(raw)) + raw
        return "SHA256:" + b64(hashlib.sha256(blob).digest()).rstrip("=")

    def write_runner_keys(self, encrypt_dir: Path, signatures_dir: Path, prefix: str) -> None:
        """The Kubernetes-secret layout (``encryption/ssh-privatekey`` + ``passphrase/ssh-passphrase``), the
        private key in the legacy ``Proc-Type: 4,ENCRYPTED`` PKCS#1 form the Go runner requires, and the
        signing key's public line under ``signatures_dir/<prefix>``."""
        (encrypt_dir / "encryption").mkdir(parents=True, exist_ok=True)
        (encrypt_dir / "passphrase").mkdir(parents=True, exist_ok=True)
        pem = self.rsa_key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.TraditionalOpenSSL,
                                         serialization.BestAvailableEncryption(PASSPHRASE))
        (encrypt_dir / "encryption" / "ssh-privatekey").write_bytes(pem)
        (encrypt_dir / "passphrase" / "ssh-passphrase").write_bytes(PASSPHRASE)
        signatures_dir.mkdir(parents=True, exist_ok=True)
        (signatures_dir / prefix).write_text(self.authorized_key)

    def wrap(self, key: bytes) -> bytes:
        return self.rsa_key.public_key().encrypt(key, oaep())

    def sign(self, payload: str | bytes) -> str:
        data = payload.encode("utf-8", "surrogatepass") if isinstance(payload, str) else payload
        return b64(self.signer.sign(data))


def seal_parts(keys: KeySet, clear: bytes, key: bytes, nonce: bytes) -> tuple[bytes, bytes]:
    """(wrapped key, sealed box) for ``clear``: spec §7 steps 2-3 with the given key and nonce."""
    sealed = bytes(nacl.secret.SecretBox(key).encrypt(clear, nonce))
    return keys.wrap(key), sealed


def header(clear_doc: Any) -> dict[str, Any]:
    """The advisory clear header the client copies from the experiment (``experiment_lifetime`` is its
    ``max_duration``: a client bug the spec records)."""
    experiment = clear_doc.get("experiment") if isinstance(clear_doc, dict) else None
    experiment = experiment if isinstance(experiment, dict) else {}
    return {
        "experiment": {"status": experiment.get("status"), "pythonver": experiment.get("pythonver")},
        "time_added": experiment.get("time_added"),
        "experiment_lifetime": experiment.get("max_duration"),
        "resources_needed": experiment.get("resources_needed"),
    }


def envelope(keys: KeySet, clear: bytes, key: bytes, nonce: bytes) -> dict[str, Any]:
    """The whole ``{"message": {...}}`` document for the clear request bytes ``clear``."""
    wrapped, sealed = seal_parts(keys, clear, key, nonce)
    payload = b64(wrapped) + "," + b64(sealed)
    try:
        doc = json.loads(clear)
    except ValueError:
        doc = None
    message = header(doc)
    message.update(payload=payload, signature=keys.sign(payload), fingerprint=keys.fingerprint)
    return {"message": message}

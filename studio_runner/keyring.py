"""The runner's keys: its RSA private key for encrypted requests and the per-queue key directories.

* ``<encrypt-dir>/encryption/ssh-privatekey``, passphrase in ``<encrypt-dir>/passphrase/ssh-passphrase`` (the
  Kubernetes secret mounts of spec/options.md). PKCS#1 (``RSA PRIVATE KEY``, also with the legacy
  ``Proc-Type: 4,ENCRYPTED`` / ``DEK-Info`` encryption the Go runner requires) and PKCS#8 (``PRIVATE KEY``,
  ``ENCRYPTED PRIVATE KEY``), encrypted or not; unencrypted OpenSSH RSA keys too. Read on the first envelope,
  not at start-up (a runner that only sees clear text needs no key), and again when either file changes, so
  a rotated secret takes effect without a restart. A key that cannot be read is a refusal reason for the
  message, never a crash; the passphrase appears in no message.
* Key directories (spec/queues.md §5): each regular file is one key and its name is a queue-name prefix; the
  exact name wins, else the longest prefix. Hidden files and subdirectories are ignored, symlinks followed, an
  unreadable ``info`` file is a tolerated placeholder. The directory is stat'ed at most once per lookup and
  rescanned when its listing changed or every ``rescan_interval`` seconds (a key edited in place does not
  change the directory), so keys added, changed or removed take effect for the next message.
  ``--request-signatures-dir`` holds Ed25519 authorized_keys lines; ``--response-signatures-dir`` RSA public
  keys (PEM) that encrypt ``_response`` reports.

Thread-safe: the supervisor opens large or encrypted messages in worker threads.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

from studio_runner import crypto
from studio_runner.errors import RequestRefused

log = logging.getLogger("studio_runner.keyring")

PRIVATE_KEY_FILE = Path("encryption") / "ssh-privatekey"
PASSPHRASE_FILE = Path("passphrase") / "ssh-passphrase"
MAX_KEY_FILE = 1 << 20
"""Key files larger than this are not keys (and are not read whole)."""

K = TypeVar("K")
_Stamp = tuple[int, int, int] | None
"""(inode, size, mtime_ns) of a file, None when it does not exist: what "changed" means here."""


def _stamp(path: Path) -> _Stamp:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _read_small(path: Path) -> bytes:
    with open(path, "rb") as handle:
        data = handle.read(MAX_KEY_FILE + 1)
    if len(data) > MAX_KEY_FILE:
        raise ValueError(f"larger than {MAX_KEY_FILE} bytes")
    return data


# --- the runner's private key ------------------------------------------------------------------------------


def load_private_key(data: bytes, passphrase: bytes | None) -> RSAPrivateKey:
    """An RSA private key from PEM (PKCS#1, legacy-encrypted PKCS#1, PKCS#8) or OpenSSH text.

    The passphrase is used only when the key is encrypted (a Kubernetes secret often holds one for every
    key); with a trailing newline it is tried as written, then without. Raises ValueError with a reason that
    holds no secret.
    """
    openssh = data.lstrip().startswith(b"-----BEGIN OPENSSH")
    loader = serialization.load_ssh_private_key if openssh else serialization.load_pem_private_key
    try:
        key = loader(data, None)
    except TypeError:  # encrypted: needs the passphrase
        if not passphrase:
            raise ValueError(f"it is encrypted and there is no passphrase ({PASSPHRASE_FILE})") from None
        key = _decrypt(loader, data, passphrase)
    except Exception as exc:  # ValueError for bad data, UnsupportedAlgorithm for odd ciphers
        raise ValueError(f"not a readable private key ({_short(exc)})") from None
    if not isinstance(key, RSAPrivateKey):
        raise ValueError(f"not an RSA key ({type(key).__name__})")
    return key


def _decrypt(loader: Callable[[bytes, bytes | None], Any], data: bytes, passphrase: bytes) -> Any:
    stripped = passphrase.rstrip(b"\r\n")
    for password in dict.fromkeys((passphrase, stripped)):
        if not password:
            continue
        try:
            return loader(data, password)
        except ValueError:
            continue
        except Exception as exc:  # UnsupportedAlgorithm: a cipher (or KDF) this build lacks
            raise ValueError(f"its encryption cannot be read here ({_short(exc)})") from None
    raise ValueError(f"the passphrase ({PASSPHRASE_FILE}) does not decrypt it (wrong passphrase)")


def _short(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:120]


class PrivateKeySource:
    """The runner's RSA private key from ``--encrypt-dir``, loaded on first use and whenever its files change.

    A failure is remembered for the same file versions, so a bad key costs one attempt (and one error line)
    per change, not one slow key derivation per message.
    """

    def __init__(self, encrypt_dir: Path) -> None:
        self.encrypt_dir = encrypt_dir
        self.key_path = encrypt_dir / PRIVATE_KEY_FILE
        self.passphrase_path = encrypt_dir / PASSPHRASE_FILE
        self._lock = threading.Lock()
        self._stamps: tuple[_Stamp, _Stamp] | None = None
        self._key: RSAPrivateKey | None = None
        self._error = ""
        self.loads = 0
        """How many times the files were (re)read: for tests and the status page."""

    def get(self) -> RSAPrivateKey:
        """The key, or RequestRefused saying why there is none (missing file, wrong passphrase...)."""
        with self._lock:
            stamps = (_stamp(self.key_path), _stamp(self.passphrase_path))
            if stamps != self._stamps:
                self._stamps = stamps
                self._load(stamps[0] is not None)
            if self._key is None:
                raise RequestRefused(f"encrypted request, but this runner has no usable private key: "
                                     f"{self._error}", field="message.payload")
            return self._key

    def _load(self, exists: bool) -> None:
        self.loads += 1
        self._key, self._error = None, ""
        if not exists:
            self._error = f"{self.key_path} does not exist (see --encrypt-dir)"
            log.error("%s", self._error)
            return
        try:
            data = _read_small(self.key_path)
            passphrase = _read_small(self.passphrase_path) if self.passphrase_path.exists() else None
            self._key = load_private_key(data, passphrase)
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self._error = f"{self.key_path}: {reason}"
            log.error("cannot load the private key for encrypted requests: %s", self._error)
            return
        log.info("loaded the %d-bit RSA key for encrypted requests from %s", self._key.key_size,
                 self.key_path)


# --- key directories ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NamedKey(Generic[K]):
    """A key and the file (queue-name prefix) it came from."""

    name: str
    key: K
    path: Path


class KeyDirectory(Generic[K]):
    """Keys by queue-name prefix, one file each, kept in step with the directory (see the module doc)."""

    def __init__(self, directory: Path, parse: Callable[[bytes], K], kind: str,
                 rescan_interval: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.directory = directory
        self.kind = kind
        self.rescan_interval = rescan_interval
        self._parse = parse
        self._clock = clock
        self._lock = threading.Lock()
        self._dir_stamp: _Stamp = None
        self._scanned_at: float | None = None
        self._files: dict[str, tuple[_Stamp, NamedKey[K] | None]] = {}
        self.scans = 0

    def lookup(self, queue: str) -> NamedKey[K] | None:
        """The key for ``queue``: the file named exactly ``queue``, else the longest name that prefixes it."""
        keys = self.keys()
        if queue in keys:
            return keys[queue]
        best = max((name for name in keys if queue.startswith(name)), key=len, default=None)
        return keys[best] if best is not None else None

    def keys(self) -> dict[str, NamedKey[K]]:
        """Every usable key now, by file name (rescanning first if due)."""
        with self._lock:
            now = self._clock()
            stamp = _stamp(self.directory)
            due = self._scanned_at is None or now - self._scanned_at >= self.rescan_interval
            if due or stamp != self._dir_stamp:
                self._dir_stamp, self._scanned_at = stamp, now
                self._rescan()
            return {name: key for name, (_, key) in self._files.items() if key is not None}

    def _rescan(self) -> None:
        self.scans += 1
        try:
            names = [e.name for e in os.scandir(self.directory) if not e.name.startswith(".")]
        except OSError:
            names = []
        seen: dict[str, tuple[_Stamp, NamedKey[K] | None]] = {}
        for name in names:
            path = self.directory / name
            try:
                if not path.is_file():  # subdirectories (and the secret mounts' ..data links) are not keys
                    continue
            except OSError:
                continue
            stamp = _stamp(path)
            old = self._files.get(name)
            if old is not None and old[0] == stamp:
                seen[name] = old
                continue
            seen[name] = (stamp, self._load(name, path))
        for name in self._files.keys() - seen.keys():
            log.info("%s key %s removed", self.kind, self.directory / name)
        self._files = seen

    def _load(self, name: str, path: Path) -> NamedKey[K] | None:
        try:
            key = self._parse(_read_small(path))
        except Exception as exc:  # OSError, ValueError, cryptography's UnsupportedAlgorithm: never fatal
            if name != "info":  # the tolerated placeholder
                log.warning("%s key file %s ignored: %s", self.kind, path, _short(exc))
            return None
        log.info("%s key for queues starting %r loaded from %s", self.kind, name, path)
        return NamedKey(name, key, path)


def parse_signature_key(data: bytes) -> Ed25519PublicKey:
    """An authorized_keys line of type ssh-ed25519."""
    return crypto.parse_authorized_key(data.decode("utf-8"))


def parse_response_key(data: bytes) -> RSAPublicKey:
    """A PEM RSA public key: PKCS#1 (``RSA PUBLIC KEY``, what StudioML hands out) or SubjectPublicKeyInfo."""
    try:
        key = serialization.load_pem_public_key(data)
    except Exception as exc:
        raise ValueError(f"not a PEM public key ({_short(exc)})") from None
    if not isinstance(key, RSAPublicKey):
        raise ValueError("not an RSA public key")
    return key


class Keyring:
    """Everything the intake needs to open envelopes, and the response-report keys, all read lazily."""

    def __init__(self, encrypt_dir: Path, request_signatures_dir: Path, response_signatures_dir: Path,
                 rescan_interval: float = 2.0) -> None:
        self.private = PrivateKeySource(encrypt_dir)
        self.signatures: KeyDirectory[Ed25519PublicKey] = KeyDirectory(
            request_signatures_dir, parse_signature_key, "request signature", rescan_interval)
        self.responses: KeyDirectory[RSAPublicKey] = KeyDirectory(
            response_signatures_dir, parse_response_key, "response encryption", rescan_interval)

    def private_key(self) -> RSAPrivateKey:
        return self.private.get()

    def signature_key(self, queue: str) -> NamedKey[Ed25519PublicKey] | None:
        return self.signatures.lookup(queue)

    def response_key(self, queue: str) -> RSAPublicKey | None:
        """The RSA key that encrypts reports for ``queue``'s ``_response`` queue (None: send them clear)."""
        found = self.responses.lookup(queue)
        return found.key if found is not None else None

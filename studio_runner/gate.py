"""The intake gate: a message's bytes in, a parsed :class:`~studio_runner.request.Request` out, or a refusal.

Order matters, cheapest and most defensive first:

1. Size: a body over ``--max-message-size`` is refused before a byte of it is parsed.
2. JSON decode (request.decode_body). Not JSON -> RequestInvalid.
3. Clear request: refused when ``--clear-text-messages`` is false, else parsed as it is.
4. Envelope (spec/message.md §7): ``signature`` and ``fingerprint`` must be present; the verification key is
   the one in ``--request-signatures-dir`` whose file name is the queue name or its longest prefix; the
   signature over the payload string is checked *before* any RSA work (an unsigned stranger cannot make us
   decrypt); then the one-time key is unwrapped with the runner's private key, the SecretBox opened, and the
   plaintext parsed as a clear request. The clear header (status, pythonver, resources) is ignored from then
   on: the decrypted body is what runs.

Every refusal is a :class:`~studio_runner.errors.RequestRefused` (a RequestInvalid, so the supervisor sets it
aside once); reasons name the failing part, never a secret. A fingerprint that does not match the queue's key
is only logged, as in the Go runner: the signature decides.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from studio_runner import crypto
from studio_runner.errors import RequestRefused
from studio_runner.keyring import Keyring
from studio_runner.request import Request, decode_body, is_envelope, parse_document
from studio_runner.units import format_size

log = logging.getLogger("studio_runner.gate")

DEFAULT_MAX_MESSAGE_SIZE = 4 << 20
"""The documented default of ``--max-message-size`` (4 MiB)."""


class RequestGate:
    """Turns message bodies into requests for one runner's security settings (thread-safe)."""

    def __init__(self, *, clear_text: bool = True, max_size: int = DEFAULT_MAX_MESSAGE_SIZE,
                 keyring: Keyring | None = None) -> None:
        self.clear_text = clear_text
        self.max_size = max_size
        self.keyring = keyring

    def costly(self, body: bytes | str) -> bool:
        """Whether opening ``body`` may take milliseconds (RSA, a first key load): run it in a thread."""
        if self.keyring is None:
            return False
        if isinstance(body, str):
            return '"payload"' in body
        return b'"payload"' in body

    def open(self, body: bytes | str, queue: str) -> Request:
        """The request in ``body`` received on ``queue``; RequestRefused / RequestInvalid say why not."""
        size = len(body.encode("utf-8", "surrogatepass")) if isinstance(body, str) else len(body)
        if size > self.max_size:
            raise RequestRefused(f"the message is {format_size(size)} ({size} bytes), larger than "
                                 f"--max-message-size {format_size(self.max_size)}; not parsed")
        doc = decode_body(body)
        if isinstance(doc, dict) and is_envelope(doc):
            return parse_document(decode_body(self._unseal(doc["message"], queue)))
        if not self.clear_text:
            raise RequestRefused("a clear-text request, and --clear-text-messages is false: only encrypted "
                                 "and signed requests run here")
        return parse_document(doc)

    def _unseal(self, message: Mapping[str, Any], queue: str) -> bytes:
        payload, signature, claimed = (message.get(k) for k in ("payload", "signature", "fingerprint"))
        if not isinstance(payload, str) or not payload:
            raise RequestRefused("message.payload must be a non-empty string", field="message.payload")
        if not isinstance(signature, str) or not signature:
            raise RequestRefused("the envelope is not signed (message.signature is missing or empty; the "
                                 "client needs signing_key_path)", field="message.signature")
        if not isinstance(claimed, str) or not claimed:
            raise RequestRefused("message.fingerprint is missing or empty", field="message.fingerprint")
        if self.keyring is None:
            raise RequestRefused("an encrypted request, and this runner has no keys configured",
                                 field="message")
        found = self.keyring.signature_key(queue)
        if found is None:
            raise RequestRefused(f"no request signature key for queue {queue!r} in "
                                 f"{self.keyring.signatures.directory} (a file named after the queue or a "
                                 f"prefix of it)", field="message.signature")
        expected = crypto.fingerprint(found.key)
        if claimed != expected:
            log.warning("queue %s: envelope claims signing key %.60s but the key file %s is %s; the "
                        "signature decides", queue, claimed, found.name, expected)
        try:
            crypto.verify(found.key, payload, signature)
        except RequestRefused as exc:
            raise RequestRefused(f"{exc} with key file {found.name!r} ({expected})",
                                 field="message.signature") from None
        plaintext = crypto.decrypt_payload(self.keyring.private_key(), payload)
        log.debug("queue %s: envelope signed by %s (key file %r) decrypted, %d bytes", queue, expected,
                  found.name, len(plaintext))
        return plaintext

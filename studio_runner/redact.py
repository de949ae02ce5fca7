"""The one place secrets are masked: experiment output, runner logs, error messages, logged configs.

Two kinds of rules, both replacing the secret with ``****``:

* Pattern rules (spec lifecycle.md §6), applied to every line whatever the request:
  - URL userinfo: ``amqp://user:pass@host`` -> ``amqp://user:****@host``; a userinfo without a password
    (``//token@host``) and any userinfo in a pip VCS URL (``git+https://user:tok@host``) -> ``//****@host``.
  - ``NAME=value`` where NAME is an upper-case word containing CREDENTIAL, PASSWORD, PASSWD, TOKEN, SECRET or
    KEY (``AWS_SECRET_ACCESS_KEY=abc`` -> ``AWS_SECRET_ACCESS_KEY=****``); quotes around the value are kept.
* Literal rules: the exact secret strings a request carries (``Request.secrets()``). Literals shorter than
  :data:`MIN_LITERAL` characters are ignored when passed as ``secrets`` (masking every ``abc`` in the output
  would destroy it and protect nothing); values passed as ``credentials`` are masked at any length, because
  the caller knows they are real credentials.

Speed: ``mask`` runs on every output line of every experiment. Pattern rules are one module-level compiled
regex, skipped for lines with neither ``=`` nor ``@``; literals are one compiled alternation, longest first.
Patterns run before literals, so a literal inside a name or user part that a pattern keeps is still masked.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

MASK = "****"
MIN_LITERAL = 4
"""Shorter ``secrets`` literals are not masked (``credentials`` are, at any length)."""

_MAX_DEPTH = 64
"""mask_mapping stops descending here; deeper content is replaced, never shown."""

_SECRET_WORDS = r"CREDENTIAL|PASSWORD|PASSWD|TOKEN|SECRET|KEY"

_NAME_RE = re.compile(_SECRET_WORDS, re.IGNORECASE)
_FIELD_RE = re.compile(
    r"credential|password|passwd|passphrase|token|secret|access_?key|private_?key|api_?key", re.IGNORECASE
)

# The name is bounded (64 + word + 64) so a long upper-case run cannot make the scan quadratic.
_RULES_RE = re.compile(
    rf"(?<![A-Z0-9_])(?P<name>[A-Z0-9_]{{0,64}}?(?:{_SECRET_WORDS})[A-Z0-9_]{{0,64}})="
    r"""(?P<value>"[^"\n]*"|'[^'\n]*'|\S+)"""
    r"|//(?P<user>[^\s/@:]*)(?::(?P<pw>[^\s/]*))?@"
)
_VCS_SCHEME_RE = re.compile(r"git\+[A-Za-z]+:$")


def is_secret_name(name: str) -> bool:
    """Whether an environment-style name (``AWS_SECRET_ACCESS_KEY``) names a secret; case-insensitive."""
    return _NAME_RE.search(name) is not None


def looks_secret(key: str) -> bool:
    """Whether a document field name holds a secret: ``password``, ``access_key``, ``credentials``,
    or an upper-case env-style name containing KEY/TOKEN/... (plain ``key``, the experiment id, is not)."""
    return _FIELD_RE.search(key) is not None or (key.isupper() and is_secret_name(key))


def _mask_rule(match: re.Match[str]) -> str:
    name = match.group("name")
    if name is not None:
        value = match.group("value")
        if value[0] in "'\"" and len(value) > 1 and value[-1] == value[0]:
            return f"{name}={value[0]}{MASK}{value[0]}"
        if value[-1] in "'\"" and value[0] not in "'\"":
            return f"{name}={MASK}{value[-1]}"  # the closing quote of an outer quoted word
        return f"{name}={MASK}"
    password = match.group("pw")
    before = match.string[max(0, match.start() - 16) : match.start()]
    if password is None or _VCS_SCHEME_RE.search(before):
        return f"//{MASK}@"
    return f"//{match.group('user')}:{MASK}@"


def mask_patterns(text: str) -> str:
    """Apply only the pattern rules (URL userinfo, ``SECRET_NAME=value``)."""
    if "=" not in text and "@" not in text:
        return text
    return _RULES_RE.sub(_mask_rule, text)


class Redactor:
    """Masks one experiment's secrets in text. Build once per request, call :meth:`mask` per line."""

    def __init__(self, secrets: Iterable[str] = (), *, credentials: Iterable[str] = ()) -> None:
        literals = {s for s in secrets if isinstance(s, str) and len(s) >= MIN_LITERAL}
        literals.update(c for c in credentials if isinstance(c, str) and c)
        ordered = sorted(literals, key=lambda s: (-len(s), s))
        self._literals: re.Pattern[str] | None = (
            re.compile("|".join(re.escape(s) for s in ordered)) if ordered else None
        )

    def mask(self, line: str) -> str:
        """``line`` with every known secret and every pattern-rule match replaced by ``****``."""
        line = mask_patterns(line)
        if self._literals is not None:
            line = self._literals.sub(MASK, line)
        return line


def _mask_all(value: Any, depth: int) -> Any:
    """Keep the shape (which fields exist is useful in a log), hide every scalar except null."""
    if depth > _MAX_DEPTH:
        return MASK
    if isinstance(value, Mapping):
        return {k: _mask_all(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_mask_all(v, depth + 1) for v in value]
    return None if value is None else MASK


def _mask_tree(value: Any, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        return "<too deeply nested>"
    if isinstance(value, Mapping):
        out: dict[Any, Any] = {}
        for key, item in value.items():
            name = str(key)
            if name == "env" or looks_secret(name):
                out[key] = _mask_all(item, depth + 1)
            else:
                out[key] = _mask_tree(item, depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [_mask_tree(v, depth + 1) for v in value]
    if isinstance(value, str):
        return mask_patterns(value)
    return value


def mask_mapping(d: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``d`` that is safe to log.

    Values under a secret-looking key (:func:`looks_secret`, so also under any ``credentials``) and every
    value under an ``env`` key become ``****`` (nulls stay null, containers keep their shape); the pattern
    rules are applied to all other strings (``amqp://u:p@h`` -> ``amqp://u:****@h``).
    """
    return _mask_tree(d, 0)


_SHOWN_MAX = 60


def describe(value: Any, *, secret: bool = False) -> str:
    """A short, safe rendering of a rejected value for an error message.

    Secret values become ``****``; containers are described by size, never shown (they may hold
    credentials); strings pass the pattern rules and are cut at 60 characters.
    """
    if secret:
        return MASK
    if isinstance(value, Mapping):
        return f"an object with {len(value)} keys"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} items"
    if isinstance(value, str):
        value = mask_patterns(value)
    try:
        text = repr(value)
    except ValueError:  # an int too long to print
        return f"a {type(value).__name__} too long to show"
    return text if len(text) <= _SHOWN_MAX else text[: _SHOWN_MAX - 3] + "..."

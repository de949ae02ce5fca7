"""The one place secrets are masked: experiment output, runner logs, error messages, logged configs.

Two kinds of rules, both replacing the secret with ``****``:

* Pattern rules (spec lifecycle.md §6), applied to every line whatever the request:
  - URL userinfo: ``amqp://user:pass@host`` -> ``amqp://user:****@host``; a userinfo without a password
    (``//token@host``) and any userinfo in a pip VCS URL (``git+https://user:tok@host``) -> ``//****@host``.
  - ``NAME=value`` where NAME is a secret name (:func:`is_secret_name`) written in upper case
    (``AWS_SECRET_ACCESS_KEY=abc`` -> ``AWS_SECRET_ACCESS_KEY=****``, ``DB_PWD=x`` -> ``DB_PWD=****``);
    quotes around the value are kept.
* Literal rules: the exact secret strings a request carries (``Request.secrets()``) and the runner's own
  (:func:`runner_secrets`). A ``secrets`` literal shorter than :data:`MIN_LITERAL` characters is masked only
  as a whole word (a 3-letter password ``abc`` is hidden in ``pw abc`` but ``abcdef`` stays readable), and
  placeholder values (``true``, ``none``, a 1-3 digit number...) are not literals at all: masking every ``1``
  would destroy the output and protect nothing. Values passed as ``credentials`` are masked everywhere at any
  length, because the caller knows they are real credentials.
* Secret names: ending in ``_PWD``, ``_PASS``, ``_PASSWD``, ``_KEY``, ``_TOKEN``, ``_SECRET``, or
  containing ``PASSWORD``, ``PASSWD``, ``PASSPHRASE``, ``CREDENTIAL``, ``TOKEN``, ``SECRET`` or ``KEY`` (any
  case), whatever the length of their value. The experiment still receives them; only what leaves the
  runner is masked.

Exit points that do not know which request a text came from (the runner's log, /status, set-aside reasons)
use :func:`scrub`: the pattern rules, the runner's secrets and the secrets of every request this process held
recently (:func:`remember`).

Speed: ``mask`` runs on every output line of every experiment. Pattern rules are one module-level compiled
regex, skipped for lines with neither ``=`` nor ``@``; literals are one compiled alternation, longest first.
Patterns run before literals, so a literal inside a name or user part that a pattern keeps is still masked.

Streams: :class:`studio_runner.streammask.StreamMasker` turns an experiment's raw output bytes into masked
lines with these rules. It masks *before* it cuts an over-long line into pieces, so no secret escapes by
straddling a cut.
:func:`runner_secrets` picks the runner's own secrets out of its environment, so they are masked too.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote

MASK = "****"
MIN_LITERAL = 4
"""Shorter ``secrets`` literals are masked as whole words only (``credentials`` everywhere, at any length)."""

_MAX_DEPTH = 64
"""mask_mapping stops descending here; deeper content is replaced, never shown."""

_SECRET_WORDS = r"CREDENTIAL|PASSWORD|PASSWD|PASSPHRASE|TOKEN|SECRET|KEY"
_SECRET_SUFFIXES = r"_PWD|_PASS"
"""Secret only at the end of a name: ``PWD`` alone is the working directory, ``BYPASS`` no password."""
_NAME_AFFIX = 64
"""How many name characters the ``NAME=value`` rule allows on each side of the secret word."""

_NAME_RE = re.compile(rf"{_SECRET_WORDS}|(?:{_SECRET_SUFFIXES})\Z|\APASS\Z", re.IGNORECASE)
# An upper-case secret name, as the ``NAME=value`` rule sees it (bounded, so a long upper-case run cannot make
# the scan quadratic): a secret word anywhere, or a secret suffix right before the ``=``.
_UPPER_NAME = (rf"[A-Z0-9_]{{0,{_NAME_AFFIX}}}?(?:{_SECRET_WORDS})[A-Z0-9_]{{0,{_NAME_AFFIX}}}"
               rf"|[A-Z0-9_]{{0,{_NAME_AFFIX}}}(?:{_SECRET_SUFFIXES})|PASS")
_FIELD_RE = re.compile(
    r"credential|password|passwd|passphrase|token|secret|access_?key|private_?key|api_?key", re.IGNORECASE
)

_FIELD_SUFFIX_RE = re.compile(rf"(?:{_SECRET_SUFFIXES})\Z|\APASS\Z", re.IGNORECASE)

_RULES_RE = re.compile(
    rf"(?<![A-Z0-9_])(?P<name>{_UPPER_NAME})="
    r"""(?P<value>"[^"\n]*"|'[^'\n]*'|\S+)"""
    r"|//(?P<user>[^\s/@:]*)(?::(?P<pw>[^\s/]*))?@"
)
_VCS_SCHEME_RE = re.compile(r"git\+[A-Za-z]+:$")


def is_secret_name(name: str) -> bool:
    """Whether an environment-style name names a secret, whatever its value's length; case-insensitive.

    Secret: a name containing CREDENTIAL, PASSWORD, PASSWD, PASSPHRASE, TOKEN, SECRET or KEY
    (``AWS_SECRET_ACCESS_KEY``, ``X_TOKEN``, ``MY_SECRET``), or ending in ``_PWD`` or ``_PASS`` (``DB_PWD``,
    ``API_PASS``), or ``PASS`` itself. ``PWD`` (the working directory) is not."""
    return _NAME_RE.search(name) is not None


def looks_secret(key: str) -> bool:
    """Whether a document field name holds a secret: ``password``, ``access_key``, ``credentials``,
    ``db_pwd``, or an upper-case env-style name containing KEY/TOKEN/... (plain ``key``, the experiment id,
    is not)."""
    if _FIELD_RE.search(key) is not None:
        return True
    return is_secret_name(key) if key.isupper() else _FIELD_SUFFIX_RE.search(key) is not None


_PLACEHOLDERS = frozenset({"true", "false", "yes", "no", "on", "off", "none", "null", "nil", "-"})
"""Values a secret-named setting often holds that are no secret (``USE_TOKEN=true``): masking every ``true``
in the output would break the experiment's JSON metadata lines and hide nothing."""


def is_placeholder(value: str) -> bool:
    """Whether a secret-named value is no secret worth masking as a literal: empty or blank, a placeholder
    word (``true``, ``none``...), or a number shorter than MIN_LITERAL digits (``MAX_KEYS=8``). Such values
    are still hidden where the pattern rules see them (``DB_PWD=8`` -> ``DB_PWD=****``)."""
    stripped = value.strip()
    return (not stripped or stripped.lower() in _PLACEHOLDERS
            or (len(stripped) < MIN_LITERAL and stripped.isdigit()))


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
        anywhere = {c for c in credentials if isinstance(c, str) and c}
        words: set[str] = set()
        for value in secrets:
            if not isinstance(value, str) or is_placeholder(value) or value in anywhere:
                continue
            (anywhere if len(value) >= MIN_LITERAL else words).add(value)
        self._literals = _literal_pattern(anywhere, words)
        self._longest = max(map(len, anywhere | words), default=0)

    @property
    def longest_literal(self) -> int:
        """Length of the longest literal secret masked (0 if none): how much text a stream must hold back so
        that a secret arriving in two parts is still seen whole."""
        return self._longest

    def mask(self, line: str) -> str:
        """``line`` with every known secret and every pattern-rule match replaced by ``****``."""
        line = mask_patterns(line)
        if self._literals is not None:
            line = self._literals.sub(MASK, line)
        return line


def _literal_pattern(anywhere: set[str], words: set[str]) -> re.Pattern[str] | None:
    """One pattern, longest match first: ``anywhere`` literals as they are, ``words`` only where no word
    character touches them (so a short secret does not eat pieces of ordinary words).

    Literals of MIN_LITERAL characters or more (all ``anywhere``) form a trie (:func:`_trie`), so that the
    thousands of secrets :func:`scrub` remembers cost about what ten do; the short ones, all shorter than
    those, follow as a plain alternation, longest first."""
    if not anywhere and not words:
        return None
    long = [s for s in anywhere if len(s) >= MIN_LITERAL]
    short = sorted((anywhere | words).difference(long), key=lambda s: (-len(s), s))
    # A trie costs a dict per character: a megabyte secret (a message may carry one) would take seconds and
    # hundreds of MB, so the few very long literals are plain alternatives, longest first, ahead of the trie.
    huge = sorted((s for s in long if len(s) > _TRIE_MAX_LITERAL), key=lambda s: (-len(s), s))
    long = [s for s in long if len(s) <= _TRIE_MAX_LITERAL]
    parts = [re.escape(s) for s in huge] + ([_trie(long)] if long else [])
    parts += [re.escape(s) if s in anywhere else rf"(?<!\w){re.escape(s)}(?!\w)" for s in short]
    return re.compile("|".join(parts))


_TRIE_MAX_LITERAL = 1024
"""Literals longer than this stay out of the trie (see :func:`_literal_pattern`)."""
_TRIE_MAX_DEPTH = 200
"""Branch points along one literal beyond which :func:`_trie` gives up (and alternates plainly): regex
compilation recurses once per level."""


def _trie(literals: list[str]) -> str:
    """A regex that matches any of ``literals``, the longest one where several start at the same place (each
    branch point tries the longer continuations before it accepts a shorter literal). Shared prefixes are
    matched once, so the regex engine does not try every literal at every position."""
    root: dict[str, Any] = {}
    for literal in literals:
        node = root
        for char in literal:
            node = node.setdefault(char, {})
        node[""] = {}

    def render(node: dict[str, Any], depth: int) -> str:
        if depth > _TRIE_MAX_DEPTH:
            raise RecursionError
        chain: list[str] = []
        while len(node) == 1 and "" not in node:  # a chain without branches: no group needed
            (char, node), = node.items()
            chain.append(char)
        out = re.escape("".join(chain))  # (``out +=`` per character is quadratic here)
        branches = [re.escape(char) + render(child, depth + 1)
                    for char, child in sorted(node.items()) if char]
        if not branches:
            return out
        group = "(?:" + "|".join(branches) + ")"
        return out + (group + "?" if "" in node else group)

    try:
        return render(root, 0)
    except RecursionError:
        return "|".join(re.escape(s) for s in sorted(literals, key=lambda s: (-len(s), s)))


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


# --- the runner's own secrets ---------------------------------------------------------------------------

_URL_PASSWORD_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s/@:]*:(?P<pw>[^\s/]*)@")


def runner_secrets(environ: Mapping[str, str]) -> list[str]:
    """Values of the runner's secret-named variables (:func:`is_secret_name`, any length) and passwords found
    in URL-valued variables (scheme://user:pass@host), to be masked in every experiment's output and in the
    runner's own logs.

    A runner started with ``AWS_SECRET_ACCESS_KEY`` or ``GITHUB_TOKEN`` must not show them even if an
    experiment prints them. URL passwords come both as written and percent-decoded (a program may print
    either); placeholders (:func:`is_placeholder`: ``true``, ``none``, ``8``) are never taken. A
    :class:`Redactor` masks values shorter than MIN_LITERAL as whole words only.
    """
    found: list[str] = []
    for name, value in environ.items():
        if not isinstance(value, str):
            continue
        if is_secret_name(name):
            found.append(value)
        if "://" in value:
            for match in _URL_PASSWORD_RE.finditer(value):
                password = match.group("pw")
                found += [password, unquote(password)]
    return list(dict.fromkeys(s for s in found if not is_placeholder(s)))


# --- every exit point: scrub ------------------------------------------------------------------------------

REMEMBERED_MAX = 4096
"""Request secrets :func:`remember` keeps (the oldest are forgotten first): those of every attempt a busy
runner held in the last hours, without growing for ever."""


class _Remembered:
    """The process-wide literal set behind :func:`scrub`; thread-safe (log records come from threads). The
    runner's own secrets (its environment, read on first use) are kept apart and never forgotten."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._secrets: dict[str, None] = {}
        self._credentials: dict[str, None] = {}
        self._runner: list[str] | None = None
        self._redactor: Redactor | None = None

    def add(self, secrets: Iterable[str], credentials: Iterable[str]) -> None:
        with self._lock:
            changed = _add_bounded(self._secrets, secrets) | _add_bounded(self._credentials, credentials)
            if changed:
                self._redactor = None

    def redactor(self) -> Redactor:
        with self._lock:
            if self._redactor is None:
                if self._runner is None:
                    self._runner = runner_secrets(os.environ)
                self._redactor = Redactor([*self._runner, *self._secrets], credentials=self._credentials)
            return self._redactor

    def forget(self) -> None:
        with self._lock:
            self._secrets.clear()
            self._credentials.clear()
            self._runner = None
            self._redactor = None


def _add_bounded(store: dict[str, None], values: Iterable[str]) -> bool:
    changed = False
    for value in values:
        if isinstance(value, str) and value:
            if value in store:
                store.pop(value)  # refreshed: forgotten last
            else:
                changed = True
            store[value] = None
    while len(store) > REMEMBERED_MAX:
        store.pop(next(iter(store)))
        changed = True
    return changed


_REMEMBERED = _Remembered()


def remember(secrets: Iterable[str], credentials: Iterable[str] = ()) -> None:
    """Mask these values in everything :func:`scrub` sees from now on (``secrets`` as a :class:`Redactor`
    takes them: short ones as whole words, placeholders never; ``credentials`` everywhere, any length).

    The executor calls it with each attempt's secrets, so a runner log line, a /status reason or a set-aside
    reason that quotes one is masked even where the code writing it does not know the request."""
    _REMEMBERED.add(secrets, credentials)


def forget_remembered() -> None:
    """Drop every remembered secret and read the runner's environment again on the next scrub (tests)."""
    _REMEMBERED.forget()


def scrub(text: str) -> str:
    """``text`` safe to leave the runner: pattern rules, the runner's secrets (its environment) and every
    remembered request secret masked. The one helper for exit points that hold no request's redactor."""
    return _REMEMBERED.redactor().mask(text)


def scrub_tree(value: Any, depth: int = 0) -> Any:
    """A copy of a JSON-like document (/status, a report) with :func:`scrub` applied to every string, keys
    included; the shape is kept, so the document stays valid for its schema."""
    if depth > _MAX_DEPTH:
        return "<too deeply nested>"
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, Mapping):
        return {scrub(k) if isinstance(k, str) else k: scrub_tree(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub_tree(v, depth + 1) for v in value]
    return value

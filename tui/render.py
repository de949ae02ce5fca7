"""From the /status JSON document (the runner's status endpoint) to what the TUI shows.

Pure functions, no widgets: the app only places their results, and tests can check the wording without a
terminal. Every figure may be null or absent (an older or newer runner, a runner without GPUs), so each one
falls back to a dash instead of failing the whole refresh.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.text import Text

try:  # the runner's own wording for sizes and durations, so that the TUI and the logs agree
    from studio_runner.units import format_duration as _format_duration
    from studio_runner.units import format_size as _format_size
except ImportError:  # pragma: no cover - the TUI installed without the runner
    def _format_size(n: int) -> str:
        return f"{n} B"

    def _format_duration(seconds: float) -> str:
        return f"{seconds:.0f}s"

DASH = "–"

INTAKE_STYLES = {"Running": "bold green", "DrainAndSuspend": "bold yellow",
                 "DrainAndTerminate": "bold red", "ShuttingDown": "bold red"}
PHASE_STYLES = {"claimed": "cyan", "downloading": "cyan", "building_env": "magenta", "running": "green",
                "uploading": "cyan", "settling": "blue", "backoff": "yellow", "done": "dim"}
STATUS_STYLES = {"success": "green", "failed": "red", "timeout": "red", "killed": "red"}

COLUMNS: tuple[tuple[str, str], ...] = (
    ("key", "experiment"), ("queue", "queue"), ("phase", "phase"), ("elapsed", "elapsed"),
    ("cores", "cores"), ("ram", "RAM"), ("gpus", "GPUs"), ("cpu", "CPU %"), ("rss", "RSS"),
    ("outcome", "outcome"),
)
"""(column key, heading) of the experiments table, in order."""


def size(value: Any) -> str:
    return _format_size(int(value)) if isinstance(value, (int, float)) else DASH


def duration(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return DASH
    return _format_duration(round(float(value))) if value >= 1 else _format_duration(round(float(value), 1))


def _text(value: Any) -> str:
    return DASH if value is None or value == "" else str(value)


def card_names(visible: Any, cards: Sequence[Mapping[str, Any]] = ()) -> str:
    """CUDA_VISIBLE_DEVICES as card indices: the runner hands out UUIDs (stable across reboots), 40
    characters each, too wide for a table column; an unknown UUID is cut to its first group."""
    if not visible:
        return DASH
    index = {str(card.get("uuid")): str(card.get("index")) for card in cards if card.get("uuid")}
    names = []
    for item in str(visible).split(","):
        item = item.strip()
        names.append(index.get(item) or (item[:12] if item.startswith("GPU-") else item))
    return ",".join(names)


def running_cells(entry: Mapping[str, Any],
                  cards: Sequence[Mapping[str, Any]] = ()) -> dict[str, str | Text]:
    """One running attempt as table cells keyed by column key (``cards`` names its GPUs by index)."""
    phase = str(entry.get("phase") or DASH)
    cpu = entry.get("cpu_percent")
    return {
        "key": _text(entry.get("key")),
        "queue": _text(entry.get("queue")),
        "phase": Text(phase, style=PHASE_STYLES.get(phase, "")),
        "elapsed": duration(entry.get("elapsed_s")),
        "cores": _text(entry.get("cores")),
        "ram": size(entry.get("ram")),
        "gpus": card_names(entry.get("gpus"), cards),
        "cpu": f"{cpu:.0f}" if isinstance(cpu, (int, float)) else DASH,
        "rss": size(entry.get("rss")),
        "outcome": "",
    }


def outcome(entry: Mapping[str, Any]) -> Text:
    """``success/ack``, ``failed/nack (reason)``: what became of the attempt and its message."""
    status = str(entry.get("status") or "?")
    text = Text(status, style=STATUS_STYLES.get(status, "yellow"))
    if entry.get("action"):
        text.append(f"/{entry['action']}")
    if entry.get("reason"):
        text.append(f" ({entry['reason']})", style="dim")
    return text


def finished_cells(entry: Mapping[str, Any]) -> dict[str, str | Text]:
    """One settled attempt as table cells; live figures no longer apply."""
    return {
        "key": _text(entry.get("key")),
        "queue": _text(entry.get("queue")),
        "phase": Text("done", style="dim"),
        "elapsed": duration(entry.get("elapsed_s")),
        "cores": DASH, "ram": DASH, "gpus": DASH, "cpu": DASH, "rss": DASH,
        "outcome": outcome(entry),
    }


def intake_text(intake: Mapping[str, Any] | None) -> Text:
    state = str((intake or {}).get("state") or "?")
    return Text(state, style=INTAKE_STYLES.get(state, "bold"))


def header(status: Mapping[str, Any] | None, *, url: str, error: str = "", note: str = "") -> Text:
    """The top line: who, how long, intake (coloured), connection; the last good figures stay while down."""
    line = Text()
    if status is not None:
        line.append(str(status.get("host") or "?"), style="bold")
        line.append(f"  studio-runner {status.get('version') or '?'}")
        line.append(f"  up {duration(status.get('uptime_s'))}")
        line.append("  intake ")
        intake = status.get("intake") or {}
        line.append_text(intake_text(intake))
        if intake.get("reason"):
            line.append(f" ({intake['reason']})", style="dim")
        totals = status.get("totals") or {}
        if totals:
            line.append(f"  done {totals.get('completed', 0)} (ok {totals.get('succeeded', 0)}, "
                        f"failed {totals.get('failed', 0)})")
        line.append("  ")
    if error:
        line.append(f"disconnected — retrying {url} ({error})", style="bold white on red")
    elif status is None:
        line.append(f"connecting to {url}", style="yellow")
    else:
        line.append(f"connected {url}", style="green")
    if note:
        line.append(f"  {note}", style="dim")
    return line


def bar(fraction: float | None, width: int = 20) -> Text:
    """A bar of ``width`` cells: green under 70 %, yellow under 90 %, red above."""
    if fraction is None:
        return Text("·" * width, style="dim")
    fraction = min(max(fraction, 0.0), 1.0)
    filled = round(fraction * width)
    style = "green" if fraction < 0.7 else "yellow" if fraction < 0.9 else "red"
    return Text("█" * filled, style=style) + Text("░" * (width - filled), style="dim")


def gpu_panel(gpus: Mapping[str, Any] | None, width: int = 20,
              owners: Mapping[str, str] | None = None) -> Text:
    """Per card: memory and utilisation bars, state and owner (``owners``: attempt id -> experiment key)."""
    gpus = gpus or {}
    cards: Sequence[Mapping[str, Any]] = gpus.get("cards") or []
    out = Text("GPUs", style="bold")
    out.append(f" ({gpus.get('backend') or 'none'})")
    if gpus.get("reason"):
        out.append(f" {gpus['reason']}", style="yellow")
    if not cards:
        out.append("\nno cards", style="dim")
    for card in cards:
        total, used = card.get("memory_total"), card.get("memory_used")
        util = card.get("utilisation")
        mem_fraction = used / total if isinstance(total, (int, float)) and total and \
            isinstance(used, (int, float)) else None
        out.append(f"\n{card.get('index', '?')} {card.get('name') or ''}"[:40])
        out.append(f" {card.get('state') or ''}", style="cyan")
        if card.get("owner"):
            out.append(f" {(owners or {}).get(card['owner']) or card['owner']}", style="dim")
        out.append("\n  mem  ")
        out.append_text(bar(mem_fraction, width))
        out.append(f" {size(used)} / {size(total)}")
        out.append("\n  util ")
        out.append_text(bar(util / 100 if isinstance(util, (int, float)) else None, width))
        out.append(f" {util}%" if isinstance(util, (int, float)) else f" {DASH}")
    return out


def queues_panel(status: Mapping[str, Any]) -> Text:
    """Queues served and the machine's free resources."""
    out = Text("Queues", style="bold")
    queues: Sequence[Mapping[str, Any]] = status.get("queues") or []
    if not queues:
        out.append("\nnone yet", style="dim")
    for queue in queues:
        out.append(f"\n{queue.get('backend') or '?'}:{queue.get('name') or '?'}")
        paused = queue.get("paused_for_s")
        if isinstance(paused, (int, float)):
            out.append(f" paused {duration(paused)}", style="yellow")
        if queue.get("note"):
            out.append(f" {queue['note']}", style="dim")
    resources = status.get("resources") or {}
    out.append("\nResources", style="bold")
    for name in ("cores", "ram", "disk"):
        figures = resources.get(name) or {}
        show = str if name == "cores" else size
        free, total = figures.get("free"), figures.get("total")
        out.append(f"\n{name} free {show(free) if free is not None else DASH}"
                   f" of {show(total) if total is not None else 'uncapped'}")
    return out


def caches_panel(caches: Mapping[str, Any] | None) -> Text:
    out = Text("Caches", style="bold")
    caches = caches or {}
    artifacts = caches.get("artifacts")
    if artifacts:
        out.append(f"\nartifacts {size(artifacts.get('bytes'))} / {size(artifacts.get('limit'))}")
        out.append(f"\n  hits {artifacts.get('hits', 0)} misses {artifacts.get('misses', 0)}")
        out.append(f"\n  {artifacts.get('dir') or ''}", style="dim")
    else:
        out.append("\nartifacts off", style="dim")
    envs = caches.get("envs")
    if envs:
        out.append(f"\nenvs limit {size(envs.get('limit'))}")
        out.append(f"\n  {envs.get('dir') or ''}", style="dim")
    return out


def new_lines(old: Sequence[str], new: Sequence[str]) -> list[str]:
    """Lines of the tail ``new`` not yet shown, given the tail ``old`` already shown.

    The status document carries a sliding window of the last lines, so the longest suffix of ``old`` that
    starts ``new`` is what both share; anything after it is new. With no overlap at all (more lines than the
    window between two polls) the whole new window is new.
    """
    for k in range(min(len(old), len(new)), 0, -1):
        if list(old[-k:]) == list(new[:k]):
            return list(new[k:])
    return list(new)


__all__ = ["COLUMNS", "bar", "card_names", "caches_panel", "duration", "finished_cells", "gpu_panel",
           "header",
           "intake_text", "new_lines", "outcome", "queues_panel", "running_cells", "size"]

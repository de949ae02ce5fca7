"""``studio-runner tui``: a live Textual view of one runner, fed only by its HTTP status endpoint.

The table is updated in place, row by row keyed by attempt id, so the cursor (and with it the experiment whose
output the log pane follows) survives every refresh. When the runner goes away the last figures stay on screen
under a "disconnected — retrying" banner and polling simply continues, so a restarted runner reappears by
itself.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Footer, Log, Static

from tui import render
from tui.client import DEFAULT_URL, Refused, StatusClient, Unreachable

FINISHED_SHOWN = 20
"""Settled attempts kept in the table below the running ones; older ones drop off."""


class RunnerApp(App[int]):
    """Experiments table, followed output, GPU bars, queues and caches of the runner at ``url``."""

    TITLE = "studio-runner"
    CSS = """
    Screen { layout: vertical; }
    #header { height: auto; max-height: 3; background: $boost; padding: 0 1; }
    #experiments { height: 1fr; min-height: 5; }
    #output { height: 1fr; }
    #panels { height: auto; max-height: 12; border-top: solid $primary; }
    #panels Static { width: 1fr; padding: 0 1; }
    #panels #gpus { width: 3fr; }
    #panels #queues, #panels #caches { width: 2fr; }
    #log-title { height: 1; background: $boost; padding: 0 1; }
    #log { height: 1fr; min-height: 4; padding: 0 1; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("d", "drain", "Drain (take nothing new)"),
        Binding("r", "resume", "Resume intake"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, url: str = DEFAULT_URL, *, interval: float = 0.5, note: str = "",
                 runner_exit: Callable[[], int | None] | None = None) -> None:
        """``note`` is shown in the header (the runner's log file when started together); ``runner_exit``
        answers the exit status of a runner this process started, or None while it runs."""
        super().__init__()
        self.url = url
        self.note = note
        self.client = StatusClient(url, interval=interval)
        self.runner_exit = runner_exit
        self.status: dict[str, Any] | None = None
        self.error = ""
        self.polls = 0
        self._tails: dict[str, list[str]] = {}  # attempt id -> last tail seen (kept after it finishes)
        self._shown_id: str | None = None
        self._shown_tail: list[str] = []

    def compose(self) -> ComposeResult:
        yield Static(render.header(None, url=self.url, error=self.error, note=self.note), id="header")
        table: DataTable[Any] = DataTable(id="experiments", cursor_type="row", zebra_stripes=True)
        for key, label in render.COLUMNS:
            table.add_column(label, key=key)
        yield table
        with Horizontal(id="panels"):
            yield Static(id="gpus")
            yield Static(id="queues")
            yield Static(id="caches")
        with Vertical(id="output"):
            yield Static("output: select an experiment", id="log-title")
            yield Log(id="log", max_lines=5000)
        yield Footer()

    async def on_mount(self) -> None:
        self.query_one(DataTable).focus()
        self.run_worker(self._poll_forever(), name="poll", exclusive=True, exit_on_error=True)

    async def on_unmount(self) -> None:
        await self.client.aclose()

    async def _poll_forever(self) -> None:
        async for poll in self.client.polls():
            self.polls += 1
            if poll.status is None:
                self.error = poll.error
                exited = self.runner_exit() if self.runner_exit else None
                if exited is not None:
                    self.error = f"the runner exited with status {exited}; press q"
            else:
                self.error = ""
                self.status = poll.status
                try:
                    self._apply(poll.status)
                except (TypeError, ValueError, KeyError, AttributeError) as exc:  # one odd document
                    self.error = f"unreadable status document: {exc!r}"
            self._show_header()

    def _show_header(self) -> None:
        self.query_one("#header", Static).update(
            render.header(self.status, url=self.url, error=self.error, note=self.note))

    # -- the table ---------------------------------------------------------------------------------------

    def _apply(self, status: Mapping[str, Any]) -> None:
        running = [e for e in status.get("running") or [] if e.get("attempt_id")]
        running_ids = {e["attempt_id"] for e in running}
        finished = [e for e in status.get("finished") or []
                    if e.get("attempt_id") and e["attempt_id"] not in running_ids][-FINISHED_SHOWN:]
        wanted: dict[str, dict[str, Any]] = {}
        cards = (status.get("gpus") or {}).get("cards") or []
        for entry in running:
            wanted[entry["attempt_id"]] = render.running_cells(entry, cards)
            self._tails[entry["attempt_id"]] = list(entry.get("output_tail") or [])
        for entry in finished:
            wanted[entry["attempt_id"]] = render.finished_cells(entry)

        log = self.query_one(Log)
        # At the end before this refresh = following: stay at the end even when the panels above grow and
        # shrink the pane (Log's auto_scroll only acts on writes, not on resizes). Scrolled up = reading.
        following = log.is_vertical_scroll_end
        self._update_table(wanted)
        self._tails = {k: v for k, v in self._tails.items() if k in wanted}

        owners = {e["attempt_id"]: str(e.get("key") or "") for e in running}
        self.query_one("#gpus", Static).update(render.gpu_panel(status.get("gpus"), owners=owners))
        self.query_one("#queues", Static).update(render.queues_panel(status))
        self.query_one("#caches", Static).update(render.caches_panel(status.get("caches")))
        self._follow_selected()
        if following:
            self.call_after_refresh(log.scroll_end, animate=False)

    def _update_table(self, wanted: dict[str, dict[str, Any]]) -> None:
        """Rows in ``wanted``'s order (running oldest first, then finished), changed cell by cell.

        Only when the order itself changes (a new attempt starts below finished ones, a running one settles
        among running ones) are the rows laid out again, with the cursor put back on the same attempt.
        """
        table: DataTable[Any] = self.query_one(DataTable)
        for row_key in list(table.rows):
            if row_key.value not in wanted:
                table.remove_row(row_key)
        present = {row_key.value for row_key in table.rows}
        for attempt_id, cells in wanted.items():
            if attempt_id in present:
                for column, value in cells.items():
                    if table.get_cell(attempt_id, column) != value:
                        table.update_cell(attempt_id, column, value, update_width=True)
            else:
                table.add_row(*(cells[key] for key, _ in render.COLUMNS), key=attempt_id)
        if [row.key.value for row in table.ordered_rows] != list(wanted):
            selected = self.selected_attempt()
            table.clear()
            for attempt_id, cells in wanted.items():
                table.add_row(*(cells[key] for key, _ in render.COLUMNS), key=attempt_id)
            if selected in wanted:
                table.move_cursor(row=table.get_row_index(selected), animate=False)

    def selected_attempt(self) -> str | None:
        """The attempt id under the cursor, or None for an empty table."""
        table: DataTable[Any] = self.query_one(DataTable)
        if not table.row_count:
            return None
        row_key, _ = table.coordinate_to_cell_key(table.cursor_coordinate)
        return row_key.value

    def on_data_table_row_highlighted(self, _event: DataTable.RowHighlighted) -> None:
        self._follow_selected()

    # -- the log pane --------------------------------------------------------------------------------------

    def _follow_selected(self) -> None:
        """Show the selected attempt's output; on later polls append only the lines that are new."""
        attempt_id = self.selected_attempt()
        log = self.query_one(Log)
        tail = self._tails.get(attempt_id, []) if attempt_id else []
        if attempt_id != self._shown_id:
            log.clear()
            self._shown_id, self._shown_tail = attempt_id, []
            key = self._key_of(attempt_id)
            title = f"output of {key} ({attempt_id})" if attempt_id else "output: select an experiment"
            self.query_one("#log-title", Static).update(title)
        fresh = render.new_lines(self._shown_tail, tail)
        if fresh:
            log.write_lines(fresh)
        self._shown_tail = tail

    def _key_of(self, attempt_id: str | None) -> str:
        if attempt_id is None or self.status is None:
            return ""
        for entry in [*(self.status.get("running") or []), *(self.status.get("finished") or [])]:
            if entry.get("attempt_id") == attempt_id:
                return str(entry.get("key") or "")
        return ""

    # -- keys ------------------------------------------------------------------------------------------------

    async def _set_intake(self, state: str) -> None:
        try:
            answer = await self.client.set_intake(state)
        except (Unreachable, Refused) as exc:
            self.notify(f"could not set intake to {state}: {exc}", severity="error")
            return
        self.notify(f"intake {answer.get('state', state)}")
        if self.status is not None:  # show it now rather than on the next poll
            self.status.setdefault("intake", {}).update(answer)
            self._show_header()

    async def action_drain(self) -> None:
        """Finish what runs and take nothing new (POST DrainAndSuspend)."""
        await self._set_intake("DrainAndSuspend")

    async def action_resume(self) -> None:
        await self._set_intake("Running")

    async def action_quit(self) -> None:
        self.exit(0)


def main(url: str = DEFAULT_URL) -> int:
    """Entry point of ``studio-runner tui [--url URL]``: runs until the user quits; 0 then."""
    result = RunnerApp(url).run()
    return 0 if result is None else int(result)


if __name__ == "__main__":  # pragma: no cover - `python -m tui.app [URL]`
    sys.exit(main(*sys.argv[1:2]))

"""The Textual terminal UI of studio-runner: a client of a runner's HTTP status endpoint, nothing more.

Entry points: ``tui.app.main(url)`` (``studio-runner tui``) and ``tui.together.run_with_runner(argv)``
(``studio-runner run --tui``).
"""

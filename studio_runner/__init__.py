"""studio-runner: a StudioML experiment runner built on trio."""

__version__ = "0.1.0"

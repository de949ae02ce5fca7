#!/usr/bin/env python3
"""Thin entry point so `python runner.py ...` works from a checkout and inside the single-file build."""

from studio_runner.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m studio_runner`` runs the same CLI as ``studio-runner``."""

from studio_runner.cli import main

raise SystemExit(main())

"""Real request messages produced by the StudioML 0.0.49 client (copied from the project's shared/fixtures,
with their README), kept in the repository so the suite runs from any clone."""

from __future__ import annotations

from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "studioml"

#!/usr/bin/env bash
# The declared minimum versions must really work: install the project into a fresh virtual environment with
# every direct dependency at the lowest version pyproject.toml allows (uv's lowest-direct resolution; their own
# dependencies resolve as usual), then run a quick smoke subset and the demo on it.
# The interpreter is the oldest Python the project supports (3.10) when one is installed, else python3: the
# 3.10-only dependencies (tomli, exceptiongroup) are then checked too. PYTHON=... chooses another.
# Usage: bash .ci/lowest_direct.sh   (uses .venv/bin/uv or uv on PATH if there; takes a minute or two)
set -euo pipefail
cd "$(dirname "$0")/.."

pick_python() {  # the first candidate that runs (pyenv shims exist for versions that are not selected)
  local candidate
  for candidate in python3.10 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.10*/bin/python3.10 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys' >/dev/null 2>&1; then
      command -v "$candidate"; return 0
    fi
  done
  return 1
}
PYTHON="${PYTHON:-$(pick_python)}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/studio-runner-lowest.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

UV="${UV:-.venv/bin/uv}"  # the project's own (uv is a dependency), else one on PATH, else a private one
[ -x "$UV" ] || UV="$(command -v uv || true)"
if [ -z "$UV" ]; then
  "$PYTHON" -m venv "$WORK/uv" && "$WORK/uv/bin/pip" install -q --disable-pip-version-check uv
  UV="$WORK/uv/bin/uv"
fi

"$UV" venv -q --python "$PYTHON" "$WORK/venv"
"$UV" pip install -q --python "$WORK/venv/bin/python" --resolution lowest-direct -e '.[test,tui]'
echo "lowest-direct versions:"
"$UV" pip freeze --python "$WORK/venv/bin/python" \
  | grep -iE '^(trio|httpx|h11|boto3|s3transfer|pika|jsonpatch|uv|psutil|nvidia-ml-py|watchfiles|prometheus.client|exceptiongroup|tomli|pytest|moto|textual|rich)=' \
  | sed 's/^/  /'

# A clean home and no STUDIO_RUNNER_* settings, so nothing of this machine's configuration is used.
export HOME="$WORK/home" XDG_CACHE_HOME="$WORK/home/.cache" STUDIOML_HOME="$WORK/home/.studioml"
unset VIRTUAL_ENV
for name in $(env | grep -o '^STUDIO_RUNNER_[A-Z0-9_]*' || true); do unset "$name"; done
mkdir -p "$HOME"

"$WORK/venv/bin/python" -V
# what each minimum is about: the CLI and options; trio (executor); uv (the demo's environment build);
# boto3/s3transfer (S3, on moto); watchfiles (the local queue's file watch); prometheus-client and h11 (the
# status endpoint); textual (the TUI)
"$WORK/venv/bin/python" -m pytest -p no:cacheprovider -q -x tests/test_cli.py tests/test_config.py \
  tests/test_executor.py tests/storage/test_s3.py tests/queues/test_localdir.py tests/test_metrics.py \
  tests/test_status.py tests/test_tui.py
"$WORK/venv/bin/studio-runner" demo --demo-dir "$WORK/demo"
echo "lowest-direct smoke: ok"

#!/usr/bin/env bash
# Build the single-file studio-runner (see build/README.md).
#
#   bash build/onefile.sh            dist/studio-runner: PyInstaller one-file executable (Python, the runner,
#                                    its dependencies and uv inside; needs no Python to start, but experiments
#                                    need an interpreter on the host: PATH python3, --python-search-path, or
#                                    --python-downloads for a uv-managed one)
#   bash build/onefile.sh --onedir   dist/studio-runner-dir/: the same, unpacked (starts faster, no extraction)
#   bash build/onefile.sh --zipapp   dist/studio-runner.pyz: a zipapp with the dependencies vendored for this
#                                    platform and Python version; needs that Python (>= 3.10) on the target
#
# PYTHON (default: .venv/bin/python of the checkout) must have the runner and its build extra installed
# (pip install -e '.[build,tui]'). The work directory (build/out/) is removed first, so every build is clean.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
MODE="${1:---onefile}"
WORK="$ROOT/build/out"
DIST="$ROOT/dist"

started=$(date +%s.%N)
finish() {
  local target="$1" seconds
  seconds=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
  echo "built $target ($(du -sh "$target" | cut -f1)) in ${seconds}s"
}

case "$MODE" in
  --onefile|--onedir)
    rm -rf "$WORK"
    mkdir -p "$WORK" "$DIST"
    if [ "$MODE" = --onedir ]; then
      export STUDIO_RUNNER_ONEDIR=1
      rm -rf "$DIST/studio-runner-dir"
    else
      rm -f "$DIST/studio-runner"
    fi
    "$PYTHON" -m PyInstaller --noconfirm --clean --log-level WARN \
      --workpath "$WORK" --distpath "$DIST" "$ROOT/build/studio-runner.spec"
    if [ "$MODE" = --onedir ]; then finish "$DIST/studio-runner-dir"; else finish "$DIST/studio-runner"; fi
    ;;
  --zipapp)
    # shiv (a well-kept zipapp builder, installed here into the work directory only) packs the runner and
    # its dependencies, installed by pip for this platform and Python minor version, into one .pyz. Running
    # it needs that Python (>= 3.10) on the target: `python3.11 dist/studio-runner.pyz run ...`. On first
    # start it unpacks its site-packages (native modules such as psutil and watchfiles cannot be imported
    # from a zip) to ~/.shiv (SHIV_ROOT to move it), then starts like `python runner.py`; uv is the `uv`
    # package's binary, found next to those site-packages.
    rm -rf "$WORK/shiv"
    mkdir -p "$WORK/shiv" "$DIST"
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --target "$WORK/shiv" shiv
    PYTHONPATH="$WORK/shiv" "$PYTHON" -m shiv --quiet --console-script studio-runner \
      --output-file "$DIST/studio-runner.pyz" --python "/usr/bin/env python3" --reproducible \
      "$ROOT[tui]"
    finish "$DIST/studio-runner.pyz"
    ;;
  *)
    sed -n '2,13p' "$0" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# GPU check on a real machine (no network needed): NVML's view through studio_runner.gpus, one card allocated
# to a child that uses CUDA on it, isolation of CPU-only children, draining on release. See bench/gpu_check.py.
# Exit 0 on success or when there is no GPU ("nothing to check"), 1 on a failed check.
#
#   bash bench/gpu_check.sh [--mib 256] [--hold 6] [--fake FILE]
set -u
cd "$(dirname "$0")/.." || exit 2
PY=.venv/bin/python
[ -x "$PY" ] || PY=$(command -v python3)
exec "$PY" bench/gpu_check.py "$@"

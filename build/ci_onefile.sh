#!/usr/bin/env bash
# CI check of the one-file build: build dist/studio-runner, copy it to an empty directory outside the
# repository and run it there with a clean environment, as a user who downloaded it would:
#   --version; demo (the bundled examples: success, an extra package, a failure, a timeout);
#   submit + run --once of an experiment that reports which interpreter ran it.
# Prints the size and the timings. Needs a Python 3 on the host for the experiments (not for the runner):
# /usr/bin/python3 or /bin/python3, else the python3 on this script's PATH is passed with
# STUDIO_RUNNER_PYTHON_SEARCH_PATH (the documented way), else uv downloads one (--python-downloads).
# The clean environment keeps only the network settings of the CI machine (CA bundle, proxy, index), which
# the demo needs to install its packages; their names are printed, never their values.
#
#   bash build/ci_onefile.sh              build, then check
#   bash build/ci_onefile.sh --no-build   check the dist/studio-runner that is there
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
EXE="$ROOT/dist/studio-runner"
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1fs", b-a}'; }

if [ "${1:-}" != "--no-build" ]; then
  t=$(now)
  bash "$ROOT/build/onefile.sh"
  echo "ci_onefile: build took $(since "$t")"
fi
[ -x "$EXE" ] || { echo "ci_onefile: $EXE is missing (bash build/onefile.sh)" >&2; exit 1; }

WORK="$(mktemp -d /tmp/studio-runner-onefile.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/bin" "$WORK/home" "$WORK/project"
cp "$EXE" "$WORK/bin/studio-runner"
cd "$WORK"

CLEAN=(env -i PATH=/usr/bin:/bin HOME="$WORK/home" LANG=C.UTF-8)
kept=()
for name in SSL_CERT_FILE SSL_CERT_DIR HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy \
            UV_INDEX_URL UV_DEFAULT_INDEX UV_EXTRA_INDEX_URL UV_NATIVE_TLS; do
  if [ -n "${!name:-}" ]; then CLEAN+=("$name=${!name}"); kept+=("$name"); fi
done
if [ -x /usr/bin/python3 ] || [ -x /bin/python3 ]; then
  python_note="python3 on the clean PATH"
elif command -v python3 >/dev/null 2>&1; then
  host_python="$(python3 -c 'import os, sys; print(os.path.realpath(sys.executable))')"
  CLEAN+=("STUDIO_RUNNER_PYTHON_SEARCH_PATH=$host_python")
  python_note="STUDIO_RUNNER_PYTHON_SEARCH_PATH=$host_python"
else
  CLEAN+=("STUDIO_RUNNER_PYTHON_DOWNLOADS=true")
  python_note="a uv-managed download (STUDIO_RUNNER_PYTHON_DOWNLOADS=true)"
fi
echo "ci_onefile: running $WORK/bin/studio-runner ($(du -h "$EXE" | cut -f1), $(stat -c %s "$EXE") bytes)"
echo "ci_onefile: clean environment: PATH HOME LANG ${kept[*]:-}; experiments' interpreter: $python_note"

run() {  # run NAME ARGS...: the executable in the clean environment, timed; its output in $WORK/NAME.log
  local name="$1" t rc=0
  shift
  t=$(now)
  "${CLEAN[@]}" "$WORK/bin/studio-runner" "$@" >"$WORK/$name.log" 2>&1 || rc=$?
  echo "ci_onefile: $name: exit $rc in $(since "$t")"
  if [ "$rc" != 0 ]; then tail -40 "$WORK/$name.log" >&2; exit 1; fi
}

run version --version
grep -q '^studio-runner ' "$WORK/version.log"
run demo demo --demo-dir "$WORK/demo"
sed -n '/^experiment /,/^$/p' "$WORK/demo.log"
grep -q 'all experiments ended as expected' "$WORK/demo.log"

cat > "$WORK/project/hello.py" <<'EOF'
import os, sys
print("onefile-check ran on", sys.version.split()[0], "in", sys.prefix)
print("bundle libraries leaked:", any("_MEI" in p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":")))
EOF
# the defaults, as a user runs them: ~/.studioml/storage/studioml, which the runner's default
# --local-storage-roots (~/.studioml/storage) allows
run submit submit --queue-root "$WORK/queue" --experiment onefile_hello "$WORK/project/hello.py"
run run run --once --queue-root "$WORK/queue" --working-dir "$WORK/work" --prom-address ""
output="$(tar -xOf "$WORK/home/.studioml/storage/studioml/experiments/onefile_hello/output.tar" output)"
grep 'onefile-check ran on' <<<"$output"
grep -q 'bundle libraries leaked: False' <<<"$output"
if pgrep -f "$WORK/bin/studio-runner" >/dev/null; then echo "ci_onefile: a runner process was left" >&2; exit 1; fi
echo "ci_onefile: ok"

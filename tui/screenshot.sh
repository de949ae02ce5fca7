#!/usr/bin/env bash
# Render the TUI against a live runner with a few experiments, in tmux, for the README:
#   docs/tui-screenshot.txt  (tmux capture-pane -p of a 150x42 terminal)
#   docs/tui.svg             (Textual's own SVG screenshot of the same view, headless)
# Usage: bash tui/screenshot.sh   (from anywhere; needs tmux and the repo's .venv)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-$repo/.venv/bin/python}"
work="$(mktemp -d)"
session="studio-runner-shot-$$"
port="$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
url="http://127.0.0.1:$port"
runner_pid=""

cleanup() {
    tmux kill-session -t "$session" 2>/dev/null || true
    if [[ -n "$runner_pid" ]] && kill -0 "$runner_pid" 2>/dev/null; then
        kill -TERM "$runner_pid"
        wait "$runner_pid" || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/queue" "$work/storage" "$work/jobs"
cat > "$work/jobs/train.py" <<'EOF'
import random, sys, time
epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 60
for epoch in range(epochs):
    loss = 2.0 / (epoch + 1) + random.random() * 0.01
    print(f"epoch {epoch:3d}  loss {loss:.4f}  lr 0.001", flush=True)
    time.sleep(0.5)
print("training done", flush=True)
EOF
cat > "$work/jobs/broken.py" <<'EOF'
print("loading data")
raise SystemExit("no such dataset: /data/imagenet")
EOF

# No GPU on most build machines: two fake H200 cards (--gpu-fake) so the GPU bars show something real-looking.
cat > "$work/gpus.json" <<'EOF'
[{"uuid": "GPU-00000000-0000-0000-0000-000000000000", "name": "NVIDIA H200", "memory": "141GiB",
  "used": "92GiB", "utilisation": 87},
 {"uuid": "GPU-11111111-1111-1111-1111-111111111111", "name": "NVIDIA H200", "memory": "141GiB",
  "used": "38GiB", "utilisation": 41}]
EOF

submit() { "$py" "$repo/runner.py" submit --queue-root "$work/queue" --storage-root "$work/storage" "$@" >/dev/null; }
submit --queue local_default --experiment quick_check "$work/jobs/train.py" 2
submit --queue local_default --experiment broken_data "$work/jobs/broken.py"
submit --queue local_default --experiment resnet_lr0.1 "$work/jobs/train.py" 120
submit --queue local_gpu --gpus 1 --experiment resnet_lr0.01 "$work/jobs/train.py" 120
submit --queue local_gpu --gpus 1 --experiment resnet_lr0.001 "$work/jobs/train.py" 120

PYTHONPATH="$repo" "$py" "$repo/runner.py" run --queue-root "$work/queue" --working-dir "$work/work" \
    --gpu-fake "$work/gpus.json" --prom-address "127.0.0.1:$port" >"$work/runner.log" 2>&1 &
runner_pid=$!

for _ in $(seq 100); do
    curl -fsS "$url/healthz" >/dev/null 2>&1 && break
    sleep 0.2
done
curl -fsS "$url/healthz" >/dev/null || { echo "runner did not start:"; cat "$work/runner.log"; exit 1; }

# Wait until two experiments run and the first two have settled, so the table shows both kinds of row.
for _ in $(seq 300); do
    if curl -fsS "$url/status" | "$py" -c '
import json, sys
s = json.load(sys.stdin)
running = [r for r in s["running"]
           if r["phase"] == "running" and sum("epoch" in x for x in r.get("output_tail") or []) >= 8]
sys.exit(0 if len(running) >= 2 and len(s["finished"]) >= 2 else 1)'; then
        break
    fi
    sleep 0.5
done

cd "$repo"
tmux new-session -d -s "$session" -x 150 -y 42 "$py -m tui.app $url"
sleep 4
mkdir -p "$repo/docs"
tmux capture-pane -p -t "$session" >"$repo/docs/tui-screenshot.txt"

"$py" - "$url" "$repo/docs" <<'EOF'
import sys
from tui.app import RunnerApp

url, folder = sys.argv[1], sys.argv[2]

async def shoot(pilot):
    while pilot.app.status is None:
        await pilot.pause(0.1)
    await pilot.pause(1.5)
    pilot.app.save_screenshot("tui.svg", folder)
    await pilot.press("q")

RunnerApp(url).run(headless=True, size=(150, 42), auto_pilot=shoot)
EOF
echo "wrote docs/tui-screenshot.txt and docs/tui.svg"

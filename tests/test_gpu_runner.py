"""GPUs through the whole runner, on the fake backend (``--gpu-fake``) and on this machine's real NVML path
(which here finds no driver): experiments see only the cards they were given, two at once see disjoint
cards, a demand no card can meet is released and never run while other work goes on, and a GPU request on a
runner without GPUs (or with ``--cpu-only``) is never run on the CPU and never lost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.runner import Sandbox
from test_faults import write_script

from studio_runner.resources import usable_cores
from studio_runner.submit import Submission, submit

UUIDS = ["GPU-aaaaaaaa-0000-0000-0000-000000000001", "GPU-bbbbbbbb-0000-0000-0000-000000000002"]

SHOW = """\
import os, sys, time
start = time.time()
time.sleep(float(sys.argv[1]))
with open(sys.argv[2], "a") as spans:
    spans.write(f"{start} {time.time()} {os.environ['CUDA_VISIBLE_DEVICES'] or '-'}\\n")
"""


def fake_cards(path: Path) -> Path:
    path.write_text(json.dumps([{"uuid": uuid, "name": "Tesla V100-SXM2-16GB", "memory": "16GiB"}
                                for uuid in UUIDS]))
    return path


def enqueue(box: Sandbox, script: Path, queue: str, key: str, spans: Path, **needs: object) -> None:
    submit(Submission(script=script, args=["1.5", str(spans)], queue=queue, experiment=key,  # type: ignore[arg-type]
                      **needs), box.queue_root, box.store)


def spans_of(path: Path) -> dict[str, tuple[float, float]]:
    rows = [line.split() for line in path.read_text().splitlines()]
    return {row[2]: (float(row[0]), float(row[1])) for row in rows}


@pytest.mark.expected_skip("needs two usable cores to run two experiments at once")
def test_fake_cards_are_given_out_disjointly_and_impossible_demands_wait(sandbox: Sandbox,
                                                                        tmp_path: Path) -> None:
    if usable_cores() < 2:
        pytest.skip("needs two usable cores to run two experiments at once")
    script = write_script(tmp_path / "show", SHOW)
    spans = tmp_path / "spans"
    enqueue(sandbox, script, "local_gpu", "gpu_a", spans, gpus=1)
    enqueue(sandbox, script, "local_gpu", "gpu_b", spans, gpus=2, gpu_count=1)
    enqueue(sandbox, script, "local_huge", "eight_cards", spans, gpus=1, gpu_count=8)
    result = sandbox.run_once(timeout=300, STUDIO_RUNNER_GPU_FAKE=str(fake_cards(tmp_path / "cards.json")))
    log = result.stderr
    assert result.returncode == 0, log[-4000:]
    seen = spans_of(spans)
    assert set(seen) == set(UUIDS), seen  # each GPU experiment had exactly one card
    (a_start, a_end), (b_start, b_end) = seen[UUIDS[0]], seen[UUIDS[1]]
    assert a_start < b_end and b_start < a_end, "the two GPU experiments did not run at once"
    assert sandbox.pending("local_huge") != [] and sandbox.pending("local_gpu") == []
    assert "eight_cards from local_huge can never run on this runner" in log
    assert "GPU 0 Tesla V100-SXM2-16GB" in log and "16 slot(s)" in log


@pytest.mark.parametrize("options", [{"STUDIO_RUNNER_CPU_ONLY": "true"}, {}], ids=["cpu-only", "no-nvml"])
def test_a_gpu_request_is_never_run_on_the_cpu_and_never_lost(sandbox: Sandbox, tmp_path: Path,
                                                             options: dict[str, str]) -> None:
    """On this machine NVML finds no driver: the runner starts, serves CPU work, and leaves GPU work
    queued for a runner that has cards (the same with --cpu-only on any machine)."""
    script = write_script(tmp_path / "show", SHOW)
    spans = tmp_path / "spans"
    enqueue(sandbox, script, "local_gpu", "wants_gpu", spans, gpus=1)
    enqueue(sandbox, script, "local_cpu", "cpu_work", spans)
    result = sandbox.run_once(timeout=300, CUDA_VISIBLE_DEVICES="", **options)
    log = result.stderr
    assert result.returncode == 0, log[-4000:]
    assert list(spans_of(spans)) == ["-"]  # only the CPU experiment ran
    assert len(sandbox.pending("local_gpu")) == 1  # still queued, no attempt counted
    assert "wants_gpu from local_gpu can never run on this runner" in log
    assert "only CPU work is taken" in log


def test_a_killed_experiment_gives_its_core_and_card_back(sandbox: Sandbox, tmp_path: Path) -> None:
    """One core and one card: the first experiment dies of SIGKILL (not sent by the runner: its result is
    'failed'); the second can only run if both were given back."""
    killer = write_script(tmp_path / "killer", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    script = write_script(tmp_path / "show", SHOW)
    spans = tmp_path / "spans"
    cards = tmp_path / "cards.json"
    cards.write_text(json.dumps([{"uuid": UUIDS[0], "name": "Tesla V100-SXM2-16GB", "memory": "16GiB"}]))
    submit(Submission(script=killer, queue="local_gpu", experiment="killed", gpus=1), sandbox.queue_root,
           sandbox.store)
    enqueue(sandbox, script, "local_gpu", "after", spans, gpus=1)
    result = sandbox.run_once(timeout=300, STUDIO_RUNNER_GPU_FAKE=str(cards), STUDIO_RUNNER_MAX_CORES="1")
    log = result.stderr
    assert "experiment killed on local_gpu: failed" in log, log[-4000:]
    assert list(spans_of(spans)) == [UUIDS[0]]  # the second ran, on the card the first had
    assert sandbox.pending("local_gpu") == []

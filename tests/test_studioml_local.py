"""The unmodified StudioML 0.0.49 client in local mode submits; studio-runner runs; results appear where
the client's local storage expects them (``<endpoint>/<bucket>/<key>``)."""

from __future__ import annotations

import json
import textwrap

import pytest
from support.runner import Sandbox, metadata_documents, read_member
from support.studioml_client import local_mode_config, studio_run

pytestmark = pytest.mark.slow


def test_studio_run_local_mode_end_to_end(sandbox: Sandbox, studioml_bin, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "hello.py").write_text(textwrap.dedent("""\
        import json, os, sys
        print("hello from", os.getcwd().rsplit("/", 1)[-1], "args", sys.argv[1:])
        print(json.dumps({"experiment": {"greeting": "hello"}}))
        os.makedirs("../modeldir", exist_ok=True)
        with open("../modeldir/model.bin", "w") as handle:
            handle.write("trained")
        for i in range(200):
            print("line", i)
        print("the very last line")
        """))
    store = tmp_path / "store"
    config = local_mode_config(tmp_path / "config.yaml", store)
    key = studio_run(studioml_bin, config, sandbox.base, project, "--queue=local_client", "hello.py",
                     "arg with spaces", "it's")
    assert sandbox.pending("local_client"), "the client did not write into the runner's queue root"

    result = sandbox.run_once(timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    bucket = store / "studiostore"
    output = read_member(bucket / "experiments" / key / "output.tar", "output")
    assert "hello from workspace args ['arg with spaces', \"it's\"]" in output
    assert "the very last line" in output  # the tail is never lost
    assert read_member(bucket / "experiments" / key / "modeldir.tar", "model.bin") == "trained"
    docs = [json.loads(p.read_text()) for p in metadata_documents(bucket)]
    doc = next(d for d in docs if d["studioml"]["experiment"]["key"] == key)
    assert doc["experiment"] == {"greeting": "hello"}
    assert doc["studioml"]["artifacts"]["workspace"].startswith("file://")
    assert sandbox.pending("local_client") == []


SPAN = textwrap.dedent("""\
    import os, sys, time
    start = time.time()
    time.sleep(float(sys.argv[1]))
    with open(sys.argv[2], "a") as spans:
        spans.write(f"{start} {time.time()} {os.environ['OMP_NUM_THREADS']}\\n")
    """)


def most_at_once(spans_file) -> int:
    spans = [tuple(map(float, line.split()[:2])) for line in spans_file.read_text().splitlines()]
    return max(sum(1 for s, e in spans if s <= start < e) for start, _ in spans)


@pytest.mark.expected_skip("needs at least two usable cores")
def test_client_experiments_run_as_many_at_once_as_their_cores_allow(sandbox: Sandbox, studioml_bin,
                                                                      tmp_path):
    """Issue 7's check with the real client on two cores: four experiments asking --cpus=1 run two at a
    time; three asking --cpus=2 never overlap; --max-cores 1 makes the first set run one at a time."""
    from studio_runner.resources import usable_cores

    if usable_cores() < 2:
        pytest.skip("needs at least two usable cores")
    project = tmp_path / "project"
    project.mkdir()
    (project / "span.py").write_text(SPAN)
    config = local_mode_config(tmp_path / "config.yaml", tmp_path / "store")

    def submit(cpus: int, count: int, spans) -> None:
        for _ in range(count):
            studio_run(studioml_bin, config, sandbox.base, project, "--queue=local_cores", f"--cpus={cpus}",
                       "span.py", "2", str(spans))

    cases = [(1, 4, "2", 2, "1"), (2, 3, "2", 1, "2"), (1, 4, "1", 1, "1")]
    for cpus, count, max_cores, expected, threads in cases:
        spans = tmp_path / f"spans-{cpus}-{max_cores}"
        submit(cpus, count, spans)
        result = sandbox.run_once(timeout=600, STUDIO_RUNNER_MAX_CORES=max_cores)
        assert result.returncode == 0, result.stderr[-4000:]
        lines = spans.read_text().splitlines()
        assert len(lines) == count, result.stderr[-4000:]
        assert {line.split()[2] for line in lines} == {threads}  # OMP_NUM_THREADS = reserved cores
        assert most_at_once(spans) == expected, (cpus, max_cores, lines)
        assert sandbox.pending("local_cores") == []

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

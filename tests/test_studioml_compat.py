"""What the real StudioML 0.0.49 client sends beyond a plain ``studio run``, run by the real runner CLI.

Each test submits over RabbitMQ + S3 (moto) the way the client does, runs ``studio-runner run --once`` and
checks the experiment's results in the bucket and an empty queue:

* extra ``pythonenv`` packages from the client library (``submit_experiments(..., python_pkg=[...])``);
* extra data artifacts: ``--capture-once`` (immutable input), ``--capture`` (mutable, comes back) and
  ``--reuse`` (another experiment's workspace, sent without credentials);
* an artifact given only by an ``http://`` URL;
* a completion-service task whose ``retval`` is read back with the client's own artifact code;
* ten completion-service tasks that finish at once, collected by the client's own ``CompletionService``.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import tarfile
import textwrap
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from support.fixtures import FIXTURES
from support.rabbitmq import publish_like_studioml, ready_count
from support.runner import Sandbox
from support.s3server import REGION, MotoS3
from support.studioml_client import cache_root, studio_run
from test_studioml_rabbitmq import Deployment, rmq_s3_config

pytestmark = pytest.mark.slow

EXTRA_PACKAGE = "tabulate==0.9.0"  # pure Python, not in the client's pip freeze


@pytest.fixture
def deployment(s3_server: MotoS3, rabbitmq_url: str, unique_queue: str, tmp_path: Path) -> Deployment:
    return Deployment(s3_server, rabbitmq_url, unique_queue, tmp_path)


def client_python(studioml_bin: Path, code: str, *args: str, cwd: Path, home: Path) -> str:
    """Run ``code`` with the client venv's interpreter (as the experimenter would); returns its stdout."""
    env = dict(os.environ, STUDIOML_HOME=str(home))
    env.pop("PYTHONPATH", None)
    done = subprocess.run([str(studioml_bin / "python"), "-c", code, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def project_dir(base: Path, name: str, files: dict[str, str]) -> Path:
    folder = base / name
    folder.mkdir(parents=True)
    for rel, text in files.items():
        (folder / rel).write_text(textwrap.dedent(text))
    return folder


def tar_members(deployment: Deployment, key: str) -> dict[str, bytes | None]:
    """Member name -> content (None for directories) of the tar at ``key`` in the deployment's bucket."""
    body = deployment.s3.get_object(Bucket=deployment.bucket, Key=key)["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        return {m.name: (tar.extractfile(m).read() if m.isfile() else None)  # type: ignore[union-attr]
                for m in tar.getmembers()}


def assert_ran(deployment: Deployment, result: subprocess.CompletedProcess[str], *keys: str) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    for key in keys:
        assert deployment.metadata(key)["studioml"]["outcome"]["status"] == "success"
    assert ready_count(deployment.amqp_url, deployment.queue) == 0


# --------------------------------------------------------------------------- 1. extra pythonenv packages

# studio-run's own code builds the experiment; only submit_experiments gets python_pkg, as a library caller's
# would (the CLI's --python-pkg is parsed and dropped by 0.0.49).
_SUBMIT_WITH_PACKAGES = """
import functools, json, sys
from studio import experiment_submitter, runner
runner.submit_experiments = functools.partial(experiment_submitter.submit_experiments,
                                              python_pkg=json.loads(sys.argv[1]))
runner.main(sys.argv[2:])
"""


def test_python_pkg_from_submit_experiments_is_installed(deployment: Deployment, sandbox: Sandbox,
                                                         studioml_bin: Path, tmp_path: Path):
    probe = subprocess.run([str(studioml_bin / "python"), "-c", "import tabulate"], capture_output=True)
    assert probe.returncode != 0, "the client venv has tabulate: it would not prove an extra package"
    project = project_dir(tmp_path, "project", {"uses_tabulate.py": """\
        import tabulate
        print("tabulate", tabulate.__version__, "from", tabulate.__file__)
        print(tabulate.tabulate([["answer", 42]], headers=["name", "value"], tablefmt="github"))
        """})
    key = f"client_pkg_{uuid.uuid4().hex[:12]}"
    client_python(studioml_bin, _SUBMIT_WITH_PACKAGES, json.dumps([EXTRA_PACKAGE]),
                  "--config", str(deployment.config), f"--experiment={key}", f"--queue={deployment.queue}",
                  "uses_tabulate.py", cwd=project, home=tmp_path / "home")
    assert ready_count(deployment.amqp_url, deployment.queue) == 1

    result = deployment.run_runner(sandbox)
    assert_ran(deployment, result, key)
    output = deployment.member(f"experiments/{key}/output.tar", "output")
    line = next(x for x in output.splitlines() if x.startswith("tabulate "))
    version, origin = line.split()[1], line.split(" from ", 1)[1]
    assert version == EXTRA_PACKAGE.split("==")[1]
    assert origin.startswith(str(cache_root() / "envs")), origin  # the runner's built env, not ours
    assert "| answer |      42 |" in output


# --------------------------------------------------------------------------- 2. data artifacts


def test_capture_once_capture_and_reuse(deployment: Deployment, sandbox: Sandbox, studioml_bin: Path,
                                        tmp_path: Path):
    home = tmp_path / "home"
    earlier = project_dir(tmp_path, "earlier", {
        "prev.py": 'print("earlier experiment ran")\n',
        "marker.txt": "from the earlier workspace\n",
    })
    prev_key = studio_run(studioml_bin, deployment.config, home, earlier, f"--queue={deployment.queue}",
                          "prev.py")
    data = project_dir(tmp_path, "data", {"input.txt": "immutable input 7\n"})
    results = project_dir(tmp_path, "results", {"local.txt": "the client does not upload mutable dirs\n"})
    project = project_dir(tmp_path, "project", {"hello.py": """\
        import os
        print("data:", open("../data/input.txt").read().strip())
        print("reused:", open("../prev_workspace/marker.txt").read().strip())
        print("results before:", sorted(os.listdir("../results")))
        with open("../results/result.txt", "w") as handle:
            handle.write("computed from " + open("../data/input.txt").read().split()[-1])
        """})
    key = studio_run(studioml_bin, deployment.config, home, project, f"--queue={deployment.queue}",
                     f"--capture-once={data}:data", f"--capture={results}:results",
                     f"--reuse={prev_key}/workspace:prev_workspace", "hello.py")
    assert ready_count(deployment.amqp_url, deployment.queue) == 2
    results_key = f"experiments/{key}/results.tar"
    assert results_key not in deployment.keys("experiments/")  # the client uploads no mutable artifact
    seed = io.BytesIO()  # what an earlier attempt would have left: it must be downloaded and kept
    with tarfile.open(fileobj=seed, mode="w") as tar:
        info = tarfile.TarInfo("seed.txt")
        info.size = len(b"from an earlier attempt\n")
        tar.addfile(info, io.BytesIO(b"from an earlier attempt\n"))
    deployment.s3.put_object(Bucket=deployment.bucket, Key=results_key, Body=seed.getvalue())

    result = deployment.run_runner(sandbox)
    assert_ran(deployment, result, prev_key, key)
    output = deployment.member(f"experiments/{key}/output.tar", "output")
    assert "data: immutable input 7" in output
    # --reuse sends the artifact with no credentials at all: the runner used config.storage's (same endpoint)
    assert "reused: from the earlier workspace" in output
    assert "results before: ['seed.txt']" in output
    members = tar_members(deployment, results_key)
    assert members == {"result.txt": b"computed from 7", "seed.txt": b"from an earlier attempt\n"}


# --------------------------------------------------------------------------- 3. URL-only artifact


def test_url_only_artifact_is_fetched_over_http(deployment: Deployment, sandbox: Sandbox, studioml_bin: Path,
                                               s3_open_server: MotoS3, tmp_path: Path):
    public = s3_open_server.client()
    bucket = f"pub-{uuid.uuid4().hex[:12]}"
    public.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
    public.put_object(Bucket=bucket, Key="datasets/url-data.txt", Body=b"served over plain http\n",
                      ACL="public-read")
    url = f"{s3_open_server.http_url}/{bucket}/datasets/url-data.txt"
    with urllib.request.urlopen(url, timeout=10) as response:  # anonymous, like the runner's GET
        assert response.read() == b"served over plain http\n"
    project = project_dir(tmp_path, "project", {"hello.py": """\
        import os
        print("urldata dir:", sorted(os.listdir("../urldata")))
        print("urldata:", open("../urldata/url-data.txt").read().strip())
        """})
    key = studio_run(studioml_bin, deployment.config, tmp_path / "home", project,
                     f"--queue={deployment.queue}", f"--capture-once={url}:urldata", "hello.py")

    result = deployment.run_runner(sandbox)
    assert_ran(deployment, result, key)
    output = deployment.member(f"experiments/{key}/output.tar", "output")
    assert "urldata dir: ['url-data.txt']" in output
    assert "urldata: served over plain http" in output


# --------------------------------------------------------------------------- 4. completion service

# The stub studioml 0.0.49 ships calls names its own package no longer has (logs.get_logger, util.rm_rf,
# artifacts_tracker.get_experiment). The fixture's harness ran it with a shim on PYTHONPATH; this one travels
# in the workspace and is put on PYTHONPATH by config.env.
_COMPAT_SITECUSTOMIZE = '''\
"""studioml 0.0.49's completion_service_client.py needs these names back."""
from studio import logs, util
from studio.artifacts import artifacts_tracker
from studio.util import util as _util

logs.get_logger = logs.getLogger
util.rm_rf = _util.rm_rf
artifacts_tracker.get_experiment = artifacts_tracker.get_artifact
'''

_TASK = """\
import os


def clientFunction(args, files):
    return {"sum": sum(args["numbers"]), "greeting": args["greeting"].upper(), "files": sorted(files),
            "cwd": os.path.basename(os.getcwd())}
"""

# The package directory is found without importing it: as shipped it does not import (studio.util lacks
# rsync_cp), which is also why this test builds the task message itself.
_CLIENT_FACTS = """
import importlib.util, json, os
from studio.dependencies_policies.studio_dependencies_policy import StudioDependencyPolicy
studio_dir = importlib.util.find_spec("studio").submodule_search_locations[0]
print(json.dumps({"pythonenv": StudioDependencyPolicy().generate({"gpus": 0}),
                  "package_dir": os.path.join(studio_dir, "completion_service")}))
"""

# What CompletionService.getResultsWithTimeout does with the retval artifact once the experiment is back:
# db.get_artifact(...) (download + the client's untar_artifact), then open() the path and unpickle it.
_CLIENT_READ_RETVAL = """
import json, os, pickle, sys
from studio import model
from studio.artifacts.artifact import Artifact
config = model.get_config(sys.argv[1])
with model.get_db_provider(config) as db:
    path = db.get_artifact(Artifact("retval", json.loads(sys.argv[2])))
facts = {"path": path, "isfile": os.path.isfile(path), "isdir": os.path.isdir(path)}
if facts["isdir"]:
    facts["listing"] = sorted(os.listdir(path))
try:
    with open(path, "rb") as handle:
        facts["value"] = pickle.load(handle)
except Exception as exc:
    facts["error"] = repr(exc)
print(json.dumps(facts))
"""


def _client_facts(studioml_bin: Path, tmp_path: Path) -> dict[str, Any]:
    return json.loads(client_python(studioml_bin, _CLIENT_FACTS, cwd=tmp_path, home=tmp_path / "home"))


def _tar_single_file(path: Path) -> bytes:
    """A single-file artifact packed the way the client's ``_tar_artifact_single_file`` does: ``./<name>``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(path, "./" + path.name)
    return buffer.getvalue()


def _tar_directory(path: Path) -> bytes:
    """A directory artifact packed the way the client's ``_tar_artifact_directory`` does: bare names."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in os.listdir(path):
            tar.add(path / name, arcname=name)
    return buffer.getvalue()


def test_completion_service_task_retval_read_by_client(deployment: Deployment, sandbox: Sandbox,
                                                      studioml_bin: Path, tmp_path: Path):
    facts = _client_facts(studioml_bin, tmp_path)
    assert any(p.lower() == "studioml==0.0.49" for p in facts["pythonenv"])
    project = f"completion_service_{uuid.uuid4().hex[:10]}"
    key = f"{project}_0"
    home = tmp_path / "home"

    # The workspace is what submitTaskWithFiles rsyncs (to ~/.studioml/experiments/<key>/workspace, which
    # is also where the client later puts retval): the client's completion_service directory.
    workspace = home / "experiments" / key / "workspace"
    workspace.mkdir(parents=True)
    for source in Path(facts["package_dir"]).glob("*.py"):
        shutil.copy(source, workspace / source.name)
    (workspace / "_studio_compat").mkdir()
    (workspace / "_studio_compat" / "sitecustomize.py").write_text(_COMPAT_SITECUSTOMIZE)
    task = tmp_path / "fanout_task.py"
    task.write_text(_TASK)
    args_file = tmp_path / f"{key}_args.pkl"
    args_file.write_bytes(pickle.dumps({"numbers": [1, 2, 3, 4], "greeting": "hi"}, protocol=2))

    endpoint, bucket = deployment.server.endpoint, deployment.bucket

    def artifact(mutable: bool, object_key: str, local: Path, body: bytes | None) -> dict[str, Any]:
        if body is not None:
            deployment.s3.put_object(Bucket=bucket, Key=object_key, Body=body)
        return {"unpack": True, "mutable": mutable, "key": object_key, "local": str(local),
                "qualified": f"s3://{endpoint}/{bucket}/{object_key}", "bucket": bucket}

    blob = f"blobstore/{uuid.uuid4().hex}"
    artifacts = {  # as in completion_service.json: no credentials on any of them
        "retval": artifact(True, f"experiments/{key}/retval.tar", home / "experiments" / key / "retval",
                           None),
        "clientscript": artifact(False, f"{blob}-clientscript.tar", task, _tar_single_file(task)),
        "args": artifact(False, f"{blob}-args.tar", args_file, _tar_single_file(args_file)),
        "workspace": artifact(False, f"{blob}-workspace.tar", workspace, _tar_directory(workspace)),
    }
    fixture = json.loads((FIXTURES / "completion_service.json").read_text())
    creds = deployment.server.credentials
    aws = {"access_key": creds.access_key, "secret_access_key": creds.secret_key, "region": REGION}
    store = {"type": "s3", "endpoint": deployment.server.http_url, "credentials": {"aws": aws}}
    experiment = dict(fixture["experiment"], key=key, project=project, time_added=time.time(),
                      time_last_checkpoint=time.time(), pythonenv=facts["pythonenv"], artifacts=artifacts)
    config = dict(fixture["config"],
                  storage=dict(store, bucket=bucket), database=dict(store, bucket=f"{bucket}-db"),
                  cloud={"queue": {"rmq": deployment.amqp_url}},
                  env={"PYTHONPATH": "_studio_compat"})
    assert experiment["filename"] == "completion_service_client.py"
    publish_like_studioml(deployment.amqp_url, deployment.queue, {"experiment": experiment, "config": config})

    result = deployment.run_runner(sandbox)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert ready_count(deployment.amqp_url, deployment.queue) == 0
    members = tar_members(deployment, f"experiments/{key}/retval.tar")

    read = json.loads(client_python(studioml_bin, _CLIENT_READ_RETVAL, str(deployment.config),
                                    json.dumps(artifacts["retval"]), cwd=tmp_path, home=home))
    # With Go's member name "retval" the client unpacks a directory and open() fails (IsADirectoryError):
    # its untar_artifact restores a file only from a tar whose sole member is "./<name>".
    assert read["isfile"], f"the client got {read} from retval.tar members {sorted(members)}"
    assert list(members) == ["./retval"]
    value = read["value"]
    assert value["sum"] == 10 and value["greeting"] == "HI" and value["cwd"] == "workspace"
    assert {"args", "clientscript"} <= set(value["files"])


# --------------------------------------------------------------------------- 5. client's CompletionService

# studioml 0.0.49's completion_service.py imports names its package no longer has (studio.util.rsync_cp and
# parse_verbosity, logs.get_logger, studio.experiment.create_experiment, whose current version lives in
# studio.experiments and wants a dependency policy); they are put back before the import, and rsync_cp copies
# with shutil (adding the runner-side shim _COMPAT_SITECUSTOMIZE to each task's workspace) instead of rsync.
_CLIENT_COMPLETION_SERVICE = """
import functools, json, os, shutil, sys, time, types
import studio.util as studio_util
from studio import logs
from studio.dependencies_policies.studio_dependencies_policy import StudioDependencyPolicy
from studio.experiments import experiment as experiments_module
from studio.queues import rabbit_queue
from studio.util import util as util_module

config_file, queue, task_file, compat_dir, count = sys.argv[1:6]


def rsync_cp(source, dest, ignore_arg="", logger=None):
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(compat_dir, os.path.join(dest, "_studio_compat"))


studio_util.rsync_cp = rsync_cp
studio_util.parse_verbosity = util_module.parse_verbosity
logs.get_logger = logs.getLogger
legacy_experiment = types.ModuleType("studio.experiment")
legacy_experiment.create_experiment = functools.partial(
    experiments_module.create_experiment, dependency_policy=StudioDependencyPolicy(), from_compl_service=True)
sys.modules["studio.experiment"] = legacy_experiment


def enqueue(self, msg, retries=10):
    # RMQueue.enqueue records a delivery only after publishing it; when the broker confirms first, the IO
    # thread's list.remove fails, the connection drops and the message is "never acknowledged" (a client
    # race, seen within ten quick submissions). Same protocol, recorded before publishing.
    import pika
    for _ in range(retries):
        if self._channel is not None and self._channel.is_open and not self._queue_deleted:
            break
        time.sleep(1)
    with self._msg_tracking_lock:
        self._message_number += 1
        number = self._message_number
        self._deliveries.append(number)
    properties = pika.BasicProperties(app_id="studioml", content_type="application/json",
                                      delivery_mode=2 if self._is_persistent else None)
    self._channel.basic_publish(exchange=self._exchange, routing_key=self._routing_key, body=msg,
                                properties=properties, mandatory=True)
    for _ in range(retries * 20):
        time.sleep(0.05)
        with self._msg_tracking_lock:
            if number not in self._deliveries:
                return number
    raise Exception(f"studioml message {number} was never acknowledged")


rabbit_queue.RMQueue.enqueue = enqueue
from studio.completion_service.completion_service import CompletionService

cs_config = {"queue": queue, "num_workers": 1, "sleep_time": 0.5, "timeout": 600,
             "resources_needed": {"cpus": 1, "ram": "1g", "hdd": "2g", "gpus": 0}}
results, started = {}, time.time()
with CompletionService(queue, cs_config=cs_config, studio_config_file=config_file) as service:
    submitted = [service.submitTaskWithFiles(task_file, {"n": n}, {}, job_id=n) for n in range(int(count))]
    while len(results) < len(submitted) and time.time() - started < 600:
        got = service.getResultsWithTimeout(timeout=max(1, 600 - (time.time() - started)))
        if got is None:
            break
        results[got[0]] = got[1]
print(json.dumps({"submitted": submitted, "results": results}))
"""

_QUICK_TASK = """\
def clientFunction(args, files):
    return {"twice": args["n"] * 2}
"""


def test_completion_service_collects_every_result_of_tasks_that_finish_at_once(
        s3_server: MotoS3, rabbitmq_url: str, unique_queue: str, sandbox: Sandbox, studioml_bin: Path,
        tmp_path: Path):
    """Ten tasks that return at once, through the client's own CompletionService: each result is accepted
    only if its ``retval``'s mtime is later than the submit time, which a runner finishing within the
    same second used to miss (whole-second tar mtimes), so ``getResultsWithTimeout`` never returned it."""
    config_extra = "env:\n    PYTHONPATH: _studio_compat\n"
    deployment = Deployment(s3_server, rabbitmq_url, unique_queue, tmp_path)
    rmq_s3_config(deployment.config, s3_server, deployment.bucket, rabbitmq_url, config_extra)
    compat = tmp_path / "compat"
    compat.mkdir()
    (compat / "sitecustomize.py").write_text(_COMPAT_SITECUSTOMIZE)
    task = tmp_path / "quick_task.py"
    task.write_text(_QUICK_TASK)
    count = 10

    runner = sandbox.start(AMQP_URL=deployment.amqp_url, QUEUE_MATCH=f"^{deployment.queue}$")
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(runner.stdout or []), daemon=True)
    reader.start()  # keep the runner's pipe drained
    try:
        out = client_python(studioml_bin, _CLIENT_COMPLETION_SERVICE, str(deployment.config),
                            deployment.queue, str(task), str(compat), str(count), cwd=tmp_path,
                            home=tmp_path / "home")
    finally:
        runner.send_signal(signal.SIGTERM)
        try:
            runner.wait(60)
        except subprocess.TimeoutExpired:
            runner.kill()
            runner.wait()
        reader.join(10)
    report = json.loads(out.strip().splitlines()[-1])
    assert len(report["submitted"]) == count
    expected = {key: {"twice": 2 * int(key.rsplit("_", 1)[1])} for key in report["submitted"]}
    assert report["results"] == expected, "".join(log)[-5000:]

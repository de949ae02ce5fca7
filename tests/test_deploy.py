"""The deployment files (Dockerfile, deploy/k8s, deploy/docker-desktop) against the runner they deploy.

Why: manifests rot silently. A renamed option, a probe on the wrong port or a state file mounted where the
runner does not look only shows up in a cluster. Here every manifest validates against the Kubernetes
schemas (kubernetes-validate ships them; no network), every variable set for the runner is an option that
``studio_runner.config`` accepts and its value parses, the probes, Service and annotations use the port of
``prom-address``, the state ConfigMap is mounted where ``state-file`` points, and the grace period covers the
drain. A live runner started with the ConfigMap's environment answers the image's HEALTHCHECK script and
obeys the state file. Building the image needs a Docker daemon and base images; the build itself is checked
by hand (deploy/README.md), the Dockerfile here statically.
"""

from __future__ import annotations

import copy
import http.server
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest
import yaml

from studio_runner import config, units
from studio_runner.supervisor import INTAKE_STATES

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "docker-desktop" / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"

K8S_VERSIONS = ("1.27.0", kubernetes_validate.utils.latest_version())
"""The oldest Kubernetes still common in managed clusters, and the newest schemas shipped."""

OPTION_VARIABLES = {name for option in config.OPTIONS for name in option.env_names}
IMAGE_VARIABLES = {"PATH", "HOME", "PYTHONUNBUFFERED", "DEBIAN_FRONTEND", "PIP_NO_CACHE_DIR",
                   "PIP_DISABLE_PIP_VERSION_CHECK"}
"""Variables the Dockerfile sets that are not runner options; anything else it sets must be one."""

SPEC_KEY_MOUNTS = {
    # spec/options.md §4: secret name -> directory under the runner's working directory (default key dirs)
    "studioml-runner-key-secret": "certs/message/encryption",
    "studioml-runner-passphrase-secret": "certs/message/passphrase",
    "studioml-signing": "certs/queues/signing",
    "studioml-report-keys": "certs/queues/response-encrypt",
}


# ---- loading ---------------------------------------------------------------------------------------------

def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _manifest_files() -> list[Path]:
    """Every Kubernetes manifest; kustomizations and patches are not resources."""
    return sorted(path for path in K8S.rglob("*.yaml")
                  if path.name != "kustomization.yaml" and not path.name.endswith(".patch.yaml"))


def _base() -> dict[tuple[str, str], dict[str, Any]]:
    resources: dict[tuple[str, str], dict[str, Any]] = {}
    for path in (K8S / "base").glob("*.yaml"):
        if path.name != "kustomization.yaml":
            for doc in _documents(path):
                resources[(doc["kind"], doc["metadata"]["name"])] = doc
    return resources


def _secrets() -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in _documents(K8S / "secrets.example.yaml")}


def _gpu_deployment() -> dict[str, Any]:
    """base/deployment.yaml with the GPU overlay's JSON 6902 patch applied, as kustomize would."""
    kustomization = yaml.safe_load((K8S / "gpu" / "kustomization.yaml").read_text())
    (patch_entry,) = kustomization["patches"]
    target = patch_entry["target"]
    deployment = _base()[(target["kind"], target["name"])]
    operations = yaml.safe_load((K8S / "gpu" / patch_entry["path"]).read_text())
    patched: dict[str, Any] = jsonpatch.apply_patch(copy.deepcopy(deployment), operations)
    return patched


def _runner_container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _k8s_environ() -> dict[str, str]:
    """What the runner container sees: the image's ENV, the ConfigMap (envFrom), then env (the Secret)."""
    resources = _base()
    container = _runner_container(resources[("Deployment", "studio-runner")])
    environ = dict(_dockerfile_env())
    for source in container.get("envFrom", []):
        environ.update(resources[("ConfigMap", source["configMapRef"]["name"])]["data"])
    secrets = _secrets()
    for variable in container.get("env", []):
        if "value" in variable:
            environ[variable["name"]] = variable["value"]
        else:
            ref = variable["valueFrom"]["secretKeyRef"]
            environ[variable["name"]] = secrets[ref["name"]]["stringData"][ref["key"]]
    return environ


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined: list[str] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        joined.append(pending + stripped)
        pending = ""
    assert not pending, "Dockerfile ends in a continuation line"
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in joined]


def _dockerfile_env() -> dict[str, str]:
    """ENV of the final stage, KEY=VALUE form, $PATH-style references left as written."""
    stages = _stages()
    environ: dict[str, str] = {}
    for instruction, arguments in stages[-1]:
        if instruction == "ENV":
            for item in shlex.split(arguments):
                key, sep, value = item.partition("=")
                assert sep, f"ENV {arguments!r}: use the KEY=VALUE form"
                environ[key] = value
    return environ


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction, arguments in _dockerfile_instructions():
        if instruction == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction, arguments))
    return stages


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def _compose_environ() -> dict[str, str]:
    """The runner service's environment over the image's; Compose turns ``$$`` into ``$``."""
    service = _compose()["services"]["runner"]
    environ = dict(_dockerfile_env())
    for key, value in service["environment"].items():
        text = str(value)
        assert re.search(r"\$(?!\$)", text.replace("$$", "")) is None, \
            f"compose {key}: interpolation is not expected in the runner's options"
        environ[key] = text.replace("$$", "$")
    return environ


def _quantity(text: str) -> int:
    """A Kubernetes memory quantity (``100Gi``, ``512Mi``) in bytes."""
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", str(text))
    assert match, f"unexpected quantity {text!r}"
    power = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4}.get(match.group(2) or "", 0)
    return int(match.group(1)) * 1024 ** power


def _runner_variables(environ: dict[str, str]) -> set[str]:
    return {name for name in environ if name not in IMAGE_VARIABLES}


# ---- Kubernetes schemas ----------------------------------------------------------------------------------

@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", _manifest_files(), ids=lambda path: str(path.relative_to(K8S)))
def test_manifest_validates_against_kubernetes_schema(path: Path, version: str) -> None:
    documents = _documents(path)
    assert documents
    for document in documents:
        assert "namespace" not in document["metadata"], f"{path.name}: manifests stay namespace-agnostic"
        kubernetes_validate.validate(document, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_gpu_overlay_renders_a_valid_deployment_with_gpus(version: str) -> None:
    deployment = _gpu_deployment()
    kubernetes_validate.validate(deployment, version, strict=True)
    container = _runner_container(deployment)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == container["resources"]["requests"][
        "nvidia.com/gpu"]
    assert container["image"] != _runner_container(_base()[("Deployment", "studio-runner")])["image"]


def test_schema_validation_rejects_a_broken_manifest() -> None:
    """The check above can fail: a misspelt field is refused in strict mode."""
    deployment = copy.deepcopy(_base()[("Deployment", "studio-runner")])
    _runner_container(deployment)["livenessProbe"]["httpGett"] = {"path": "/healthz", "port": 9090}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def test_kustomizations_name_existing_files_and_every_base_manifest() -> None:
    base = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    listed = set(base["resources"])
    on_disk = {path.name for path in (K8S / "base").glob("*.yaml") if path.name != "kustomization.yaml"}
    assert listed == on_disk
    gpu = yaml.safe_load((K8S / "gpu" / "kustomization.yaml").read_text())
    for resource in gpu["resources"]:
        assert (K8S / "gpu" / resource).resolve().is_dir()
    for patch in gpu["patches"]:
        assert (K8S / "gpu" / patch["path"]).is_file()
        assert (patch["target"]["kind"], patch["target"]["name"]) in _base()


# ---- options ---------------------------------------------------------------------------------------------

def test_configmap_sets_only_runner_options_and_no_secret() -> None:
    data = _base()[("ConfigMap", "studio-runner-options")]["data"]
    unknown = set(data) - OPTION_VARIABLES
    assert not unknown, f"not runner options: {sorted(unknown)}"
    secret_names = {name for option in config.OPTIONS if option.secret for name in option.env_names}
    assert not set(data) & secret_names, "broker URLs carry passwords: they come from a Secret"


def test_deployment_environment_is_runner_options_and_resolves() -> None:
    environ = _k8s_environ()
    unknown = _runner_variables(environ) - OPTION_VARIABLES
    assert not unknown, f"not runner options: {sorted(unknown)}"
    settings = config.resolve({}, environ=environ)
    assert settings.sources["amqp-url"] == "environment"
    assert settings.amqp_url.startswith("amqp://")
    for name in _base()[("ConfigMap", "studio-runner-options")]["data"]:
        option = next(option for option in config.OPTIONS if name in option.env_names)
        assert settings.sources[option.name] == "environment", name


def test_resolve_rejects_a_bad_configmap_value() -> None:
    """The resolve checks above can fail: a value the runner would refuse is refused here too."""
    environ = _k8s_environ() | {"STUDIO_RUNNER_DRAIN_TIMEOUT": "twenty minutes"}
    with pytest.raises(config.ConfigError, match="DRAIN_TIMEOUT"):
        config.resolve({}, environ=environ)


def test_dockerfile_and_compose_set_only_runner_options_that_resolve() -> None:
    for environ in (_dockerfile_env(), _compose_environ()):
        unknown = _runner_variables(environ) - OPTION_VARIABLES
        assert not unknown, f"not runner options: {sorted(unknown)}"
        config.resolve({}, environ=environ)
    args = [arguments for instruction, arguments in _stages()[-1] if instruction == "ARG"]
    for argument in args:
        name = argument.split("=", 1)[0]
        assert not name.startswith(config.ENV_PREFIX) or name in OPTION_VARIABLES, name


def test_probes_service_and_annotations_use_the_prom_address_port() -> None:
    resources = _base()
    settings = config.resolve({}, environ=_k8s_environ())
    host, _, port = settings.prom_address.rpartition(":")
    assert host == "0.0.0.0", "a loopback status address is unreachable for the kubelet's probes"
    deployment = resources[("Deployment", "studio-runner")]
    container = _runner_container(deployment)
    ports = {entry["name"]: entry["containerPort"] for entry in container["ports"]}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/healthz"
        assert ports.get(get["port"], get["port"]) == int(port), probe
    service = resources[("Service", "studio-runner-metrics")]
    (service_port,) = service["spec"]["ports"]
    assert ports.get(service_port["targetPort"], service_port["targetPort"]) == int(port)
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    for notes in (service["metadata"]["annotations"], deployment["spec"]["template"]["metadata"][
            "annotations"]):
        assert notes["prometheus.io/scrape"] == "true"
        assert notes["prometheus.io/port"] == port
        assert notes["prometheus.io/path"] == "/metrics"
    compose = _compose()["services"]["runner"]
    compose_port = config.resolve({}, environ=_compose_environ()).prom_address.rpartition(":")[2]
    assert any(str(mapping).endswith(f":{compose_port}") for mapping in compose["ports"])
    dockerfile = dict(_stages()[-1])
    assert dockerfile["EXPOSE"].split() == [port]


def test_state_configmap_is_mounted_where_state_file_points() -> None:
    resources = _base()
    settings = config.resolve({}, environ=_k8s_environ())
    deployment = resources[("Deployment", "studio-runner")]
    pod = deployment["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    (mount,) = [mount for mount in _runner_container(deployment)["volumeMounts"]
                if "configMap" in volumes[mount["name"]]]
    assert "subPath" not in mount, "a subPath mount never sees ConfigMap updates"
    state_map = resources[("ConfigMap", volumes[mount["name"]]["configMap"]["name"])]
    (key,) = state_map["data"]
    assert settings.state_file == Path(mount["mountPath"]) / key
    assert state_map["data"][key] in INTAKE_STATES
    compose = _compose()["services"]["runner"]
    compose_state = config.resolve({}, environ=_compose_environ()).state_file
    (host_dir,) = [volume.split(":")[0] for volume in compose["volumes"]
                   if volume.split(":")[1] == str(compose_state.parent)]
    assert (COMPOSE.parent / host_dir / compose_state.name).read_text().strip() in INTAKE_STATES


def test_grace_periods_cover_the_drain() -> None:
    settings = config.resolve({}, environ=_k8s_environ())
    needed = settings.drain_timeout + settings.grace_period + settings.upload_retry_window
    pod = _base()[("Deployment", "studio-runner")]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= needed + 60
    compose = config.resolve({}, environ=_compose_environ())
    stop = units.parse_duration(_compose()["services"]["runner"]["stop_grace_period"])
    assert stop >= compose.drain_timeout + compose.grace_period + 30


def test_volumes_hold_what_the_runner_may_write() -> None:
    settings = config.resolve({}, environ=_k8s_environ())
    deployment = _base()[("Deployment", "studio-runner")]
    pod = deployment["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {Path(mount["mountPath"]): volumes[mount["name"]]
              for mount in _runner_container(deployment)["volumeMounts"]}

    def volume_of(path: Path) -> dict[str, Any]:
        holders = [mount for mount in mounts if path == mount or mount in path.parents]
        assert holders, f"{path} is on no volume (the root file system is read-only)"
        return mounts[max(holders, key=lambda mount: len(mount.parts))]

    work = volume_of(settings.working_dir)
    assert settings.max_disk and settings.max_disk <= _quantity(work["emptyDir"]["sizeLimit"])
    cache = volume_of(settings.env_cache_dir)
    assert volume_of(settings.uv_cache_dir) is cache, "uv hardlinks only within one file system"
    assert volume_of(settings.cache_dir) is cache
    assert settings.env_cache_size + settings.cache_size < _quantity(cache["emptyDir"]["sizeLimit"])
    volume_of(Path("/tmp"))
    volume_of(Path(_dockerfile_env()["HOME"]))


def test_pod_runs_as_the_images_unprivileged_user() -> None:
    pod = _base()[("Deployment", "studio-runner")]["spec"]["template"]["spec"]
    user = dict(_stages()[-1])["USER"]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, "a numeric USER lets runAsNonRoot verify it"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(uid)
    assert pod["securityContext"]["runAsGroup"] == int(gid or uid)
    container = _runner_container(_base()[("Deployment", "studio-runner")])
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_message_key_secrets_are_mounted_at_the_spec_paths() -> None:
    deployment = _base()[("Deployment", "studio-runner")]
    pod = deployment["spec"]["template"]["spec"]
    by_secret = {volume["secret"]["secretName"]: volume for volume in pod["volumes"] if "secret" in volume}
    mounts = {mount["name"]: mount for mount in _runner_container(deployment)["volumeMounts"]}
    workdir = Path(dict(_stages()[-1])["WORKDIR"])
    for secret, relative in SPEC_KEY_MOUNTS.items():
        volume = by_secret[secret]
        assert volume["secret"]["optional"] is True, f"{secret}: pods must start without message keys"
        assert Path(mounts[volume["name"]]["mountPath"]) == workdir / relative
        assert mounts[volume["name"]]["readOnly"] is True
    assert set(SPEC_KEY_MOUNTS) | {"studio-runner-amqp"} == set(_secrets())


# ---- Dockerfile ------------------------------------------------------------------------------------------

def test_dockerfile_is_multi_stage_non_root_with_healthcheck() -> None:
    stages = _stages()
    assert len(stages) >= 2
    names = [arguments.split()[-1] for stage in stages for instruction, arguments in stage
             if instruction == "FROM"]
    assert names[0] == "builder" and names[-1] == "runtime"
    final = stages[-1]
    instructions = dict(final)
    assert any(instruction == "COPY" and arguments.startswith("--from=builder") for instruction, arguments in
               final), "the runtime stage takes the venv from the builder"
    assert not any(instruction == "RUN" and "pip install" in arguments for instruction, arguments in final)
    assert instructions["USER"].split(":")[0] not in ("root", "0")
    assert [instruction for instruction, _ in final].index("USER") > max(
        index for index, (instruction, _) in enumerate(final) if instruction in ("RUN", "COPY"))
    assert instructions["ENTRYPOINT"] == '["studio-runner"]'
    assert instructions["CMD"] == '["run"]'
    assert "healthcheck.py" in instructions["HEALTHCHECK"]
    volumes = yaml.safe_load(instructions["VOLUME"])
    settings = config.resolve({}, environ=_dockerfile_env())
    for path in (settings.working_dir, settings.env_cache_dir, settings.cache_dir, settings.uv_cache_dir):
        assert any(Path(volume) in path.parents for volume in volumes), f"{path} is on no VOLUME"


def test_cuda_variant_is_the_documented_build_argument() -> None:
    """The CUDA image is this Dockerfile with BASE_IMAGE set; both stages must build on that argument."""
    stages = _stages()
    global_args = [arguments.split("=", 1)[0] for instruction, arguments in _dockerfile_instructions()[:1]
                   if instruction == "ARG"]
    assert global_args == ["BASE_IMAGE"]
    assert all(stage[0][1].split()[0] == "${BASE_IMAGE}" for stage in stages)
    documented = (DEPLOY / "README.md").read_text() + DOCKERFILE.read_text()
    assert re.search(r"--build-arg BASE_IMAGE=nvidia/cuda:\S+-runtime-\S+", documented)


def test_dockerignore_lets_through_exactly_what_the_dockerfile_copies() -> None:
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    copied: set[str] = set()
    for stage in _stages():
        for instruction, arguments in stage:
            if instruction == "COPY" and not arguments.startswith("--from="):
                copied.update(arguments.split()[:-1])
    assert copied == allowed
    for source in copied:
        assert (ROOT / source).exists(), source


# ---- the healthcheck script and a live runner ------------------------------------------------------------

class _Healthz(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()
        self.wfile.write(b"ok\n")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def healthz_server() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Healthz)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _healthcheck(environ: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(HEALTHCHECK)], env={"PATH": os.environ["PATH"], **environ},
                          capture_output=True, text=True, timeout=30)


def test_healthcheck_script_follows_the_prom_address(healthz_server: http.server.HTTPServer) -> None:
    port = healthz_server.server_address[1]
    assert _healthcheck({"STUDIO_RUNNER_PROM_ADDRESS": f"0.0.0.0:{port}"}).returncode == 0
    assert _healthcheck({"PROM_ADDRESS": f"127.0.0.1:{port}"}).returncode == 0
    _Healthz.status = 503
    try:
        failed = _healthcheck({"STUDIO_RUNNER_PROM_ADDRESS": f"0.0.0.0:{port}"})
    finally:
        _Healthz.status = 200
    assert failed.returncode == 1 and "503" in failed.stderr
    assert _healthcheck({"STUDIO_RUNNER_PROM_ADDRESS": ""}).returncode == 1


def _free_port() -> int:
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _start_runner_with_pod_environment(tmp_path: Path) -> tuple[subprocess.Popen[str], dict[str, str]]:
    """The pod's environment with its volumes moved under tmp_path and a local queue instead of the broker;
    the runner's output goes to tmp_path/runner.log (a pipe nobody reads could fill and stall it)."""
    environ = _k8s_environ()
    del environ["STUDIO_RUNNER_AMQP_URL"]
    for name, value in list(environ.items()):
        if name.startswith(config.ENV_PREFIX) and value.startswith("/"):
            environ[name] = str(tmp_path / value.lstrip("/"))
    host, _, _ = environ["STUDIO_RUNNER_PROM_ADDRESS"].rpartition(":")
    environ["STUDIO_RUNNER_PROM_ADDRESS"] = f"{host}:{_free_port()}"
    environ.update(STUDIO_RUNNER_MAX_DISK="1GiB", STUDIO_RUNNER_DISK_RESERVE="1MiB",
                   STUDIO_RUNNER_QUEUE_ROOT=str(tmp_path / "queue"), HOME=str(tmp_path / "home"),
                   PATH=os.environ["PATH"])
    for directory in ("queue", "home"):
        (tmp_path / directory).mkdir()
    state_file = Path(environ["STUDIO_RUNNER_STATE_FILE"])
    state_file.parent.mkdir(parents=True)
    state_file.write_text("Running\n")
    with open(tmp_path / "runner.log", "w") as log:
        runner = subprocess.Popen([sys.executable, "-m", "studio_runner", "run"], cwd=tmp_path, env=environ,
                                  stdout=log, stderr=subprocess.STDOUT, text=True)
    return runner, environ


def _stop(runner: subprocess.Popen[str]) -> None:
    if runner.poll() is None:
        runner.send_signal(signal.SIGKILL)
        runner.wait()


def test_runner_with_the_pod_environment_obeys_the_state_file(tmp_path: Path) -> None:
    """DrainAndTerminate written where the state ConfigMap is mounted makes the runner exit 0."""
    runner, environ = _start_runner_with_pod_environment(tmp_path)
    log = tmp_path / "runner.log"
    try:
        deadline = time.monotonic() + 60
        while "state file" not in log.read_text():
            assert runner.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "no start-up banner within 60 s"
            time.sleep(0.1)
        Path(environ["STUDIO_RUNNER_STATE_FILE"]).write_text("DrainAndTerminate\n")
        assert runner.wait(timeout=60) == 0, log.read_text()
    finally:
        _stop(runner)
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert lines and all(line.startswith("{") for line in lines), "STUDIO_RUNNER_LOG_FORMAT=json"
    assert "DrainAndTerminate" in log.read_text()


def test_images_healthcheck_passes_against_the_runner_with_the_pod_environment(tmp_path: Path) -> None:
    """What the kubelet's probes and Docker's HEALTHCHECK see: /healthz on the prom-address port."""
    runner, environ = _start_runner_with_pod_environment(tmp_path)
    try:
        deadline = time.monotonic() + 60
        while (check := _healthcheck(environ)).returncode != 0:
            assert runner.poll() is None, (tmp_path / "runner.log").read_text()
            assert time.monotonic() < deadline, f"no /healthz within 60 s: {check.stderr}"
            time.sleep(0.2)
        port = environ["STUDIO_RUNNER_PROM_ADDRESS"].rpartition(":")[2]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            assert reply.status == 200 and b"runner_" in reply.read()
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(timeout=60) == 0, (tmp_path / "runner.log").read_text()
    finally:
        _stop(runner)

"""What an experiment is started with (command line, environment), metadata URLs, and borrowed credentials."""

from __future__ import annotations

import json
from pathlib import Path

from studio_runner.launch import command_line, expand_value, expanded_secrets, experiment_environment
from studio_runner.request import parse_request
from studio_runner.storage.base import Credentials
from studio_runner.sync import metadata_object_url


def make_request(env=None, cpus=1, artifacts=None):
    doc = {"experiment": {"key": "k", "filename": "x.py", "resources_needed": {"cpus": cpus},
                          "artifacts": artifacts or {}},
           "config": {"env": env or {}}}
    return parse_request(json.dumps(doc))


def test_command_line_splits_the_clients_shell_quoting():
    argv = command_line(Path("/venv/bin/python"), "train.py", ["'a b'", "\"it's\"", "--lr", "'unclosed"])
    assert argv == ["/venv/bin/python", "-u", "train.py", "a b", "it's", "--lr", "'unclosed"]


def test_percent_and_dollar_expansion_without_command_substitution():
    runner_env = {"HOME": "/home/r", "EMPTY": ""}
    composed = {"PATH": "/bin", "HOME": "/home/r"}
    assert expand_value("%HOME%/x:%EMPTY%:%MISSING%", runner_env, composed) == "/home/r/x:%EMPTY%:%MISSING%"
    assert expand_value("$PATH:${HOME}/bin:$NOPE", runner_env, composed) == "/bin:/home/r/bin:$NOPE"
    assert expand_value("$(rm -rf /)`id`", runner_env, composed) == "$(rm -rf /)`id`"


def test_experiment_environment(tmp_path):
    request = make_request(env={"PATH": "%PATH%:./bin", "STUDIOML_ARTIFACT_MAPPING": "x"}, cpus=4)
    runner_env = {"PATH": "/usr/bin", "AMQP_URL": "amqp://u:p@h/", "PYTHONHOME": "/x"}
    env = experiment_environment(runner_env, request, tmp_path / "venv", tmp_path / "ab12.0", tmp_path,
                                 tmp_path / "tmp", cores=4)
    # config.env's PATH is used, with the runner's PATH expanded, but the venv's bin stays first
    assert env["PATH"] == f"{tmp_path / 'venv' / 'bin'}:/usr/bin:./bin"
    assert "AMQP_URL" not in env and "PYTHONHOME" not in env and "STUDIOML_ARTIFACT_MAPPING" not in env
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["PYTHONUNBUFFERED"] == "1"
    assert env["STUDIOML_EXPERIMENT"] == "ab12.0" and env["STUDIOML_HOME"] == str(tmp_path)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "4" and env["OPENMP"] == "True"
    assert env["VIRTUAL_ENV"] == str(tmp_path / "venv")


def test_threads_follow_the_reserved_cores_unless_config_env_sets_them(tmp_path):
    def environment(env, cores, gpu_env=None):
        return experiment_environment({"PATH": "/usr/bin"}, make_request(env=env), tmp_path / "venv",
                                      tmp_path / "ab12.0", tmp_path, tmp_path / "tmp", cores=cores,
                                      gpu_env=gpu_env)

    one = environment({}, 1)
    assert one["OMP_NUM_THREADS"] == one["OPENBLAS_NUM_THREADS"] == "1" and "OPENMP" not in one
    mine = environment({"OMP_NUM_THREADS": "7"}, 2)
    assert mine["OMP_NUM_THREADS"] == "7" and mine["MKL_NUM_THREADS"] == "2"
    cards = {"CUDA_VISIBLE_DEVICES": "GPU-a,GPU-b", "NVIDIA_VISIBLE_DEVICES": "GPU-a,GPU-b"}
    given = environment({"CUDA_VISIBLE_DEVICES": "0"}, 1, gpu_env=cards)
    assert given["CUDA_VISIBLE_DEVICES"] == given["NVIDIA_VISIBLE_DEVICES"] == "GPU-a,GPU-b"
    hidden = environment({"CUDA_VISIBLE_DEVICES": "0,1"}, 1)  # a request cannot pick cards it was not given
    assert hidden["CUDA_VISIBLE_DEVICES"] == hidden["NVIDIA_VISIBLE_DEVICES"] == ""


def test_env_credentials_only_fill_artifacts_without_their_own():
    own = {"aws": {"access_key": "OWNKEY", "secret_access_key": "OWNSECRET"}}
    request = make_request(
        env={"AWS_ACCESS_KEY_ID": "ENVKEY", "AWS_SECRET_ACCESS_KEY": "ENVSECRET",
             "AWS_DEFAULT_REGION": "eu-1"},
        artifacts={"workspace": {"mutable": False, "qualified": "s3://h:9000/b/w.tar", "credentials": own},
                   "data": {"mutable": False, "qualified": "s3://other:9000/b/d.tar"}})
    artifacts = request.with_env_credentials().experiment.artifacts
    assert artifacts["workspace"].credentials == Credentials("OWNKEY", "OWNSECRET")
    assert artifacts["data"].credentials == Credentials("ENVKEY", "ENVSECRET", None, "eu-1")
    without_keys = make_request(artifacts={"data": {"mutable": False, "qualified": "s3://h:1/b/d.tar"}})
    assert without_keys.with_env_credentials() is without_keys


def test_metadata_goes_to_the_bucket_root():
    request = make_request(artifacts={"_metadata": {
        "mutable": True, "key": "experiments/k/_metadata.tar",
        "qualified": "s3://h:9000/bucket/experiments/k/_metadata.tar"}})
    url = metadata_object_url(request.experiment.artifacts["_metadata"], "scrape-host-a.json")
    assert url == "s3://h:9000/bucket/metadata/scrape-host-a.json"


def test_environment_is_built_from_an_explicit_base(tmp_path):
    """The runner's own secrets never reach the experiment unless named with --pass-env (issue item 7)."""
    runner_env = {"PATH": "/usr/bin", "HOME": "/home/r", "LANG": "C.UTF-8", "TZ": "UTC", "TERM": "xterm",
                  "HTTPS_PROXY": "http://u:pw@proxy:3128", "AWS_SECRET_ACCESS_KEY": "runner-aws-secret",
                  "GITHUB_TOKEN": "ghp_runner_token", "SOME_TOOL_SETTING": "x", "STUDIOML_HOME": "/elsewhere"}
    request = make_request(env={"MY_VAR": "mine", "TOKEN_COPY": "%GITHUB_TOKEN%"})
    env = experiment_environment(runner_env, request, tmp_path / "venv", tmp_path / "ab12.0", tmp_path,
                                 tmp_path / "tmp")
    for name in ("HOME", "LANG", "TZ", "TERM", "HTTPS_PROXY"):
        assert env[name] == runner_env[name]
    assert "AWS_SECRET_ACCESS_KEY" not in env and "GITHUB_TOKEN" not in env and "SOME_TOOL_SETTING" not in env
    assert env["MY_VAR"] == "mine" and env["STUDIOML_HOME"] == str(tmp_path)
    assert env["TOKEN_COPY"] == "ghp_runner_token"  # %NAME% still reads the runner's environment...
    assert expanded_secrets(request, env) == ["ghp_runner_token"]  # ...and the masker is told
    passed = experiment_environment(runner_env, request, tmp_path / "venv", tmp_path / "ab12.0", tmp_path,
                                    tmp_path / "tmp", pass_env=["SOME_TOOL_SETTING", "NOT_SET"])
    assert passed["SOME_TOOL_SETTING"] == "x" and "NOT_SET" not in passed


def test_venv_bin_stays_first_whatever_config_env_says(tmp_path):
    venv_bin = str(tmp_path / "venv" / "bin")
    for path in ("./bin:%PATH%", "/opt/bin", f"/opt/bin:{venv_bin}", ""):
        env = experiment_environment({"PATH": "/usr/bin"}, make_request(env={"PATH": path}),
                                     tmp_path / "venv",
                                     tmp_path / "ab12.0", tmp_path, tmp_path / "tmp")
        parts = env["PATH"].split(":")
        assert parts[0] == venv_bin and parts.count(venv_bin) == 1, env["PATH"]

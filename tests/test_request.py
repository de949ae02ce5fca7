"""Request parsing against the real client messages in shared/fixtures (spec message.md)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.fixtures import FIXTURES

from studio_runner.errors import Disposition, RequestInvalid
from studio_runner.redact import mask_mapping
from studio_runner.request import Artifact, Request, Resources, is_envelope, parse_request
from studio_runner.storage.base import Credentials

FIXTURE_FILES = sorted(p for p in FIXTURES.glob("*.json") if not p.name.endswith(".envelope.json"))
ACCESS_KEY = "AKIAHARNESS000000000"
SECRET_KEY = "harness/secret/key/not/real"
DEFAULT_LABELS = {"workspace", "modeldir", "retval", "output", "tb", "_metrics", "_metadata"}


def load(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def parse(doc: Any) -> Request:
    return parse_request(json.dumps(doc).encode())


def minimal(**experiment: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"key": "k1", "filename": "train.py", "artifacts": {}}
    doc.update(experiment)
    return {"experiment": doc}


def test_the_fixtures_are_there() -> None:
    assert {p.stem for p in FIXTURE_FILES} >= {
        "hello_plain",
        "hello_resources",
        "pythonenv_extra",
        "data_artifacts",
        "url_artifact",
        "completion_service",
    }


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: p.stem)
def test_every_fixture_parses(path: Path) -> None:
    body = path.read_bytes()
    request = parse_request(body)
    assert request.raw == json.loads(body)
    assert request.warnings == []
    assert request.experiment.key == json.loads(body)["experiment"]["key"]
    assert "workspace" in request.experiment.artifacts
    assert request.config.save_workspace_frequency == 60.0
    assert set(request.secrets()) >= {ACCESS_KEY, SECRET_KEY}


def test_hello_plain() -> None:
    request = parse_request((FIXTURES / "hello_plain.json").read_bytes())
    exp = request.experiment
    assert exp.key == "fixture_hello_plain"
    assert exp.filename == "hello.py"
    assert exp.args == []
    assert exp.pythonver == "3.11"
    assert len(exp.pythonenv) == 75 and exp.pythonenv[-1] == "Werkzeug==3.1.9"
    assert exp.project is None
    assert exp.max_duration is None
    assert exp.time_added == 1795621386.4673848
    assert exp.resources == Resources(cpus=1, ram=1_000_000_000, hdd=2_000_000_000)
    assert set(exp.artifacts) == DEFAULT_LABELS
    workspace = exp.artifacts["workspace"]
    assert workspace == Artifact(
        label="workspace",
        mutable=False,
        unpack=True,
        key="blobstore/de6ecdff61540917dcdeb16bdd00c8911971a6d83c123a9ab88e25c0e50c1b64.tar",
        qualified="s3://127.0.0.1:9000/studioml-artifacts/blobstore/"
        "de6ecdff61540917dcdeb16bdd00c8911971a6d83c123a9ab88e25c0e50c1b64.tar",
        bucket="studioml-artifacts",
        credentials=Credentials(ACCESS_KEY, SECRET_KEY, None, "us-east-1"),
    )
    assert workspace.locator == workspace.qualified
    assert all(exp.artifacts[label].mutable for label in DEFAULT_LABELS - {"workspace"})
    assert request.config.experiment_lifetime == 1800.0
    assert request.config.verbose == "error"
    assert request.config.env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert request.config.pip == []
    assert request.config.storage["bucket"] == "studioml-artifacts"
    assert request.config.database["bucket"] == "studioml-meta"


def test_hello_resources() -> None:
    request = parse_request((FIXTURES / "hello_resources.json").read_bytes())
    exp = request.experiment
    assert exp.args == ["sleep=0", "pad=2", "'arg with spaces'", "'it'\"'\"'s'", "'$HOME'"]
    assert exp.project == "harness-project"
    assert exp.resources == Resources(
        cpus=2, ram=3_000_000_000, hdd=10_000_000_000, gpus=1, gpu_mem=4_000_000_000, gpu_count=1
    )
    assert exp.max_duration == 1200.0
    assert request.config.experiment_lifetime == 3600.0


def test_pythonenv_extra() -> None:
    exp = parse_request((FIXTURES / "pythonenv_extra.json").read_bytes()).experiment
    assert exp.pythonenv[-2:] == ["pyjokes==0.8.3", "termcolor==3.3.0"]
    assert exp.args == ["import=pyjokes"]


def test_data_artifacts_reused_artifact_unpacks() -> None:
    artifacts = parse_request((FIXTURES / "data_artifacts.json").read_bytes()).experiment.artifacts
    assert set(artifacts) == DEFAULT_LABELS | {"results", "data", "prev_workspace"}
    reused = artifacts["prev_workspace"]
    assert load("data_artifacts")["experiment"]["artifacts"]["prev_workspace"]["unpack"] is None
    assert reused.unpack is True
    assert reused.mutable is False
    assert reused.credentials is None
    assert reused.key is not None and reused.key.endswith(".tar")
    assert artifacts["results"].mutable is True
    assert artifacts["data"].mutable is False and artifacts["data"].credentials is not None


def test_url_artifact() -> None:
    urldata = parse_request((FIXTURES / "url_artifact.json").read_bytes()).experiment.artifacts["urldata"]
    assert urldata == Artifact(
        label="urldata",
        mutable=False,
        unpack=False,
        url="http://127.0.0.1:9000/studioml-artifacts/datasets/url-data.txt",
    )
    assert urldata.locator == urldata.url


def test_completion_service() -> None:
    request = parse_request((FIXTURES / "completion_service.json").read_bytes())
    exp = request.experiment
    assert load("completion_service")["experiment"]["resources_needed"]["gpuMem"] == 0
    assert exp.resources == Resources(cpus=1, ram=1_000_000_000, hdd=2_000_000_000)
    assert exp.filename == "completion_service_client.py"
    assert exp.args == ["error"]
    assert set(exp.artifacts) == {"retval", "clientscript", "args", "workspace"}
    assert exp.artifacts["retval"].mutable is True
    assert request.config.env["STUDIO_COMPAT"] == "1"


def test_local_mode_message() -> None:
    """What `studio run` writes with `storage: {type: local}`: 'file:/' + endpoint/bucket + '/' + key."""
    key = "blobstore/5b1d0e6c2f0a4c1e9e3b7a7d2c4f8e91.tar"
    store = {"type": "local", "endpoint": "/tmp/studio-store", "bucket": "studioml-artifacts"}
    doc = {
        "experiment": {
            "key": "1700000000_0f4b2d7e",
            "args": [],
            "filename": "hello.py",
            "pythonenv": ["numpy==1.26.4"],
            "project": None,
            "pythonver": "3.11",
            "resources_needed": {"cpus": 1, "ram": "1g", "hdd": "2g", "gpus": 0},
            "status": "waiting",
            "time_added": 1700000000.25,
            "max_duration": None,
            "artifacts": {
                "workspace": {
                    "unpack": True,
                    "mutable": False,
                    "key": key,
                    "local": "/home/alice/proj",
                    "qualified": "file://tmp/studio-store/studioml-artifacts/" + key,
                },
                "output": {
                    "unpack": True,
                    "mutable": True,
                    "key": "experiments/1700000000_0f4b2d7e/output.tar",
                    "qualified": "file://tmp/studio-store/studioml-artifacts/"
                    "experiments/1700000000_0f4b2d7e/output.tar",
                },
            },
        },
        "config": {"storage": store, "database": dict(store), "saveWorkspaceFrequency": "1m"},
    }
    request = parse(doc)
    workspace = request.experiment.artifacts["workspace"]
    assert workspace.locator == "file://tmp/studio-store/studioml-artifacts/" + key
    assert workspace.credentials is None and workspace.unpack is True
    assert request.experiment.artifacts["output"].mutable is True
    assert request.config.storage == store
    assert request.secrets() == []


def test_minimal_request_gets_defaults() -> None:
    request = parse(minimal())
    exp = request.experiment
    assert (exp.args, exp.pythonenv, exp.pythonver, exp.project) == ([], [], "", None)
    assert exp.resources == Resources()
    assert exp.artifacts == {}
    assert (exp.time_added, exp.max_duration) == (None, None)
    assert request.config.env == {} and request.config.pip == []
    assert request.config.experiment_lifetime is None and request.config.save_workspace_frequency is None
    assert request.config.verbose is None
    assert request.warnings == []


def test_str_body_and_unknown_fields() -> None:
    doc = minimal(author="alice", future_field={"x": 1}, time_added=5)
    doc["config"] = {"optimizer": {"popsize": 100}, "newThing": [1, 2]}
    doc["extra"] = True
    request = parse_request(json.dumps(doc))
    assert request.experiment.time_added == 5.0
    assert request.raw["extra"] is True


@pytest.mark.parametrize(
    ("resources", "expected"),
    [
        ({"gpuCount": "1", "gpus": "2", "cpus": "4"}, Resources(cpus=4, gpus=2, gpu_count=1)),
        ({"gpuCount": 1, "cpus": 2.0}, Resources(cpus=2, gpu_count=1)),
        ({"ram": 1024, "hdd": 2.5e9, "gpuMem": 0}, Resources(ram=1024, hdd=2_500_000_000)),
        (
            {"ram": "16gib", "hdd": "60g", "gpuMem": "8G"},
            Resources(ram=17_179_869_184, hdd=60 * 10**9, gpu_mem=8 * 10**9),
        ),
        ({"ram": None, "gpuCount": None}, Resources()),
    ],
)
def test_lenient_resources(resources: dict[str, Any], expected: Resources) -> None:
    assert parse(minimal(resources_needed=resources)).experiment.resources == expected


@pytest.mark.parametrize(
    ("artifact", "unpack"),
    [
        ({"key": "experiments/x/modeldir.tar"}, True),
        ({"key": "blobstore/abc.tar.gz"}, True),
        ({"key": "blobstore/abc.tgz"}, True),
        ({"key": "blobstore/abc.tbz2"}, True),
        ({"key": "blobstore/abc.TAR.BZ2"}, True),
        ({"key": "blobstore/abc.tar.xz"}, True),
        ({"qualified": "s3://h:9000/b/data/set.tbz"}, True),
        ({"url": "https://example.com/a.tar?sig=abc"}, True),
        ({"qualified": "s3://h:9000/b/mnist.npz"}, False),
        ({"key": "data/tarball.txt"}, False),
        ({"url": "https://example.com/x.tar/readme"}, False),
        ({}, False),
    ],
)
def test_unpack_null_resolves_from_the_name(artifact: dict[str, Any], unpack: bool) -> None:
    doc = minimal(artifacts={"a": {"unpack": None, "mutable": False, **artifact}})
    assert parse(doc).experiment.artifacts["a"].unpack is unpack


def test_unpack_as_sent_wins() -> None:
    doc = minimal(artifacts={"a": {"unpack": False, "mutable": True, "key": "x.tar"}})
    assert parse(doc).experiment.artifacts["a"].unpack is False


def test_env_values_are_stringified() -> None:
    doc = minimal()
    env = {"S": "text", "I": 4, "F": 4.0, "H": 0.5, "T": True, "N": False, "Z": None, "BIG": 1e20}
    doc["config"] = {"env": env}
    assert parse(doc).config.env == {
        "S": "text",
        "I": "4",
        "F": "4",
        "H": "0.5",
        "T": "true",
        "N": "false",
        "Z": "",
        "BIG": "1e+20",
    }


@pytest.mark.parametrize(
    ("value", "expected"), [("3.8", "3.8"), (3.8, "3.8"), (3, "3"), (None, ""), (" 3.11 ", "3.11")]
)
def test_pythonver(value: Any, expected: str) -> None:
    assert parse(minimal(pythonver=value)).experiment.pythonver == expected


@pytest.mark.parametrize(("value", "seconds"), [("1h30m", 5400.0), (90, 90.0), ("0", 0.0), ("300ms", 0.3)])
def test_max_duration(value: Any, seconds: float) -> None:
    assert parse(minimal(max_duration=value)).experiment.max_duration == seconds


def test_unreadable_soft_durations_warn() -> None:
    doc = minimal()
    doc["config"] = {"experimentLifetime": "soon", "saveWorkspaceFrequency": ["1m"]}
    request = parse(doc)
    assert request.config.experiment_lifetime is None
    assert request.config.save_workspace_frequency is None
    lifetime, frequency = sorted(request.warnings)
    assert lifetime == "config.experimentLifetime: cannot read 'soon' as a duration; ignored"
    assert frequency.startswith("config.saveWorkspaceFrequency: cannot read a list of 1 items")


def test_readable_soft_durations() -> None:
    doc = minimal()
    doc["config"] = {"experimentLifetime": "48h", "saveWorkspaceFrequency": 300}
    request = parse(doc)
    assert (request.config.experiment_lifetime, request.config.save_workspace_frequency) == (172_800.0, 300.0)


# --- refusals -------------------------------------------------------------------------------------------


def _set(doc: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    node = doc
    for part in path[:-1]:
        node = node[part]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


_DELETE = object()
_E = "experiment"
_WS = (_E, "artifacts", "workspace")


@pytest.mark.parametrize(
    ("path", "value", "field", "shown"),
    [
        ((_E, "resources_needed", "ram"), "lots", "experiment.resources_needed.ram", "'lots'"),
        ((_E, "resources_needed", "ram"), "", "experiment.resources_needed.ram", "''"),
        ((_E, "resources_needed", "hdd"), "-2g", "experiment.resources_needed.hdd", "'-2g'"),
        ((_E, "resources_needed", "ram"), 10**30, "experiment.resources_needed.ram", "1" + "0" * 30),
        ((_E, "resources_needed", "gpuMem"), [4], "experiment.resources_needed.gpuMem", "a list of 1 items"),
        ((_E, "resources_needed", "gpuCount"), "one", "experiment.resources_needed.gpuCount", "'one'"),
        ((_E, "resources_needed", "cpus"), -1, "experiment.resources_needed.cpus", "-1"),
        ((_E, "resources_needed", "cpus"), 1.5, "experiment.resources_needed.cpus", "1.5"),
        ((_E, "resources_needed", "cpus"), True, "experiment.resources_needed.cpus", "True"),
        ((_E, "resources_needed", "gpus"), 10**12, "experiment.resources_needed.gpus", "1000000000000"),
        ((_E, "resources_needed"), "big", "experiment.resources_needed", "'big'"),
        ((_E, "key"), "", "experiment.key", None),
        ((_E, "key"), _DELETE, "experiment.key", None),
        ((_E, "key"), 42, "experiment.key", "42"),
        ((_E, "filename"), _DELETE, "experiment.filename", None),
        ((_E, "filename"), "a\0b", "experiment.filename", None),
        ((_E, "args"), "--lr 1", "experiment.args", "'--lr 1'"),
        ((_E, "args"), ["ok", 3], "experiment.args[1]", "3"),
        ((_E, "pythonenv"), [None], "experiment.pythonenv[0]", "None"),
        ((_E, "pythonver"), True, "experiment.pythonver", "True"),
        ((_E, "project"), 7, "experiment.project", "7"),
        ((_E, "time_added"), "yesterday", "experiment.time_added", "'yesterday'"),
        ((_E, "max_duration"), "forever", "experiment.max_duration", "'forever'"),
        ((_E, "max_duration"), "1d", "experiment.max_duration", "'1d'"),
        ((_E, "max_duration"), "", "experiment.max_duration", "''"),
        ((_E, "artifacts"), _DELETE, "experiment.artifacts", None),
        ((_E, "artifacts"), [], "experiment.artifacts", "a list of 0 items"),
        ((*_WS, "mutable"), _DELETE, "experiment.artifacts.workspace.mutable", "None"),
        ((*_WS, "mutable"), "false", "experiment.artifacts.workspace.mutable", "'false'"),
        ((*_WS, "unpack"), "yes", "experiment.artifacts.workspace.unpack", "'yes'"),
        ((*_WS, "key"), 5, "experiment.artifacts.workspace.key", "5"),
        ((*_WS, "credentials"), "AKIA-not-an-object", "experiment.artifacts.workspace.credentials", "****"),
        (
            (*_WS, "credentials", "aws", "secret_access_key"),
            _DELETE,
            "experiment.artifacts.workspace.credentials.aws",
            None,
        ),
        (
            (*_WS, "credentials", "aws", "access_key"),
            12345,
            "experiment.artifacts.workspace.credentials.aws.access_key",
            "****",
        ),
        ((_E, "artifacts", "../escape"), {"mutable": True}, 'experiment.artifacts["../escape"]', None),
        ((_E, "artifacts", ".."), {"mutable": True}, 'experiment.artifacts[".."]', None),
        ((_E, "artifacts", "tb"), "x", "experiment.artifacts.tb", "'x'"),
        (("experiment",), _DELETE, "experiment", None),
        (("experiment",), [1], "experiment", "a list of 1 items"),
        (("config",), [], "config", "a list of 0 items"),
        (("config", "env"), "A=1", "config.env", "****"),
        (
            ("config", "env", "AWS_SECRET_ACCESS_KEY"),
            {"v": "hunter2hunter2"},
            "config.env.AWS_SECRET_ACCESS_KEY",
            "****",
        ),
        (("config", "env", "HARNESS_MARKER"), "bad\0value", "config.env.HARNESS_MARKER", "****"),
        (("config", "env", "A=B"), "x", 'config.env["A=B"]', None),
        (("config", "pip"), "numpy", "config.pip", "'numpy'"),
    ],
)
def test_refusals_name_the_field_and_value(
    path: tuple[Any, ...], value: Any, field: str, shown: str | None
) -> None:
    doc = _set(load("hello_resources"), path, value)
    with pytest.raises(RequestInvalid) as info:
        parse(doc)
    error = info.value
    assert error.field == field
    assert str(error).startswith(field + " ")
    if shown is not None:
        assert f"got {shown}" in str(error)
    assert error.disposition is Disposition.SET_ASIDE
    for secret in (ACCESS_KEY, SECRET_KEY, "hunter2", "12345"):
        assert secret not in str(error)


def test_values_that_look_like_secrets_are_masked_in_messages() -> None:
    for value in ("AWS_SECRET_ACCESS_KEY=topsecret99", "amqp://u:topsecret99@h/"):
        with pytest.raises(RequestInvalid) as info:
            parse(minimal(resources_needed={"ram": value}))
        assert info.value.field == "experiment.resources_needed.ram"
        assert "topsecret99" not in str(info.value)
        assert "****" in str(info.value)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"   ",
        b"\xff\xfe{}",
        b'{"experiment": "\xc3\x28"}',
        b"[]",
        b"null",
        b'"a string"',
        b"42",
        b"{",
        b"NaN",
        b'{"experiment": NaN}',
        b'{"experiment": {"key": "k", "filename": "f", "artifacts": {}, "time_added": Infinity}}',
        b'{"experiment": {"key": "k", "filename": "f", "artifacts": {}, "time_added": 1e999}}',
        b'{"experiment": {"key": "k", "filename": "f", "artifacts": {}, "time_added": ' + b"9" * 5000 + b"}}",
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        b'{"experiment": {"key": "\\ud800", "filename": "f", "artifacts": {}}}',
        b"{}",
        b'{"config": {}}',
    ],
)
def test_junk_bodies_are_refused(body: bytes) -> None:
    with pytest.raises(RequestInvalid):
        parse_request(body)


def test_envelope_is_refused_for_the_crypto_layer() -> None:
    envelope = {
        "message": {
            "experiment": {"status": "waiting", "pythonver": "3.8"},
            "time_added": 1631664000.5213,
            "experiment_lifetime": "20m",
            "resources_needed": {"cpus": 2, "ram": "8g"},
            "payload": "d3JhcHBlZA==,c2VhbGVk",
            "signature": "c2ln",
            "fingerprint": "SHA256:abc",
        }
    }
    assert is_envelope(envelope)
    with pytest.raises(RequestInvalid, match="encrypted envelope") as info:
        parse(envelope)
    assert info.value.field == "message"
    assert "d3JhcHBlZA" not in str(info.value)


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"message": {"payload": ""}}, True),
        ({"message": {"payload": None, "signature": "x"}}, True),
        ({"message": {}}, False),
        ({"message": "payload"}, False),
        ({"experiment": {}, "config": {}}, False),
    ],
)
def test_is_envelope(doc: dict[str, Any], expected: bool) -> None:
    assert is_envelope(doc) is expected


# --- secrets --------------------------------------------------------------------------------------------


def test_fixture_secrets() -> None:
    request = parse_request((FIXTURES / "hello_plain.json").read_bytes())
    assert set(request.secrets()) == {
        ACCESS_KEY,
        SECRET_KEY,
        "guest",
        "amqp://guest:guest@127.0.0.1:5672/%2f",
    }
    assert set(request.credential_values()) == set(request.secrets())
    masked = request.redactor().mask(f"key {ACCESS_KEY} secret {SECRET_KEY} region us-east-1")
    assert masked == "key **** secret **** region us-east-1"


def test_secrets_cover_every_source() -> None:
    doc = minimal(
        artifacts={
            "workspace": {
                "mutable": False,
                "key": "w.tar",
                "credentials": {
                    "aws": {"access_key": "AK1", "secret_access_key": "SK1", "session_token": "ST1"}
                },
            },
            "reused": {"mutable": False, "key": "r.tar", "credentials": {"aws": {"profile": "default"}}},
        }
    )
    doc["config"] = {
        "storage": {
            "type": "s3",
            "credentials": {"aws": {"access_key": "AK2", "secret_access_key": "SK2", "region": "eu"}},
        },
        "database": {"type": "firebase", "apiKey": "fb-api-key", "authentication": "none", "guest": True},
        "cloud": {
            "queue": {
                "rmq": "amqp://alice:p%40ss@broker:5672/%2f",
                "sqs": {"credentials": {"aws": {"access_key": "AK3", "secret_access_key": "SK3"}}},
            }
        },
        "env": {
            "GITHUB_TOKEN": "ghp_abcdef",
            "SHORT_KEY": "abc12",
            "DB_PWD": "abc",
            "API_PASS": "x9",
            "USE_TOKEN": "true",
            "MAX_KEYS": "8",
            "PWD": "/home/user/project",
            "db_password": "hunter22",
            "PLAIN": "notasecret1",
            "AWS_DEFAULT_REGION": "us-west-2",
            "DATABASE_URL": "postgres://bob:pg-pass@db/x",
        },
        "optimizer": {"token_limit": 5},
    }
    request = parse(doc)
    assert request.experiment.artifacts["reused"].credentials is None
    assert set(request.secrets()) == {
        "AK1",
        "SK1",
        "ST1",
        "AK2",
        "SK2",
        "fb-api-key",
        "AK3",
        "SK3",
        "p%40ss",
        "p@ss",
        "amqp://alice:p%40ss@broker:5672/%2f",
        "pg-pass",
        "ghp_abcdef",
        "hunter22",
        "abc12",
        "abc",
        "x9",
    }
    redactor = request.redactor()
    assert (
        redactor.mask("AK1 and SK2 and ghp_abcdef and notasecret1 and eu")
        == "**** and **** and **** and notasecret1 and eu"
    )
    # short secret-named values are masked as words, whatever their length; placeholders are not secrets
    assert redactor.mask("pw abc, api x9; abcdef x99 true 8 /home/user/project") == (
        "pw ****, api ****; abcdef x99 true 8 /home/user/project")


def test_mask_mapping_of_a_real_request_hides_its_secrets() -> None:
    request = parse_request((FIXTURES / "hello_plain.json").read_bytes())
    text = json.dumps(mask_mapping(request.raw))
    for secret in (ACCESS_KEY, SECRET_KEY, "guest:guest"):
        assert secret in json.dumps(request.raw)
        assert secret not in text
    assert "amqp://guest:****@127.0.0.1:5672/%2f" in text  # the user name stays readable
    assert "fixture_hello_plain" in text


# --- generated junk -------------------------------------------------------------------------------------

_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check(body: bytes | str) -> None:
    """The contract: a Request whose helpers work, or RequestInvalid that leaks no fixture secret."""
    try:
        request = parse_request(body)
    except RequestInvalid as error:
        assert ACCESS_KEY not in str(error) and SECRET_KEY not in str(error)
        return
    request.secrets()
    request.redactor().mask("a line")
    mask_mapping(request.raw)


@given(st.binary(max_size=200))
@_SETTINGS
def test_random_bytes(body: bytes) -> None:
    _check(body)


@given(_JSON)
@_SETTINGS
def test_random_json(value: Any) -> None:
    _check(json.dumps(value))


@given(
    experiment=st.dictionaries(st.sampled_from(list(minimal()["experiment"]) + ["args", "pythonver"]), _JSON)
)
@_SETTINGS
def test_random_experiment_fields(experiment: dict[str, Any]) -> None:
    _check(json.dumps({"experiment": experiment, "config": {}}))


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node[:3]):
            found += _paths(value, (*prefix, i))
    return found


_DOCS = {p.stem: json.loads(p.read_text()) for p in FIXTURE_FILES}
_MUTATIONS = [(name, path) for name, doc in _DOCS.items() for path in _paths(doc)]


@given(
    target=st.sampled_from(_MUTATIONS),
    value=st.one_of(st.just(_DELETE), _JSON),
    second=st.sampled_from(_MUTATIONS),
    value2=_JSON,
)
@_SETTINGS
def test_mutated_fixtures(target: tuple[str, tuple[Any, ...]], value: Any, second: Any, value2: Any) -> None:
    name, path = target
    doc = _set(_DOCS[name], path, value)
    other_name, other_path = second
    if other_name == name:
        try:
            doc = _set(doc, other_path, value2)
        except (KeyError, IndexError, TypeError):
            pass  # the first mutation removed or replaced the second path's parent
    _check(json.dumps(doc))


@pytest.mark.parametrize("label", ["model\ndir", "\x1b[31mred", "tab\there", "line\u2028sep", "a/b", ".."])
def test_labels_that_could_forge_a_path_a_log_line_or_a_metadata_key_are_refused(label: str) -> None:
    """Issue 6 item 11: a label names a directory and a key of the metadata's studioml.artifacts."""
    with pytest.raises(RequestInvalid, match="not a usable artifact label") as caught:
        parse(minimal(artifacts={label: {"mutable": True}}))
    assert "\n" not in str(caught.value) and "\x1b" not in str(caught.value)


@pytest.mark.parametrize("line", ["-r /home/u/.ssh/id_rsa", "-r/etc/passwd", "--requirement=/etc/shadow",
                                  "-c /etc/passwd", "--constraint /x", "-f /home/u", "--find-links=/x",
                                  "  -r x", "--override /x"])
@pytest.mark.parametrize("where", ["pythonenv", "pip"])
def test_installer_options_that_read_files_are_refused(line: str, where: str) -> None:
    doc = minimal()
    if where == "pythonenv":
        doc["experiment"]["pythonenv"] = ["requests==2.31.0", line]
    else:
        doc["config"] = {"pip": [line]}
    with pytest.raises(RequestInvalid, match="installer option that reads files") as caught:
        parse(doc)
    assert caught.value.field is not None and where in caught.value.field


def test_ordinary_requirement_lines_are_kept() -> None:
    lines = ["requests==2.31.0", "-e git+https://github.com/o/r.git#egg=r", "pkg @ https://x/p.whl",
             "numpy>=1.26", "rich"]
    doc = minimal()
    doc["experiment"]["pythonenv"] = lines
    assert parse(doc).experiment.pythonenv == lines

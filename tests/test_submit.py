"""``submit`` as a library call: a missing script is an error and queues nothing; the workspace is packed in
one pass, hashed as written (the same key as hashing the finished tar), with progress."""

from __future__ import annotations

import hashlib
import io
import sys
import tarfile
from pathlib import Path

import pytest

from studio_runner.errors import ConfigError
from studio_runner.submit import Submission, SubmitError, pack_workspace, submit


def test_a_missing_script_raises_and_queues_nothing(tmp_path: Path) -> None:
    queue_root, store = tmp_path / "queue", tmp_path / "store"
    with pytest.raises(SubmitError, match=r"missing\.py does not exist"):
        submit(Submission(script=tmp_path / "missing.py", queue="local_x"), queue_root, store)
    (tmp_path / "adir").mkdir()
    with pytest.raises(ConfigError, match="adir is a directory, not a script"):  # the CLI maps it to exit 2
        submit(Submission(script=tmp_path / "adir", queue="local_x"), queue_root, store)
    assert not queue_root.exists() and not store.exists()


def test_the_packed_workspace_is_the_tar_it_names(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    (ws / "pkg").mkdir(parents=True)
    (ws / "train.py").write_text("print(1)\n")
    (ws / "pkg" / "data.bin").write_bytes(bytes(range(256)) * 4000)
    (ws / "link").symlink_to("train.py")
    (ws / "__pycache__").mkdir()
    (ws / "__pycache__" / "x.pyc").write_bytes(b"skip me")
    seen: list[tuple[int, int]] = []
    key = pack_workspace(ws, tmp_path / "store", lambda done, total: seen.append((done, total)))
    blob = (tmp_path / "store" / key).read_bytes()
    assert key == f"blobstore/{hashlib.sha256(blob).hexdigest()}.tar"
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        assert sorted(tar.getnames()) == ["link", "pkg", "pkg/data.bin", "train.py"]
        assert tar.getmember("link").issym()
        member = tar.extractfile("pkg/data.bin")
        assert member is not None and member.read() == bytes(range(256)) * 4000
    total = 9 + 256 * 4000
    assert seen and seen[-1] == (total, total)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert pack_workspace(ws, tmp_path / "store") == key  # the same content, the same key


def test_show_progress_off_a_terminal_is_one_plain_line(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    script = tmp_path / "ws" / "train.py"
    script.parent.mkdir()
    script.write_text("print(1)\n")
    request = submit(Submission(script=script, queue="local_x"), tmp_path / "q", tmp_path / "store",
                     show_progress=True)
    err = capsys.readouterr().err
    assert err.startswith(f"packed workspace {script.parent}: ") and err.count("\n") == 1
    assert "\x1b" not in err and " KiB in " in err
    assert len(list((tmp_path / "q" / "local_x").iterdir())) == 1
    assert request["experiment"]["filename"] == "train.py"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_show_progress_on_a_terminal_draws_a_bar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    script = tmp_path / "ws" / "train.py"
    script.parent.mkdir()
    script.write_text("print(1)\n")
    (script.parent / "big.bin").write_bytes(b"\0" * (3 << 20))
    submit(Submission(script=script, queue="local_x"), tmp_path / "q", tmp_path / "store", show_progress=True)
    text = terminal.getvalue()
    assert "\r\x1b[Kpacking workspace [" in text and "/ 3 MiB" in text
    assert text.split("\r\x1b[K")[-1].startswith("packed workspace ")  # the bar was removed first

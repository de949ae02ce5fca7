"""Metadata scraping and runner lines (shared/spec/metadata.md)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from studio_runner.metadata import (
    MAX_PROBLEMS,
    MetadataScraper,
    attempt_id,
    base62,
    deep_merge,
    init_lines,
    log_stamp,
    note_line,
    scrape_file_name,
    scrape_stamp,
    start_lines,
    stop_lines,
    time_stamp,
    write_document,
    write_document_text,
)

T0 = 1631664007.5  # 2021-09-15T00:00:07.5Z
SEEN_NS = 1631664100_120000000  # when the fake clock says plain lines were seen


def scraper(**kwargs) -> MetadataScraper:
    return MetadataScraper(clock_ns=lambda: SEEN_NS, **kwargs)


def fed(lines: list[str], **kwargs) -> MetadataScraper:
    s = scraper(**kwargs)
    for line in lines:
        s.feed(line)
    return s


# --- the spec's example and the runner's lines -------------------------------------------------------------

def test_spec_example_fragment_patch_fragment() -> None:
    s = fed([
        '{"experiment": {"name": "trial-3", "epochs": 10}}',
        '[{"op": "replace", "path": "/experiment/epochs", "value": 12}]',
        '{"experiment": {"accuracy": 0.97}}',
    ])
    doc = s.document()
    assert doc["experiment"] == {"name": "trial-3", "epochs": 12, "accuracy": 0.97}
    assert "studioml" in doc
    assert s.problems == []


def test_runner_lines_and_output_build_the_studioml_block() -> None:
    start, stop = T0 + 60, T0 + 120
    lines = init_lines("node7", T0)
    lines += ["Collecting numpy", "   ", "ok"]  # environment build chatter; "ok" is too short to count
    lines += start_lines("exp-1", None, {"output": "s3://h/b/output.tar", "modeldir": None}, start)
    lines += ["epoch 1 loss=0.5", '{"experiment": {"loss": 0.5}}', "0"]
    lines += stop_lines(stop)
    studioml = fed(lines).document()["studioml"]

    assert studioml["log"] == [
        {"ts": "2021-09-15T00:00:07,500000000+00:00", "msg": "Init"},
        {"ts": "0", "msg": ""},
        {"ts": "2021-09-15T00:01:40.12+0000", "msg": "Collecting numpy"},
        {"ts": "2021-09-15T00:01:07,500000000+00:00", "msg": "Start"},
        {"ts": "2021-09-15T00:01:40.12+0000", "msg": "epoch 1 loss=0.5"},
        {"ts": "2021-09-15T00:02:07,500000000+00:00", "msg": "Stop"},
    ]
    assert studioml["load_time"] == "2021-09-15T00:00:07.500000000+00:00"
    assert studioml["host"] == "node7"
    assert studioml["experiment"] == {"key": "exp-1", "project": "<no value>"}
    assert studioml["artifacts"] == {"modeldir": "", "output": "s3://h/b/output.tar"}
    assert studioml["start_time"] == "2021-09-15T00:01:07.500000000+00:00"
    assert studioml["stop_time"] == "2021-09-15T00:02:07.500000000+00:00"


def test_runner_lines_are_the_exact_go_lines() -> None:
    assert init_lines("h", T0) == [
        '{"studioml":{"log":[{"ts":"2021-09-15T00:00:07,500000000+00:00","msg":"Init"},{"ts":"0","msg":""}]}}',
        '{"studioml":{"load_time":"2021-09-15T00:00:07.500000000+00:00"}}',
        '{"studioml":{"host":"h"}}',
    ]
    assert start_lines("k", "proj", {"b": "s3://x/b", "a": ""}, T0) == [
        '{"studioml":{"experiment":{"key":"k"}}}',
        '{"studioml":{"experiment":{"project":"proj"}}}',
        '{"studioml":{"artifacts":{"a":""}}}',
        '{"studioml":{"artifacts":{"b":"s3://x/b"}}}',
        '{"studioml":{"start_time":"2021-09-15T00:00:07.500000000+00:00"}}',
        '[{"op":"add","path":"/studioml/log/-","value":{"ts":"2021-09-15T00:00:07,500000000+00:00","msg":"Start"}}]',
    ]
    assert stop_lines(T0) == [
        '[{"op":"add","path":"/studioml/log/-","value":{"ts":"2021-09-15T00:00:07,500000000+00:00","msg":"Stop"}}]',
        '{"studioml":{"stop_time":"2021-09-15T00:00:07.500000000+00:00"}}',
    ]


def test_note_line_merges_below_studioml_and_refuses_log() -> None:
    line = note_line("python", {"requested": "3.7", "used": "3.11.7"})
    assert line == '{"studioml":{"python":{"requested":"3.7","used":"3.11.7"}}}'
    s = fed([*init_lines("h", T0), line])
    assert s.document()["studioml"]["python"] == {"requested": "3.7", "used": "3.11.7"}
    assert s.document()["studioml"]["host"] == "h"
    with pytest.raises(ValueError):
        note_line("log", [])


def test_timestamp_formats() -> None:
    when = datetime(2021, 9, 15, 0, 0, 7, 123456, tzinfo=timezone.utc)
    assert log_stamp(when) == "2021-09-15T00:00:07,123456000+00:00"
    assert time_stamp(when) == "2021-09-15T00:00:07.123456000+00:00"
    assert time_stamp(datetime(2021, 9, 15, 0, 0, 7)) == "2021-09-15T00:00:07.000000000+00:00"  # naive = UTC
    assert scrape_stamp(1631664007_123456789) == "2021-09-15T00:00:07.123456789+0000"
    assert scrape_stamp(1631664007_100000000) == "2021-09-15T00:00:07.1+0000"
    assert scrape_stamp(1631664007_000000000) == "2021-09-15T00:00:07+0000"


# --- patches -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("patch", [
    '[{"op": "replace", "path": "/studioml/host", "value": "evil"}]',
    '[{"op": "remove", "path": "/StudioML/host"}]',
    '[{"op": "move", "from": "/studioml/host", "path": "/stolen"}]',
    '[{"op": "add", "path": "/studioml", "value": {}}]',
    '[{"op": "replace", "path": "", "value": {}}]',
    '[{"op": "add", "path": "/x", "value": 1}, {"op": "remove", "path": "/studioml/log/0"}]',
])
def test_forbidden_patch_is_skipped_and_later_directives_apply(patch: str) -> None:
    s = fed([*init_lines("h", T0), patch, '{"after": true}'])
    doc = s.document()
    assert doc["studioml"]["host"] == "h"
    assert len(doc["studioml"]["log"]) == 2
    assert "x" not in doc and "stolen" not in doc
    assert doc["after"] is True
    assert len(s.problems) == 1 and "forbidden" in s.problems[0]


def test_add_below_studioml_is_allowed() -> None:
    s = fed([
        '[{"op": "add", "path": "/studioml/log/-", "value": {"ts": "x", "msg": "mine"}}]',
        '[{"op": "add", "path": "/studioml/extra", "value": 1}]',
    ])
    doc = s.document()
    assert doc["studioml"]["log"][-1] == {"ts": "x", "msg": "mine"}
    assert doc["studioml"]["extra"] == 1
    assert s.problems == []


def test_failing_patch_is_skipped_whole() -> None:
    s = fed([
        '{"a": {"b": 1}}',
        '[{"op": "remove", "path": "/missing"}]',
        '[{"op": "add", "path": "/a/c", "value": 2}, {"op": "test", "path": "/a/b", "value": 9}]',
        '[{"op": "add", "path": "/a/d", "value": 3}]',
    ])
    assert s.document()["a"] == {"b": 1, "d": 3}  # /a/c of the failed patch was rolled back
    assert len(s.problems) == 2 and all("failing" in p for p in s.problems)


def test_array_that_is_not_a_patch_is_ignored() -> None:
    s = fed(['{"a": 1}', "[1, 2, 3]", '[{"no_op": 1}]', "[ ]"])
    assert s.document() == {**s.document(), "a": 1}
    assert set(s.document()) == {"studioml", "a"}
    assert s.directives == 1
    assert len(s.document()["studioml"]["log"]) == 2  # not logged as plain text either


# --- merges ------------------------------------------------------------------------------------------------

def test_null_stores_null_but_not_over_an_object() -> None:
    s = fed(['{"a": 1, "b": {"c": 2}}', '{"a": null, "b": null}'])
    doc = s.document()
    assert doc["a"] is None and "a" in doc
    assert doc["b"] == {"c": 2}


def test_deep_merge_objects_recurse_arrays_and_scalars_replace() -> None:
    target = {"o": {"keep": 1, "deep": {"x": 1}}, "arr": [1, 2], "s": "old", "obj": {"k": 1}}
    deep_merge(target, {"o": {"deep": {"y": 2}}, "arr": [3], "s": {"now": "object"}, "obj": 5})
    assert target == {
        "o": {"keep": 1, "deep": {"x": 1, "y": 2}}, "arr": [3], "s": {"now": "object"}, "obj": 5,
    }


def test_deep_merge_handles_deep_nesting_without_recursion() -> None:
    depth = 5000
    frag: dict = {}
    inner = frag
    for _ in range(depth):
        inner["n"] = {}
        inner = inner["n"]
    target: dict = {}
    deep_merge(target, frag)
    deep_merge(target, frag)  # the second pass walks both trees together
    node, seen = target, 0
    while node:
        node, seen = node["n"], seen + 1
    assert seen == depth


# --- line filtering ----------------------------------------------------------------------------------------

def test_invalid_json_candidates_are_dropped_silently() -> None:
    s = fed(["{'python': 'dict'}", '{"loss": NaN}', "[1, 2,]", "{not json}", '{"ok": 1}'])
    doc = s.document()
    assert set(doc) == {"studioml", "ok"}
    assert len(doc["studioml"]["log"]) == 2  # invalid candidates are not logged as text
    assert s.problems == []


def test_short_lines_are_skipped_and_lines_trimmed() -> None:
    s = fed(["", "  ab  ", "{}", "é!", "  three  "])
    msgs = [e["msg"] for e in s.document()["studioml"]["log"][2:]]
    assert msgs == ["é!", "three"]  # "é!" is 3 UTF-8 bytes, like Go's len()


def test_schema_logs_off_ignores_plain_lines() -> None:
    s = fed(["hello world", '{"a": 1}'], schema_logs=False)
    assert s.document()["studioml"]["log"] == [{"ts": "0", "msg": "Init"}, {"ts": "1", "msg": ""}]
    assert s.document()["a"] == 1


def test_plain_line_with_broken_log_is_reported_not_raised() -> None:
    s = fed(['{"studioml": {"log": "gone"}}', "a plain line"])
    assert s.document()["studioml"]["log"] == "gone"
    assert len(s.problems) == 1


def test_nothing_fed_means_empty() -> None:
    assert fed(["", "ab", "[1, 2]", "{bad}"]).empty
    assert not fed(["hello"]).empty
    assert fed(["hello"], schema_logs=False).empty


# --- bounds ------------------------------------------------------------------------------------------------

def test_over_long_line_is_ignored() -> None:
    big = '{"big": "' + "x" * (2 << 20) + '"}'
    s = fed([big, "x" * (2 << 20), '{"small": 1}'])
    doc = s.document()
    assert "big" not in doc and doc["small"] == 1
    assert len(doc["studioml"]["log"]) == 2
    assert len(s.problems) == 2


def test_line_limit_counts_utf8_bytes() -> None:
    s = fed(["é" * 600], max_line_bytes=1000)  # 600 characters, 1200 bytes
    assert len(s.document()["studioml"]["log"]) == 2
    assert s.problems


def test_document_cap_stops_the_log_but_not_the_merges() -> None:
    s = fed([f"line {i} " + "y" * 100 for i in range(2000)], max_doc_bytes=64 << 10)
    for i in range(50):
        s.feed(f'{{"step": {i}}}')
    s.feed("after the cap")
    size = len(s.to_json().encode())
    assert (64 << 10) < size < (64 << 10) + (8 << 10)  # stopped near the cap, not at 2000 lines
    assert s.document()["step"] == 49
    assert s.document()["studioml"]["log"][-1]["msg"] != "after the cap"
    assert sum("no longer logged" in p for p in s.problems) == 1


def test_replaced_values_do_not_close_the_log_early() -> None:
    s = scraper(max_doc_bytes=64 << 10)
    for i in range(2000):  # ~200 KB fed, but every line replaces the same key
        s.feed(f'{{"m": "{i:0100d}"}}')
    s.feed("still logged")
    assert s.document()["studioml"]["log"][-1]["msg"] == "still logged"
    assert s.problems == []


def test_problems_are_capped() -> None:
    s = fed(['[{"op": "remove", "path": "/nope"}]'] * (MAX_PROBLEMS + 50))
    assert len(s.problems) == MAX_PROBLEMS + 1
    assert "not recorded" in s.problems[-1]


# --- identities --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("n", "digits"), [(0, "0"), (9, "9"), (10, "A"), (36, "a"), (61, "z"), (62, "10"),
                                           (62 * 62, "100"), (3843, "zz")])
def test_base62(n: int, digits: str) -> None:
    assert base62(n) == digits


def test_base62_rejects_negative() -> None:
    with pytest.raises(ValueError):
        base62(-1)


def test_attempt_id_and_scrape_file_name() -> None:
    assert attempt_id("node7", 62.9) == "node7-10"
    assert attempt_id("node7", 1631664007.5) == "node7-" + base62(1631664007)
    assert scrape_file_name("node7", 62) == "scrape-host-node7-10.json"
    named = scrape_file_name("node7", 62, "exp-a")
    assert named.startswith("scrape-host-node7-10-") and named != scrape_file_name("node7", 62, "exp-b")
    # two attempts of one experiment in the same second keep a document each
    assert scrape_file_name("node7", 62, "exp-a", "node7-10-ab12") != scrape_file_name("node7", 62, "exp-a",
                                                                                      "node7-10-cd34")
    earlier, later = (attempt_id("h", t) for t in (1631664007, 1631664008))
    assert earlier < later


# --- storage -----------------------------------------------------------------------------------------------

def test_write_document_writes_one_line(tmp_path: Path) -> None:
    s = fed(init_lines("h", T0) + ["plain"])
    target = tmp_path / "_metadata" / "scrape-host-h-1.json"
    write_document(s, target)
    text = target.read_text(encoding="utf-8")
    assert text.endswith("\n") and text.count("\n") == 1
    assert json.loads(text) == s.document()
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temporary file left behind


def test_write_document_of_empty_scrape_removes_the_file(tmp_path: Path) -> None:
    target = tmp_path / "scrape.json"
    target.write_text("old\n")
    write_document(scraper(), target)
    assert not target.exists()
    write_document(scraper(), target)  # still fine when there is nothing to remove
    assert not target.exists()


def test_lone_surrogates_are_written_as_valid_json(tmp_path: Path) -> None:
    line = b"bad byte \xff here".decode("utf-8", "surrogateescape")
    s = fed([line])
    target = tmp_path / "scrape.json"
    write_document_text(s.to_json(), target)
    doc = json.loads(target.read_bytes().decode("utf-8"))
    assert doc["studioml"]["log"][-1]["msg"] == line

"""Prometheus metrics: the spec's families and label keys (spec/options.md §3), parsed with
prometheus-client's own parser, series bounded, and counters that move when a real runner runs real
experiments (scraped over HTTP from the status server in the runner's nursery)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from support.studioml_client import cache_root

from studio_runner import config, runtime
from studio_runner.attempt import Action, Outcome, Phase, Status
from studio_runner.events import Finished, QueueChecked, QueuesListed, Registry
from studio_runner.metrics import RunnerMetrics
from studio_runner.resources import Capacity, Ledger
from studio_runner.status import StatusApp
from studio_runner.statusserver import serve_status
from studio_runner.submit import Submission, submit

# family -> (type, label keys), exactly as spec/options.md §3 lists them
SPEC = {
    "runner_queue_refresh_success": ("counter", {"host", "project"}),
    "runner_queue_refresh_fail": ("counter", {"host", "project"}),
    "runner_queue_checked": ("counter", {"host", "queue_type", "queue_name"}),
    "runner_queue_ignored": ("counter", {"host", "queue_type", "queue_name"}),
    "runner_project_running": ("gauge", {"host", "queue_type", "queue_name", "project", "experiment"}),
    "runner_project_completed": ("counter", {"host", "queue_type", "queue_name", "project", "experiment"}),
    "runner_cache_hits": ("counter", {"host", "hash"}),
    "runner_cache_misses": ("counter", {"host", "hash"}),
    "runner_resource_cpu_free_slots": ("gauge", {"host"}),
    "runner_resource_cpu_ram_free_bytes": ("gauge", {"host"}),
    "runner_resource_disk_free_bytes": ("gauge", {"host"}),
    "runner_resource_gpu_free_slots": ("gauge", {"host"}),
}
EXTRAS = {"runner_experiments": "counter", "runner_gpu_memory_used_bytes": "gauge",
          "runner_gpu_memory_total_bytes": "gauge", "runner_gpu_utilisation_percent": "gauge",
          "runner_info": "gauge", "process_resident_memory_bytes": "gauge"}


def parse(text: str) -> dict[str, tuple[str, list[Sample]]]:
    return {f.name: (f.type, f.samples) for f in text_string_to_metric_families(text)}


def series(families: dict[str, tuple[str, list[Sample]]], family: str, suffix: str = "") -> list[Sample]:
    """The samples of ``family`` named ``family + suffix`` (counters: ``_total``, not ``_created``)."""
    return [s for s in families[family][1] if s.name == family + suffix]


def value(families: dict[str, tuple[str, list[Sample]]], family: str, suffix: str = "", **labels: str
          ) -> float:
    return sum(s.value for s in series(families, family, suffix)
               if all(s.labels.get(k) == v for k, v in labels.items()))


def finished(registry: Registry, key: str, status: Status, queue: str = "local_q") -> None:
    record = registry.claim(queue, "local", f"m-{key}", 1)
    registry.identify(record, key, "proj")
    registry.finish(record, Outcome(key=key, status=status, action=status_action(status)))
    registry.settle(record, None)


def status_action(status: Status) -> Action:
    return Action.RELEASE if status is Status.DEFERRED else Action.ACK


def test_every_family_of_the_spec_with_its_label_keys(tmp_path: Path) -> None:
    """The exposition parses, and every spec family is there with its type and exactly its label keys once
    one event of each kind happened (label keys of a labelled family only show on its series)."""
    registry = Registry("host-a")
    metrics = RunnerMetrics("host-a", registry, ledger=Ledger(Capacity(cores=4, ram=1 << 30), tmp_path))
    metrics.attach(registry.bus)
    registry.bus.publish(QueuesListed("local", "/q", True, ("local_q",)))
    registry.bus.publish(QueuesListed("rabbitmq", "amqp://b/", False, (), "refused"))
    registry.bus.publish(QueueChecked("local", "/q", "local_q"))
    registry.bus.publish(QueueChecked("local", "/q", "local_r", ignored=True))
    live = registry.claim("local_q", "local", "m1", 1)
    registry.identify(live, "exp_live", "proj")
    finished(registry, "exp_done", Status.SUCCESS)
    metrics.cache_lookup("etag-1", True)
    metrics.cache_lookup("etag-2", False)

    families = parse(metrics.render().decode())
    for name, (kind, keys) in SPEC.items():
        assert name in families, f"{name} missing from /metrics"
        got_kind, samples = families[name]
        assert got_kind == kind, (name, got_kind)
        assert samples, f"{name} has no series"
        assert {frozenset(s.labels) for s in samples} == {frozenset(keys)}, (name, samples)
    for name, kind in EXTRAS.items():
        assert families[name][0] == kind, name
    text = metrics.render().decode()
    assert "runner_queue_checked_total{" in text  # counters are exposed with the _total suffix
    assert value(families, "runner_queue_checked", "_total", queue_type="local", queue_name="local_q") == 1
    assert value(families, "runner_queue_ignored", "_total", queue_name="local_r") == 1
    assert value(families, "runner_queue_refresh_success", "_total", project="/q") == 1
    assert value(families, "runner_queue_refresh_fail", "_total", project="amqp://b/") == 1
    assert value(families, "runner_project_running", experiment="exp_live", queue_name="local_q",
                 queue_type="local", project="proj") == 1
    assert value(families, "runner_project_completed", "_total", experiment="exp_done", project="proj") == 1
    assert value(families, "runner_cache_hits", "_total", hash="etag-1") == 1
    assert value(families, "runner_cache_misses", "_total", hash="etag-2") == 1
    assert value(families, "runner_experiments", "_total", status="success") == 1
    assert families["runner_info"][1][0].labels["version"]
    assert value(families, "runner_resource_cpu_free_slots", host="host-a") == 4
    assert value(families, "runner_resource_cpu_ram_free_bytes", host="host-a") == 1 << 30
    assert value(families, "runner_resource_gpu_free_slots", host="host-a") == 0  # no GPU pool


def test_series_are_bounded_and_the_running_gauge_follows_the_registry() -> None:
    registry = Registry("h")
    metrics = RunnerMetrics("h", registry, keep_completed=3, keep_hashes=2, process=False)
    metrics.attach(registry.bus)
    record = registry.claim("local_q", "local", "m", 1)
    registry.identify(record, "exp_run", "")
    registry.phase(record, Phase.RUNNING)
    assert value(parse(metrics.render().decode()), "runner_project_running", experiment="exp_run") == 1
    for n in range(5):
        finished(registry, f"exp_{n}", Status.FAILED)
    finished(registry, "exp_deferred", Status.DEFERRED)  # released unstarted: not "completed" here
    registry.finish(record, Outcome(key="exp_run", status=Status.SUCCESS, action=Action.ACK))
    registry.settle(record, None)
    for n in range(4):
        metrics.cache_lookup(f"e{n}", True)
    families = parse(metrics.render().decode())
    assert series(families, "runner_project_running") == []  # the series goes when the attempt ends
    kept = sorted(s.labels["experiment"] for s in series(families, "runner_project_completed", "_total"))
    assert kept == ["exp_3", "exp_4", "exp_run"]
    assert sorted(s.labels["hash"] for s in series(families, "runner_cache_hits", "_total")) == ["e2", "e3"]
    assert value(families, "runner_experiments", "_total", status="failed") == 5  # never pruned
    assert value(families, "runner_experiments", "_total", status="deferred") == 1
    assert value(families, "runner_experiments", "_total", status="timeout") == 0  # zero series exist


def test_two_runners_in_one_process_do_not_share_metrics() -> None:
    one, two = Registry("one"), Registry("two")
    m1, m2 = RunnerMetrics("one", one), RunnerMetrics("two", two)
    m1.attach(one.bus)
    m2.attach(two.bus)
    finished(one, "exp_x", Status.SUCCESS)
    f1, f2 = parse(m1.render().decode()), parse(m2.render().decode())
    assert value(f1, "runner_experiments", "_total", status="success") == 1
    assert value(f2, "runner_experiments", "_total", status="success") == 0


def test_a_real_runner_moves_the_counters(tmp_path: Path) -> None:
    """Two real experiments from one local queue (the second served its workspace from the artifact cache),
    one fake GPU card: scraped over HTTP, the counters moved and the gauges read the ledger and the card."""
    queue_root, work, store = tmp_path / "queue", tmp_path / "work", tmp_path / "store"
    queue_root.mkdir()
    work.mkdir()
    fake = tmp_path / "gpus.json"
    fake.write_text(json.dumps([{"uuid": "GPU-fake-0", "name": "Fake H200", "memory": "16GiB", "used": "1GiB",
                                 "utilisation": 37, "slots": 8}]))
    script = tmp_path / "ws" / "train.py"
    script.parent.mkdir()
    script.write_text("print('hello from the experiment', flush=True)\n")
    keys = [f"exp_metrics_{n}_{int(time.time())}" for n in range(2)]
    for key in keys:
        submit(Submission(script=script, queue="local_metrics", experiment=key, project="proj_m", hdd="10m",
                          ram="64m"), queue_root, store)
    settings = config.resolve({"queue_root": str(queue_root), "working_dir": str(work),
                               "env_cache_dir": str(cache_root() / "envs"), "cache_dir": str(tmp_path / "ac"),
                               "cache_size": "1GiB", "gpu_fake": str(fake), "poll_interval": "0.05s",
                               "local_storage_roots": str(tmp_path)},
                              environ={})
    (tmp_path / "ac").mkdir()

    async def main() -> tuple[str, str]:
        async with runtime.open_runner(settings) as supervisor, trio.open_nursery() as nursery:
            app = StatusApp(supervisor, host=settings.hostname)
            address = await nursery.start(serve_status, "127.0.0.1:0", app)
            async with httpx.AsyncClient(base_url=f"http://{address}", timeout=10) as client:
                before = (await client.get("/metrics")).text
                outcomes = await supervisor.run(once=True)
                assert [o.status for o in outcomes] == [Status.SUCCESS, Status.SUCCESS], outcomes
                response = await client.get("/metrics")
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/plain")
                after = response.text
            nursery.cancel_scope.cancel()
        return before, after

    before, after = trio.run(main)
    host = settings.hostname
    b, a = parse(before), parse(after)
    for name, (_, label_keys) in SPEC.items():
        assert name in a, name
        assert all(set(s.labels) == label_keys for s in a[name][1]), name
    assert value(b, "runner_project_completed", "_total") == 0
    for key in keys:
        assert value(a, "runner_project_completed", "_total", host=host, queue_type="local",
                     queue_name="local_metrics", project="proj_m", experiment=key) == 1
    assert value(a, "runner_experiments", "_total", status="success") == 2
    assert value(a, "runner_queue_checked", "_total", queue_type="local", queue_name="local_metrics") >= 2
    assert value(a, "runner_queue_refresh_success", "_total", host=host) >= 1
    assert value(a, "runner_cache_misses", "_total") == 1 and value(a, "runner_cache_hits", "_total") == 1
    [hit] = series(a, "runner_cache_hits", "_total")
    assert [m.labels["hash"] for m in series(a, "runner_cache_misses", "_total")] == [hit.labels["hash"]]
    assert series(a, "runner_project_running") == []
    assert value(a, "runner_resource_cpu_free_slots", host=host) >= 1
    assert value(a, "runner_resource_cpu_ram_free_bytes") > 0
    assert value(a, "runner_resource_disk_free_bytes") > 0
    assert value(a, "runner_resource_gpu_free_slots") == 8
    assert value(a, "runner_gpu_memory_total_bytes", uuid="GPU-fake-0", index="0") == 16 << 30
    assert value(a, "runner_gpu_utilisation_percent", uuid="GPU-fake-0") == 37
    assert value(a, "process_resident_memory_bytes") > 0


def test_finished_event_for_an_unidentified_message_counts_with_empty_labels() -> None:
    """An invalid message never gets a key: it still counts, under the message id it had (empty key)."""
    registry = Registry("h")
    metrics = RunnerMetrics("h", registry, process=False)
    metrics.attach(registry.bus)
    record = registry.claim("local_q", "local", "m9", 1)
    registry.bus.publish(Finished(record, Outcome(key="m9", status=Status.INVALID,
                                                  action=status_action(Status.INVALID))))
    families = parse(metrics.render().decode())
    assert value(families, "runner_project_completed", "_total", experiment="") == 1

"""Prometheus metrics (spec/options.md §3): the Go runner's names and label keys, the spec's recommended
label values.

Everything lives in one :class:`prometheus_client.CollectorRegistry` per runner, never the library's global
one, so that many runners in one process (tests, the demo) do not collide.

How each figure is obtained, and why:

* Counters move from events (:class:`~studio_runner.events.EventBus`): queue listings and intake checks
  (``runner_queue_refresh_*``, ``runner_queue_checked`` / ``_ignored``), attempts that finished
  (``runner_project_completed``, ``runner_experiments``), and the artifact cache's observer hook
  (``runner_cache_hits`` / ``_misses``, label ``hash`` = the object's ETag, or the cache key without one).
* Gauges are read at scrape time (a custom collector), so they are never stale and never need a timer:
  ``runner_project_running`` from ``Registry.live()``, the ledger's free cores, RAM and disk, the GPU pool's
  free slots, and per-card memory and utilisation.

``runner_queue_checked`` and ``runner_queue_ignored`` are exclusive: a look at a queue counts in one of
them (ignored: intake suspended, with ``queue_name`` ``*``; the queue paused; its last request does not fit
now). ``runner_queue_refresh_*`` count one backend's listing each, ``project`` = where its queues live (the
queue root, the masked broker URL). ``runner_project_completed`` leaves out attempts released unstarted
(status ``deferred``: the request did not fit now); ``runner_experiments`` counts every attempt.

Label values follow the spec's **Recommended** column: ``queue_type`` is the real backend (``local``,
``rabbitmq``, ``memory``), ``queue_name`` the bare queue name, ``project`` the request's
``experiment.project`` (empty for clients that send none), ``host`` the runner's host name.

Cardinality is bounded: ``runner_project_running`` only has series for attempts held now;
``runner_project_completed`` keeps the series of the ``keep_completed`` most recently finished experiments
(default 500) and removes older ones; ``runner_cache_hits`` / ``_misses`` keep ``keep_hashes`` objects
(default 500). A removed counter series reads as a counter reset to Prometheus, which ``rate()`` handles;
sums over all experiments belong to ``runner_experiments_total`` (label ``status``), which is never pruned.

Exposition: prometheus-client writes counters with the ``_total`` suffix (``runner_queue_checked_total``),
as the OpenMetrics convention and the Go client do; the metric *family* names are exactly the spec's, and
that is what parsers (``text_string_to_metric_families``) and recording rules see.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Info, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from studio_runner import __version__
from studio_runner.attempt import Status
from studio_runner.events import AttemptRecord, Event, Finished, QueueChecked, QueuesListed, Registry
from studio_runner.redact import scrub

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The Prometheus text format's media type (what ``prometheus_client.CONTENT_TYPE_LATEST`` says)."""

DEFAULT_KEEP_COMPLETED = 500
DEFAULT_KEEP_HASHES = 500

RUNNING_LABELS = ("host", "queue_type", "queue_name", "project", "experiment")


class LedgerView(Protocol):
    """What the collector reads of :class:`~studio_runner.resources.Ledger`."""

    @property
    def cores_free(self) -> int: ...

    @property
    def ram_free(self) -> int: ...

    def disk_free(self) -> int: ...

    @property
    def gpus(self) -> Any: ...


class _Bounded:
    """Label tuples of one counter, oldest first; past ``limit`` the oldest series is removed."""

    def __init__(self, counter: Counter, limit: int) -> None:
        self.counter = counter
        self.limit = max(1, limit)
        self.seen: collections.OrderedDict[tuple[str, ...], None] = collections.OrderedDict()

    def inc(self, *labels: str) -> None:
        self.seen[labels] = None
        self.seen.move_to_end(labels)
        self.counter.labels(*labels).inc()
        while len(self.seen) > self.limit:
            old, _ = self.seen.popitem(last=False)
            self.counter.remove(*old)


class _LiveCollector(Collector):
    """Gauges read when Prometheus scrapes: running attempts, free resources, GPU cards."""

    def __init__(self, host: str, registry: Registry, ledger: Callable[[], LedgerView | None]) -> None:
        self.host = host
        self.registry = registry
        self.ledger = ledger

    def collect(self) -> Iterator[Metric]:
        running = GaugeMetricFamily("runner_project_running", "Experiments in progress.",
                                    labels=list(RUNNING_LABELS))
        counts: collections.Counter[tuple[str, ...]] = collections.Counter(
            running_labels(self.host, record) for record in self.registry.live())
        for labels, count in sorted(counts.items()):
            running.add_metric(list(labels), count)
        yield running
        host = [self.host]
        cpu = GaugeMetricFamily("runner_resource_cpu_free_slots", "Unreserved cores.", labels=["host"])
        ram = GaugeMetricFamily("runner_resource_cpu_ram_free_bytes", "Unreserved RAM.", labels=["host"])
        disk = GaugeMetricFamily("runner_resource_disk_free_bytes",
                                 "Unreserved disk (free space minus the reserve and running experiments' "
                                 "reservations).", labels=["host"])
        gpu = GaugeMetricFamily("runner_resource_gpu_free_slots", "Sum of slots of unallocated GPUs.",
                                labels=["host"])
        card_labels = ["host", "uuid", "index"]
        used = GaugeMetricFamily("runner_gpu_memory_used_bytes", "GPU memory in use (any process).",
                                 labels=card_labels)
        total = GaugeMetricFamily("runner_gpu_memory_total_bytes", "GPU memory in all.", labels=card_labels)
        util = GaugeMetricFamily("runner_gpu_utilisation_percent", "GPU utilisation over the driver's last "
                                 "sample period.", labels=card_labels)
        ledger = self.ledger()
        if ledger is not None:
            cpu.add_metric(host, ledger.cores_free)
            ram.add_metric(host, ledger.ram_free)
            try:
                disk.add_metric(host, max(0, ledger.disk_free()))
            except OSError:
                pass  # the working directory is gone or unreadable: no figure rather than a wrong one
            pool = ledger.gpus
            if pool is not None:
                snapshot = pool.snapshot()
                gpu.add_metric(host, snapshot.free_slots)
                for card in snapshot.cards:
                    values = [self.host, card.uuid, str(card.index)]
                    used.add_metric(values, card.memory_used)
                    total.add_metric(values, card.memory_total)
                    if card.utilisation is not None:
                        util.add_metric(values, card.utilisation)
            else:
                gpu.add_metric(host, 0)
        yield from (cpu, ram, disk, gpu, used, total, util)


def running_labels(host: str, record: AttemptRecord) -> tuple[str, ...]:
    """The label values of one attempt in ``runner_project_running`` / ``runner_project_completed``; scrubbed
    (redact.scrub): project and key come from the request."""
    return tuple(scrub(value) for value in (host, record.backend, record.queue, record.project, record.key))


class RunnerMetrics:
    """The runner's metrics; :meth:`observe` is an EventBus subscriber, :meth:`render` the /metrics body."""

    def __init__(self, host: str, registry: Registry, *, ledger: LedgerView | None = None,
                 keep_completed: int = DEFAULT_KEEP_COMPLETED, keep_hashes: int = DEFAULT_KEEP_HASHES,
                 process: bool = True) -> None:
        self.host = host
        self.ledger = ledger
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.refresh_success = Counter("runner_queue_refresh_success", "Successful queue inventory "
                                       "refreshes.", ["host", "project"], registry=r)
        self.refresh_fail = Counter("runner_queue_refresh_fail", "Failed queue inventory refreshes.",
                                    ["host", "project"], registry=r)
        queue_labels = ["host", "queue_type", "queue_name"]
        self.checked = Counter("runner_queue_checked", "Times a queue was examined for work.", queue_labels,
                               registry=r)
        self.ignored = Counter("runner_queue_ignored", "Times a queue was skipped on purpose (intake "
                               "suspended, queue paused, its last request does not fit now).", queue_labels,
                               registry=r)
        completed = Counter("runner_project_completed", "Experiments finished here (any outcome; not those "
                            f"released unstarted). Series of the last {keep_completed} experiments only.",
                            list(RUNNING_LABELS), registry=r)
        self.completed = _Bounded(completed, keep_completed)
        self.experiments = Counter("runner_experiments", "Attempts ended, by outcome status (never pruned).",
                                   ["host", "status"], registry=r)
        hits = Counter("runner_cache_hits", "Artifact cache hits (hash = ETag).", ["host", "hash"],
                       registry=r)
        misses = Counter("runner_cache_misses", "Artifact cache misses (hash = ETag).", ["host", "hash"],
                         registry=r)
        self.cache_hits, self.cache_misses = _Bounded(hits, keep_hashes), _Bounded(misses, keep_hashes)
        info = Info("runner", "The runner's version and host.", registry=r)
        info.info({"version": __version__, "host": host})
        for status in Status:  # every status series exists from the start: rate() needs the zero
            self.experiments.labels(host, status.value)
        r.register(_LiveCollector(host, registry, lambda: self.ledger))
        if process:
            ProcessCollector(registry=r)

    # -- inputs -------------------------------------------------------------------------------------------
    def observe(self, event: Event) -> None:
        """EventBus subscriber: counts what happened. Quick, never raises on an unknown event."""
        if isinstance(event, Finished):
            record = event.record
            status = event.outcome.status
            self.experiments.labels(self.host, status.value).inc()
            if status is not Status.DEFERRED:  # released unstarted: it did not run here
                self.completed.inc(*running_labels(self.host, record))
            return
        if isinstance(event, QueuesListed):
            counter = self.refresh_success if event.ok else self.refresh_fail
            counter.labels(self.host, event.location).inc()
        elif isinstance(event, QueueChecked):
            counter = self.ignored if event.ignored else self.checked
            counter.labels(self.host, event.backend, event.queue).inc()

    def cache_lookup(self, name: str, hit: bool) -> None:
        """ArtifactCache observer: one lookup of object ``name`` (its ETag)."""
        (self.cache_hits if hit else self.cache_misses).inc(self.host, name)

    def attach(self, bus: Any, artifact_cache: Any = None) -> Callable[[], None]:
        """Subscribe to ``bus`` (and hook the artifact cache); returns the function that detaches both."""
        unsubscribe = bus.subscribe(self.observe)
        if artifact_cache is not None:
            artifact_cache.observer = self.cache_lookup

        def detach() -> None:
            unsubscribe()
            if artifact_cache is not None and artifact_cache.observer == self.cache_lookup:
                artifact_cache.observer = None

        return detach

    # -- output -------------------------------------------------------------------------------------------
    def render(self) -> bytes:
        """The Prometheus text exposition of every metric (runs the scrape-time collectors)."""
        return generate_latest(self.registry)

    def families(self) -> Iterable[str]:
        """Names of the metric families registered (for tests and docs)."""
        return sorted({metric.name for metric in self.registry.collect()})

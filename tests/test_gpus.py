"""GPU discovery, slots, visible set, allocation, draining, fencing (studio_runner/gpus/); no GPU needed."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import pynvml
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from studio_runner.gpus import (
    Allocation,
    FakeBackend,
    GpuDemand,
    GpuDevice,
    GpuPool,
    NoGpuBackend,
    NvmlBackend,
    Refusal,
    VisibleSet,
    hidden_environment,
    open_gpu_backend,
    slot_rule,
    slots_for,
    unknown_card_slots,
    visible_from_environ,
)
from studio_runner.request import parse_request
from studio_runner.usage import TreeSampler

GiB = 1024**3
REPO = Path(__file__).resolve().parent.parent


def uuid(n: int) -> str:
    return f"GPU-{n:08x}-0000-4000-8000-{n:012x}"


def card(n: int, name: str = "Fake GPU", memory: str | int = "16GiB", **extra) -> dict:
    return {"uuid": uuid(n), "name": name, "memory": memory, **extra}


class Cards:
    """A fake GPU file the tests rewrite while the pool runs (atomically, as the docstring asks)."""

    def __init__(self, path: Path, cards: list[dict]) -> None:
        self.path = path
        self.cards = cards
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.cards))
        os.replace(tmp, self.path)

    def set(self, index: int, **values) -> None:
        self.cards[index].update(values)
        self.write()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def fake_pool(tmp_path: Path, cards: list[dict], clock: Clock | None = None, visible: str | None = None,
              **kw) -> tuple[GpuPool, Cards]:
    file = Cards(tmp_path / "gpus.json", cards)
    pool = GpuPool(FakeBackend(file.path, VisibleSet.parse(visible)), clock=clock or Clock(), **kw)
    return pool, file


def state(pool: GpuPool, n: int) -> str:
    return next(c.state for c in pool.snapshot().cards if c.uuid == uuid(n))


# -- slots -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, slots", [
    ("Tesla V100-SXM2-16GB", 16), ("NVIDIA V100-PCIE-32GB", 16), ("Tesla P100-PCIE-16GB", 8),
    ("Tesla P40", 4), ("tesla p40", 4), ("Tesla K80", 2), ("NVIDIA GeForce GTX 1080 Ti", 2),
    ("GeForce GTX 1060 6GB", 2), ("NVIDIA TITAN X (Pascal)", 2), ("NVIDIA GeForce RTX 2080 Ti", 2),
    ("NVIDIA A100-SXM4-40GB", 24),
])
def test_slot_table_matches_a_substring_of_the_name(name, slots):
    assert slots_for(name, 16 * GiB) == slots
    assert slot_rule(name, 16 * GiB)[1] == "table"


@pytest.mark.parametrize("name, memory, slots", [
    ("NVIDIA A100-SXM4-80GB", 80 * GiB, 32),  # not the table's 40GB entry; capped
    ("NVIDIA H200", 143771 * 1024**2, 32),
    ("NVIDIA L4", 23034 * 1024**2, 11),
    ("Tesla T4", 15360 * 1024**2, 7),
    ("Tiny GPU", GiB, 1),  # at least one slot
])
def test_unknown_cards_get_one_slot_per_2_gib_capped(name, memory, slots):
    assert slots_for(name, memory) == unknown_card_slots(memory) == slots
    assert "unknown model" in slot_rule(name, memory)[1]


def test_slot_overrides_win_over_the_table_and_the_longest_key_wins():
    overrides = {"V100": 4, "A10": 6, "A100": 20, "H100": 12}
    assert slots_for("Tesla V100-SXM2-16GB", 16 * GiB, overrides) == 4
    assert slot_rule("Tesla V100-SXM2-16GB", 16 * GiB, overrides)[1] == "configured"
    assert slots_for("NVIDIA A100-PCIE-40GB", 40 * GiB, overrides) == 20
    assert slots_for("NVIDIA A10", 24 * GiB, overrides) == 6
    assert slots_for("NVIDIA H100 80GB HBM3", 80 * GiB, overrides) == 12
    assert slots_for("Tesla P40", 24 * GiB, overrides) == 4  # not in the map: the table


def test_a_zero_slot_override_disables_the_model_and_bad_maps_are_refused(tmp_path):
    pool, _ = fake_pool(tmp_path, [card(1, "NVIDIA L4")], slot_overrides={"L4": 0})
    assert pool.snapshot().cards[0].state == "disabled"
    assert not pool.could_ever_fit(GpuDemand(slots=0, mem=GiB))
    for bad in ({"L4": -1}, {"": 2}, {"L4": "2"}, {"L4": True}):
        with pytest.raises(ValueError, match="slot map"):
            GpuPool(NoGpuBackend("x"), slot_overrides=bad)


# -- demand ----------------------------------------------------------------------------------------------

def demand_of(resources: dict) -> GpuDemand:
    doc = {"experiment": {"key": "k", "filename": "x.py", "resources_needed": resources, "artifacts": {}},
           "config": {"env": {}}}
    return GpuDemand.from_resources(parse_request(json.dumps(doc)).experiment.resources)


def test_demand_from_the_request_and_its_card_count():
    assert demand_of({"gpus": 4, "gpuMem": "16gib", "gpuCount": "2"}) == GpuDemand(4, 16 * GiB, 2)
    assert demand_of({"cpus": 2}) == GpuDemand(0, None, 0)
    assert demand_of({"cpus": 2}).cards == 0
    assert demand_of({"gpus": 2}).cards == 1  # gpuCount missing: one card, not Go's zero
    assert demand_of({"gpus": 0, "gpuMem": "8G"}).cards == 1
    assert demand_of({"gpus": 1, "gpuCount": 3}).cards == 3
    assert demand_of({"gpuCount": 3}).cards == 0  # as Go: gpuCount alone asks for nothing
    assert str(GpuDemand(4, 16 * GiB, 2)) == "2 GPU cards with at least 4 slots and 16 GiB each"
    assert GpuDemand(slots=1).wanted and not GpuDemand(count=2).wanted
    with pytest.raises(ValueError):
        GpuDemand(slots=-1)


# -- allocation ------------------------------------------------------------------------------------------

PACKING = [
    card(1, "Small", "8GiB", slots=2),
    card(2, "Big", "16GiB", slots=16),
    card(3, "Mid", "16GiB", slots=8),
    card(4, "Mid", "12GiB", slots=8),
]


def test_packing_takes_the_smallest_sufficient_cards(tmp_path):
    pool, _ = fake_pool(tmp_path, PACKING)
    order = []
    for owner in "abc":
        got = pool.allocate(owner, GpuDemand(slots=4))
        assert isinstance(got, Allocation)
        order.append(got.uuids)
    assert order == [(uuid(4),), (uuid(3),), (uuid(2),)]  # 8 slots/12 GiB, 8/16, then 16 slots
    refused = pool.allocate("d", GpuDemand(slots=4))
    assert isinstance(refused, Refusal) and not refused
    assert "0 of the 3 suitable cards are free" in refused.reason
    small = pool.allocate("e", GpuDemand(slots=1))
    assert isinstance(small, Allocation) and small.uuids == (uuid(1),)


def test_concurrent_allocations_get_disjoint_cards_and_their_environment(tmp_path):
    pool, _ = fake_pool(tmp_path, [card(n, "Tesla V100-SXM2-16GB") for n in range(4)])
    a = pool.allocate("a", GpuDemand(slots=16, count=2))
    b = pool.allocate("b", GpuDemand(slots=8, count=2))
    assert isinstance(a, Allocation) and isinstance(b, Allocation)
    assert len(a.uuids) == len(b.uuids) == 2 and not set(a.uuids) & set(b.uuids)
    assert a.environment() == {"CUDA_VISIBLE_DEVICES": ",".join(a.uuids),
                               "NVIDIA_VISIBLE_DEVICES": ",".join(a.uuids), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert [c.index for c in a.cards] == sorted(c.index for c in a.cards)
    assert not pool.fits_now(GpuDemand(slots=1))
    assert pool.could_ever_fit(GpuDemand(slots=1, count=4))
    with pytest.raises(ValueError, match="already holds"):
        pool.allocate("a", GpuDemand(slots=1))
    owners = {c.uuid: c.owner for c in pool.snapshot().cards}
    assert sorted(owners.values()) == ["a", "a", "b", "b"]


def test_gpu_mem_filters_cards(tmp_path):
    pool, _ = fake_pool(tmp_path, [card(1, memory="12GiB", slots=4), card(2, memory="24GiB", slots=8),
                                   card(3, memory=str(32 * GiB), slots=2)])
    got = pool.allocate("a", GpuDemand(slots=0, mem=16 * GiB))
    assert isinstance(got, Allocation) and got.uuids == (uuid(3),)  # fewest slots among those >= 16 GiB
    got = pool.allocate("b", GpuDemand(slots=4, mem=int(20e9)))
    assert isinstance(got, Allocation) and got.uuids == (uuid(2),)
    verdict = pool.could_ever_fit(GpuDemand(slots=1, mem=40 * GiB))
    assert not verdict and "40 GiB" in verdict.reason and "0 such cards" in verdict.reason


def test_more_cards_than_the_runner_has_never_fit(tmp_path):
    pool, _ = fake_pool(tmp_path, [card(1, "Tesla V100-SXM2-16GB")])
    demand = GpuDemand(slots=1, count=8)
    verdict = pool.could_ever_fit(demand)
    assert not verdict
    assert "needs 8 GPU cards with at least 1 slot each" in verdict.reason
    assert "this runner has 1 such card of 1" in verdict.reason
    assert pool.fits_now(demand).reason == verdict.reason
    assert pool.never_fits(demand) == pool.refusal(demand) == verdict.reason
    assert pool.never_fits(GpuDemand(slots=1)) is pool.refusal(GpuDemand(slots=1)) is None
    refused = pool.allocate("a", demand)
    assert isinstance(refused, Refusal) and refused.reason == verdict.reason
    assert not pool.could_ever_fit(GpuDemand(slots=17))


@pytest.mark.parametrize("backend", [NoGpuBackend("cpu-only mode"), NvmlBackend()],
                         ids=["none", "nvml-without-driver"])
def test_a_machine_without_gpus_fits_cpu_only_demands_only(backend):
    pool = GpuPool(backend)
    assert pool.reason.startswith("no GPUs: ")
    for demand in (GpuDemand(slots=1), GpuDemand(slots=0, mem=1), GpuDemand(slots=2, count=2)):
        verdict = pool.could_ever_fit(demand)
        assert not verdict and "this runner has no GPUs" in verdict.reason
        assert not pool.fits_now(demand)
        assert isinstance(pool.allocate("x", demand), Refusal)
    for demand in (GpuDemand(), GpuDemand(count=3)):
        assert pool.could_ever_fit(demand) and pool.fits_now(demand)
        got = pool.allocate("cpu", demand)
        assert isinstance(got, Allocation) and got.cards == ()
        assert got.environment() == hidden_environment()
        assert got.environment()["CUDA_VISIBLE_DEVICES"] == "" == got.visible_devices
    assert pool.snapshot().to_dict() == {"backend": backend.kind, "reason": pool.reason, "free_slots": 0,
                                         "cards": []}


# -- fencing and draining --------------------------------------------------------------------------------

def test_a_card_with_ecc_errors_is_never_allocated(tmp_path):
    pool, _ = fake_pool(tmp_path, [card(1, slots=2, ecc_errors=3), card(2, slots=16)])
    got = pool.allocate("a", GpuDemand(slots=1))
    assert isinstance(got, Allocation) and got.uuids == (uuid(2),)  # the bigger card, the small one is fenced
    assert state(pool, 1) == "fenced"
    assert not pool.could_ever_fit(GpuDemand(slots=1, count=2))
    assert "1 fenced" in pool.could_ever_fit(GpuDemand(slots=1, count=2)).reason


def test_ecc_errors_during_an_allocation_fence_the_card_for_good(tmp_path, caplog):
    pool, cards = fake_pool(tmp_path, [card(1, slots=4)])
    assert isinstance(pool.allocate("a", GpuDemand(slots=1)), Allocation)
    cards.set(0, ecc_errors=1)
    with caplog.at_level(logging.WARNING, logger="studio_runner.gpus"):
        assert pool.refresh().fenced == (uuid(1),)
        assert pool.refresh().fenced == ()
    assert [r.message for r in caplog.records if "ECC" in r.message] == [
        f"GPU {uuid(1)} (Fake GPU) reports 1 uncorrectable ECC error(s): fenced, never allocated again; "
        "a keeps it until it ends"]
    snap = pool.snapshot().cards[0]
    assert snap.fenced and snap.owner == "a" and snap.state == "allocated"
    pool.release("a", [])
    assert pool.refresh().returned == (uuid(1),)
    assert state(pool, 1) == "fenced"
    cards.set(0, ecc_errors=0)  # volatile counters reset (driver reload): still fenced
    pool.refresh()
    assert state(pool, 1) == "fenced"
    assert not pool.could_ever_fit(GpuDemand(slots=1))


def test_draining_waits_for_the_experiments_processes(tmp_path, clock):
    pool, cards = fake_pool(tmp_path, [card(1, slots=4, processes={"99": "1GiB"})], clock)  # 99: foreign
    assert isinstance(pool.allocate("a", GpuDemand(slots=1)), Allocation)
    cards.set(0, processes={"99": "1GiB", "4242": "2GiB"})
    pool.refresh()
    pool.release("a", [4242, 4243])
    assert state(pool, 1) == "draining"
    assert pool.refresh().returned == ()
    verdict = pool.fits_now(GpuDemand(slots=1))
    assert not verdict and "(1 draining)" in verdict.reason
    assert pool.snapshot().cards[0].pids == [99, 4242]
    cards.set(0, processes={"99": "1GiB"})  # the foreign process stays: it does not hold the card
    result = pool.refresh()
    assert result and result.returned == (uuid(1),)
    assert not pool.refresh()  # nothing came back this time
    assert state(pool, 1) == "free"
    assert isinstance(pool.allocate("b", GpuDemand(slots=1)), Allocation)


def test_draining_waits_for_processes_that_appeared_during_the_allocation(tmp_path, clock):
    """A PID the supervisor did not know (another PID namespace, a missed grandchild) still holds the card."""
    pool, cards = fake_pool(tmp_path, [card(1, slots=4)], clock)
    assert isinstance(pool.allocate("a", GpuDemand(slots=1)), Allocation)
    cards.set(0, processes={"777": "1GiB"})
    pool.release("a")
    assert pool.refresh().returned == ()
    cards.set(0, processes={})
    assert pool.refresh().returned == (uuid(1),)


def test_a_stuck_drain_is_returned_after_the_timeout_with_a_warning(tmp_path, clock, caplog):
    pool, cards = fake_pool(tmp_path, [card(1, slots=4)], clock, drain_timeout=60)
    assert isinstance(pool.allocate("a", GpuDemand(slots=1)), Allocation)
    cards.set(0, processes={"4242": "2GiB"})
    pool.release("a", [4242])
    clock.now += 59
    assert pool.refresh().returned == ()
    clock.now += 1
    with caplog.at_level(logging.WARNING, logger="studio_runner.gpus"):
        result = pool.refresh()
    assert result.returned == result.timed_out == (uuid(1),)
    assert any("after 60s of draining although processes [4242] still hold memory" in r.message
               for r in caplog.records)
    assert state(pool, 1) == "free"


def test_a_backend_that_cannot_list_processes_returns_cards_at_the_next_refresh(tmp_path, clock):
    pool, _ = fake_pool(tmp_path, [card(1, slots=4, processes=None)], clock)
    assert isinstance(pool.allocate("a", GpuDemand(slots=1)), Allocation)
    pool.release("a", [1, 2, 3])
    pool.release("a", [1, 2, 3])  # twice: harmless
    pool.release("nobody")
    assert state(pool, 1) == "draining"  # until a refresh has looked
    assert pool.refresh().returned == (uuid(1),)


def test_a_card_that_disappears_is_not_allocated_and_drains_by_timeout(tmp_path, clock):
    pool, cards = fake_pool(tmp_path, [card(1, slots=4), card(2, slots=8)], clock)
    assert isinstance(pool.allocate("a", GpuDemand(slots=1)), Allocation)
    saved = cards.cards[:]
    cards.cards = [saved[1]]
    cards.write()
    pool.refresh()
    assert state(pool, 1) == "missing"
    pool.release("a")
    assert pool.refresh().returned == ()
    assert not pool.could_ever_fit(GpuDemand(slots=1, count=2))
    clock.now += 60
    assert pool.refresh().timed_out == (uuid(1),)
    cards.cards = saved
    cards.write()
    pool.refresh()
    assert state(pool, 1) == "free"


# -- fake file, snapshot ---------------------------------------------------------------------------------

def test_fake_file_format_and_a_bad_rewrite_keeps_the_last_cards(tmp_path, caplog):
    pool, cards = fake_pool(tmp_path, [
        card(1, "Tesla P40", 24_000_000_000, utilisation=35, processes={"7": "1GiB", "8": 512}),
        {"uuid": uuid(2), "memory": "8GiB", "used": "2GiB", "index": 5, "utilization": 1},
    ])
    snap = pool.snapshot()
    first, second = snap.cards
    assert (first.name, first.memory_total, first.memory_used, first.slots, first.utilisation) == (
        "Tesla P40", 24_000_000_000, GiB + 512, 4, 35)
    assert (second.name, second.index, second.memory_used, second.slots) == ("Fake GPU", 5, 2 * GiB, 4)
    assert snap.free_slots == 8
    json.dumps(snap.to_dict())
    cards.path.write_text("[{")
    with caplog.at_level(logging.WARNING, logger="studio_runner.gpus"):
        pool.refresh()
        pool.refresh()
    assert len([r for r in caplog.records if "keeping the previous cards" in r.message]) == 1
    assert len(pool.snapshot().cards) == 2


@pytest.mark.parametrize("content, message", [
    ("{", "not JSON"), ('{"x": 1}', "expected a list"), ('[{"uuid": "GPU-1"}]', "'memory'"),
    ('[{"uuid": "GPU-1", "memory": "8GiB", "colour": 1}]', "unknown keys"),
    ('[{"uuid": "GPU-1", "memory": "lots"}]', "invalid size"),
    ('[{"uuid": "GPU-1", "memory": 1}, {"uuid": "GPU-1", "memory": 1}]', "duplicate"),
])
def test_a_bad_fake_file_is_refused_at_start_up(tmp_path, content, message):
    path = tmp_path / "gpus.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        open_gpu_backend(False, str(path), None)


def test_cpu_only_gives_no_cards_without_touching_nvml(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # any import of it would fail
    Cards(tmp_path / "gpus.json", [card(1)])
    backend = open_gpu_backend(True, str(tmp_path / "gpus.json"), "all")
    assert backend.kind == "none" and backend.devices() == []
    assert GpuPool(backend).reason == "no GPUs: cpu-only mode"


# -- visible set -----------------------------------------------------------------------------------------

def visible_uuids(tmp_path: Path, visible: str | None, n: int = 3) -> list[str]:
    pool, _ = fake_pool(tmp_path, [card(i) for i in range(n)], visible=visible)
    return [c.uuid for c in pool.snapshot().cards]


def test_visible_set_by_uuid_and_prefix(tmp_path):
    assert visible_uuids(tmp_path, f"{uuid(2)}, {uuid(0)}") == [uuid(0), uuid(2)]
    assert visible_uuids(tmp_path, "gpu-00000001") == [uuid(1)]


def test_visible_set_all_and_none(tmp_path):
    every = [uuid(0), uuid(1), uuid(2)]
    assert visible_uuids(tmp_path, None) == visible_uuids(tmp_path, "all") == visible_uuids(tmp_path, "ALL")
    assert visible_uuids(tmp_path, None) == every
    for none in ("", " ", "-1", "none", "void", "-1,0"):
        assert visible_uuids(tmp_path, none) == [], none


def test_visible_set_by_index_warns(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="studio_runner.gpus"):
        assert visible_uuids(tmp_path, "2,0,-1,1") == [uuid(0), uuid(2)]  # -1 ends the list, as in CUDA
    assert len([r for r in caplog.records if "uses indexes" in r.message]) == 1


def test_visible_set_entries_that_match_nothing_are_skipped_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="studio_runner.gpus"):
        assert visible_uuids(tmp_path, f"GPU-ffff,7,{uuid(1)},MIG-abc,bogus,GPU-0000") == [uuid(1)]
    text = "\n".join(r.message for r in caplog.records)
    for expected in ("'GPU-ffff' matches no card", "'7' matches no card", "MIG instance",
                     "neither a GPU UUID nor an index", "'GPU-0000' matches 3 cards"):
        assert expected in text
    pool, _ = fake_pool(tmp_path, [card(0)], visible="GPU-ffff")
    assert pool.reason == "no GPUs: the visible set 'GPU-ffff' admits none of the 1 fake cards"


def test_visible_from_environ():
    assert visible_from_environ({}) is None
    assert visible_from_environ({"CUDA_VISIBLE_DEVICES": "GPU-a"}) == "GPU-a"
    assert visible_from_environ({"CUDA_VISIBLE_DEVICES": "GPU-a", "NVIDIA_VISIBLE_DEVICES": "all"}) == "GPU-a"
    assert visible_from_environ({"CUDA_VISIBLE_DEVICES": "", "NVIDIA_VISIBLE_DEVICES": "all"}) == "all"
    assert visible_from_environ({"NVIDIA_VISIBLE_DEVICES": "GPU-b"}) == "GPU-b"
    assert visible_from_environ({"CUDA_VISIBLE_DEVICES": ""}) == ""


# -- NVML ------------------------------------------------------------------------------------------------

def test_nvml_backend_on_this_machine_gives_zero_cards_and_a_reason():
    backend = open_gpu_backend(False, None, None)
    assert isinstance(backend, NvmlBackend)
    if pynvml_works():
        pytest.skip("this machine has a working NVIDIA driver")  # not expected in CI
    assert backend.devices() == []
    assert backend.reason.startswith("no NVML: ")
    backend.close()


def pynvml_works() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


@pytest.mark.parametrize("error, reason", [
    (pynvml.NVMLError_DriverNotLoaded, "no NVML: the NVIDIA kernel driver is not loaded"),
    (pynvml.NVMLError_LibraryNotFound, "no NVML: libnvidia-ml.so.1 not found"),
    (pynvml.NVMLError_NoPermission, "no NVML: initialisation failed (NVMLError_NoPermission"),
])
def test_nvml_init_failures_are_reasons_not_exceptions(monkeypatch, error, reason):
    def fail():
        raise error()
    monkeypatch.setattr(pynvml, "nvmlInit", fail)
    backend = NvmlBackend()
    assert backend.reason.startswith(reason) and backend.devices() == []


def test_nvml_import_failure_is_a_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert NvmlBackend().reason.startswith("no NVML: the pynvml module")


class FakeNvml(types.SimpleNamespace):
    """Enough of pynvml for NvmlBackend: per-index behaviours, the real error classes and constants."""

    def __init__(self, cards: list[dict]) -> None:
        super().__init__()
        for name in dir(pynvml):
            if name.startswith(("NVMLError", "NVML_")):
                setattr(self, name, getattr(pynvml, name))
        self.cards = cards
        self.shut = False

    def _get(self, handle, key):
        value = self.cards[handle][key]
        if isinstance(value, type) and issubclass(value, Exception):
            raise value()
        return value

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        self.shut = True

    def nvmlDeviceGetCount(self):
        return len(self.cards)

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetUUID(self, handle):
        return self._get(handle, "uuid")

    def nvmlDeviceGetName(self, handle):
        return self._get(handle, "name")

    def nvmlDeviceGetMemoryInfo(self, handle):
        total = self._get(handle, "memory")
        return types.SimpleNamespace(total=total, used=GiB, free=total - GiB)

    def nvmlDeviceGetMigMode(self, handle):
        return self._get(handle, "mig"), 0

    def nvmlDeviceGetUtilizationRates(self, handle):
        return types.SimpleNamespace(gpu=self._get(handle, "util"), memory=0)

    def nvmlDeviceGetTotalEccErrors(self, handle, error_type, counter_type):
        assert error_type == pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
        assert counter_type == pynvml.NVML_VOLATILE_ECC
        return self._get(handle, "ecc")

    def nvmlDeviceGetComputeRunningProcesses_v3(self, handle):
        raise pynvml.NVMLError_FunctionNotFound()  # an older driver: the backend falls back to v2

    def nvmlDeviceGetComputeRunningProcesses_v2(self, handle):
        procs = self._get(handle, "procs")
        return [types.SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in procs.items()]


def nvml_card(n: int, **over) -> dict:
    values = {"uuid": uuid(n), "name": b"Tesla V100-SXM2-16GB", "memory": 16 * GiB, "mig": 0, "util": 12,
              "ecc": 0, "procs": {}}
    values.update(over)
    return values


def test_nvml_backend_enumerates_and_skips_broken_devices(monkeypatch, caplog):
    fake = FakeNvml([
        nvml_card(0, procs={4242: 2 * GiB, 4243: None}),
        nvml_card(1, uuid=pynvml.NVMLError_Unknown),
        nvml_card(2, memory=pynvml.NVMLError_GpuIsLost),
        nvml_card(3, name=pynvml.NVMLError_Unknown, util=pynvml.NVMLError_NotSupported,
                  ecc=pynvml.NVMLError_NotSupported, mig=pynvml.NVMLError_NotSupported,
                  procs=pynvml.NVMLError_NotSupported),
        nvml_card(4, mig=pynvml.NVML_DEVICE_MIG_ENABLE),
        nvml_card(5, ecc=2, procs=pynvml.NVMLError_NoPermission),
    ])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with caplog.at_level(logging.WARNING, logger="studio_runner.gpus"):
        backend = NvmlBackend()
        devices = backend.devices()
        backend.devices()
    assert backend.reason == ""
    assert [d.uuid for d in devices] == [uuid(0), uuid(3), uuid(5)]
    assert devices[0] == GpuDevice(index=0, uuid=uuid(0), name="Tesla V100-SXM2-16GB", memory_total=16 * GiB,
                                   memory_used=GiB, memory_free=15 * GiB, utilisation=12, ecc_errors=0,
                                   processes={4242: 2 * GiB, 4243: 0})
    assert (devices[1].name, devices[1].utilisation, devices[1].ecc_errors, devices[1].processes) == (
        "unknown NVIDIA GPU", None, 0, None)
    assert (devices[2].ecc_errors, devices[2].processes) == (2, None)
    warnings = [r.message for r in caplog.records]
    assert len(warnings) == 4, warnings  # once each, not once per refresh
    assert any("GPU 1 skipped: its UUID cannot be read" in w for w in warnings)
    assert any(f"GPU 2 ({uuid(2)}) skipped: its memory cannot be read" in w for w in warnings)
    assert any("MIG mode is on" in w for w in warnings)
    assert any("GPU 5: its processes cannot be listed" in w for w in warnings)
    pool = GpuPool(backend)
    assert state(pool, 5) == "fenced"
    assert [c.slots for c in pool.snapshot().cards] == [16, 8, 16]  # no name: the memory default
    pool.close()
    assert fake.shut


def test_nvml_visible_set_applies(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([nvml_card(0), nvml_card(1)]))
    backend = open_gpu_backend(False, None, uuid(1))
    assert [d.uuid for d in backend.devices()] == [uuid(1)]
    backend = open_gpu_backend(False, None, "")
    assert backend.devices() == [] and "admits none of the 2 cards" in backend.reason


# -- helpers ---------------------------------------------------------------------------------------------

def test_refresh_in_a_worker_thread_while_the_trio_thread_allocates(tmp_path):
    pool, _ = fake_pool(tmp_path, [card(n, slots=4) for n in range(4)])
    held: list[str] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            async def refresher() -> None:
                for _ in range(30):
                    await trio.to_thread.run_sync(pool.refresh)
            nursery.start_soon(refresher)
            for i in range(300):
                got = pool.allocate(f"o{i}", GpuDemand(slots=1, count=2))
                if isinstance(got, Allocation):
                    held.append(got.owner)
                    if len(held) == 2:
                        pool.release(held.pop(0))
                await trio.sleep(0)

    trio.run(main)
    pool.release(held.pop())
    pool.refresh()
    assert pool.snapshot().free_slots == 16


def process_tree_pids(root: int) -> set[int]:
    """``root`` and its descendants as the executor's sampler sees them (the pids GPU release gets)."""
    sampler = TreeSampler(root, counts_root=True)
    sampler.sample()
    return sampler.pids


def test_process_tree_pids():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert {os.getpid(), child.pid} <= process_tree_pids(os.getpid())
    finally:
        child.kill()
        child.wait()
    assert process_tree_pids(child.pid) == set()


def test_bench_script_runs_without_a_gpu():
    if pynvml_works():
        pytest.skip("this machine has a GPU: run bench/gpu_check.sh by hand")
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "nothing to check" in done.stdout


# -- property: random cards, random allocate/release/refresh sequences -----------------------------------

class StaticBackend:
    kind = "static"
    reason = ""

    def __init__(self, devices: list[GpuDevice]) -> None:
        self.list = devices

    def devices(self) -> list[GpuDevice]:
        return list(self.list)

    def close(self) -> None:
        pass


card_specs = st.lists(
    st.tuples(st.sampled_from([0, 1, 2, 4, 8, 16, 24]), st.integers(1, 80), st.sampled_from([0, 0, 0, 0, 1])),
    min_size=1, max_size=6,
)
demands = st.builds(GpuDemand, slots=st.sampled_from([0, 0, 1, 2, 4, 8, 16, 30]),
                    mem=st.one_of(st.none(), st.sampled_from([GiB, 8 * GiB, 16 * GiB, 40 * GiB])),
                    count=st.integers(0, 4))
operations = st.lists(st.one_of(
    st.tuples(st.just("allocate"), demands),
    st.tuples(st.just("allocate"), demands),
    st.tuples(st.just("release"), st.integers(0, 20)),
    st.tuples(st.just("refresh"), st.none()),
    st.tuples(st.just("ecc"), st.integers(0, 5)),
    st.tuples(st.just("process"), st.integers(0, 5)),
), min_size=4, max_size=40)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=card_specs, ops=operations)
def test_property_allocations_are_exclusive_sufficient_and_agree_with_fits_now(specs, ops):
    """Also: a released card comes back at the first refresh that shows no process that appeared on it
    since its allocation, and never before."""
    devices = [GpuDevice(index=i, uuid=uuid(i), name="Card", memory_total=gib * GiB, memory_used=0,
                         memory_free=gib * GiB, ecc_errors=int(ecc), processes={}, slots=slots)
               for i, (slots, gib, ecc) in enumerate(specs)]
    backend = StaticBackend(devices)
    pool = GpuPool(backend, clock=lambda: 0.0)  # no time passes: drains end only when processes go
    by_uuid = {d.uuid: d for d in devices}
    fenced = {d.uuid for d in devices if d.ecc_errors}
    held: dict[str, str] = {}  # card -> owner, from allocation until a refresh returns it
    active: list[str] = []
    refreshed = {d.uuid: set(d.processes or ()) for d in devices}  # the pool's view: the last refresh
    baseline: dict[str, set[int]] = {}
    for step, (op, arg) in enumerate(ops):
        if op == "allocate":
            demand, owner = arg, f"o{step}"
            free = sorted((d for d in by_uuid.values() if d.uuid not in held and d.uuid not in fenced
                           and d.slots and d.slots >= demand.slots
                           and (demand.mem is None or d.memory_total >= demand.mem)),
                          key=lambda d: (d.slots, d.memory_total, d.uuid))
            expected = demand.cards == 0 or len(free) >= demand.cards
            verdict = pool.fits_now(demand)
            got = pool.allocate(owner, demand)
            assert bool(verdict) == isinstance(got, Allocation) == expected
            if not pool.could_ever_fit(demand):
                assert isinstance(got, Refusal)
            if isinstance(got, Allocation):
                assert len(got.uuids) == demand.cards == len(set(got.uuids))
                assert set(got.uuids) == {d.uuid for d in free[:demand.cards]}  # the smallest sufficient
                for taken in got.cards:
                    assert taken.uuid not in held and taken.uuid not in fenced
                    assert taken.slots >= demand.slots and taken.slots > 0
                    assert demand.mem is None or taken.memory_total >= demand.mem
                    held[taken.uuid] = owner
                    baseline[taken.uuid] = refreshed[taken.uuid]
                if got.cards:
                    active.append(owner)
            else:
                assert got.reason
        elif op == "release" and active:
            owner = active.pop(arg % len(active))
            pool.release(owner, [1000 + step])
        elif op == "refresh":
            result = pool.refresh()
            assert result.timed_out == ()
            fenced |= {d.uuid for d in backend.list if d.ecc_errors}
            refreshed = {d.uuid: set(d.processes or ()) for d in backend.list}
            drained = {u for u, o in held.items() if o not in active and not refreshed[u] - baseline[u]}
            assert set(result.returned) == drained
            for returned in result.returned:
                del held[returned]
        elif op in ("ecc", "process") and backend.list:
            i = arg % len(backend.list)
            d = backend.list[i]
            if op == "ecc":
                backend.list[i] = GpuDevice(**{**d.__dict__, "ecc_errors": d.ecc_errors + 1})
            else:
                procs = {} if d.processes else {5000 + step: GiB}
                backend.list[i] = GpuDevice(**{**d.__dict__, "processes": procs})
        owners = {c.uuid: c.owner for c in pool.snapshot().cards}
        assert {u: o for u, o in owners.items() if o is not None} == held

"""The resource ledger: capacity from the machine and the caps, the three admission questions, and that no
sequence of reservations and releases can ever hand out more than there is."""

from __future__ import annotations

from collections import namedtuple
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from studio_runner.errors import ConfigError
from studio_runner.request import Resources
from studio_runner.resources import (
    Capacity,
    Demand,
    DoesNotFit,
    Ledger,
    host_capacity,
    thread_settings,
    usable_cores,
)

GB = 10**9
Usage = namedtuple("Usage", "total used free")


class FakeDisk:
    """A file system whose free space the test sets (other programs fill disks too)."""

    def __init__(self, total: int, free: int) -> None:
        self.total, self.free = total, free

    def __call__(self, path: Path) -> Usage:
        return Usage(self.total, self.total - self.free, self.free)


def ledger(cores: int = 4, ram: int = 16 * GB, disk_free: int = 100 * GB, disk_cap: int | None = None,
           reserve: int = 0) -> Ledger:
    return Ledger(Capacity(cores, ram, disk_cap, reserve), Path("/work"),
                  disk_usage=FakeDisk(200 * GB, disk_free))


def test_every_experiment_holds_at_least_one_core() -> None:
    assert Demand.of(Resources()).cores == 1
    assert Demand.of(Resources(cpus=3, ram=2 * GB, hdd=5 * GB)) == Demand(3, 2 * GB, 5 * GB)


def test_cores_ram_and_disk_are_reserved_and_released() -> None:
    book = ledger(cores=4, ram=16 * GB, disk_free=100 * GB)
    book.reserve("a", Demand(3, 10 * GB, 60 * GB))
    assert book.cores_free == 1 and book.ram_free == 6 * GB and book.disk_free() == 40 * GB
    assert "2 core(s); 1 free" in (book.refusal(Demand(2, GB, GB)) or "")
    assert "RAM" in (book.refusal(Demand(1, 7 * GB, GB)) or "")
    assert "disk" in (book.refusal(Demand(1, GB, 41 * GB)) or "")
    with pytest.raises(DoesNotFit):
        book.reserve("b", Demand(2, GB, GB))
    book.reserve("b", Demand(1, 6 * GB, 40 * GB))
    assert not book.has_room
    assert book.release("a") is not None and book.release("a") is None  # idempotent
    assert book.cores_free == 3 and book.has_room


def test_disk_counts_what_others_wrote_the_reserve_and_the_cap() -> None:
    disk = FakeDisk(200 * GB, 50 * GB)
    book = Ledger(Capacity(8, 64 * GB, disk_cap=30 * GB, disk_reserve=10 * GB), Path("/w"), disk_usage=disk)
    assert book.disk_free() == 30 * GB  # the cap is tighter than free - reserve = 40 GB
    book.reserve("a", Demand(1, 0, 20 * GB))
    assert book.disk_free() == 10 * GB
    disk.free = 25 * GB  # someone else filled the disk
    assert book.disk_free() == -5 * GB and book.refusal(Demand(1, 0, 1)) is not None
    assert "--max-disk" in (book.never_fits(Demand(1, 0, 31 * GB)) or "")


def test_demands_beyond_the_whole_runner_never_fit() -> None:
    book = ledger(cores=2, ram=8 * GB)
    assert "8 cores; this runner has 2" in (book.never_fits(Demand(8, GB, GB)) or "")
    assert "RAM" in (book.never_fits(Demand(1, 9 * GB, GB)) or "")
    assert "in all" in (book.never_fits(Demand(1, GB, 500 * GB)) or "")
    assert book.never_fits(Demand(2, 8 * GB, GB)) is None
    with pytest.raises(DoesNotFit, match="this runner has 2"):
        book.reserve("x", Demand(8, GB, GB))
    assert book.held == {}


def test_host_capacity_caps_and_refuses_more_than_the_machine() -> None:
    cap = host_capacity(max_cores=1, max_mem=GB, max_disk=5 * GB, disk_reserve=GB, cores=4, ram=8 * GB)
    assert (cap.cores, cap.ram, cap.disk_cap, cap.disk_reserve) == (1, GB, 5 * GB, GB)
    assert host_capacity(cores=4, ram=8 * GB) == Capacity(4, 8 * GB, None, 0)
    with pytest.raises(ConfigError, match="--max-cores 5 is more than the 4"):
        host_capacity(max_cores=5, cores=4, ram=8 * GB)
    with pytest.raises(ConfigError, match="--max-mem"):
        host_capacity(max_mem=9 * GB, cores=4, ram=8 * GB)
    measured = host_capacity()
    assert measured.cores == usable_cores() >= 1 and measured.ram > 0


def test_thread_counts_follow_the_cores() -> None:
    assert thread_settings(1)["OMP_NUM_THREADS"] == "1" and "OPENMP" not in thread_settings(1)
    four = thread_settings(4)
    assert four["OMP_NUM_THREADS"] == four["MKL_NUM_THREADS"] == four["OPENBLAS_NUM_THREADS"] == "4"
    assert four["OPENMP"] == "True"


demands = st.builds(Demand, cores=st.integers(1, 6), ram=st.integers(0, 20) .map(lambda n: n * GB),
                    disk=st.integers(0, 60).map(lambda n: n * GB))
steps = st.lists(st.one_of(st.tuples(st.just("reserve"), demands), st.tuples(st.just("release"),
                                                                            st.integers(0, 30))),
                 max_size=60)


@settings(max_examples=300, deadline=None)
@given(cores=st.integers(1, 8), ram=st.integers(1, 32), cap=st.one_of(st.none(), st.integers(0, 120)),
       reserve=st.integers(0, 20), script=steps)
def test_no_sequence_of_demands_oversubscribes_anything(cores: int, ram: int, cap: int | None, reserve: int,
                                                        script: list[tuple[str, object]]) -> None:
    """Hypothesis: whatever arrives and leaves, the ledger's holdings stay within every limit, reserve()
    succeeds exactly when both questions say it fits, and refusals change nothing."""
    book = Ledger(Capacity(cores, ram * GB, None if cap is None else cap * GB, reserve * GB), Path("/w"),
                  disk_usage=FakeDisk(150 * GB, 100 * GB))
    owners: list[str] = []
    for n, (op, arg) in enumerate(script):
        if op == "reserve":
            assert isinstance(arg, Demand)
            expected = book.never_fits(arg) is None and book.refusal(arg) is None
            before = dict(book.held)
            try:
                book.reserve(f"o{n}", arg)
                owners.append(f"o{n}")
                assert expected
            except DoesNotFit:
                assert not expected and book.held == before
        elif owners:
            assert isinstance(arg, int)
            book.release(owners.pop(arg % len(owners)))
        held = list(book.held.values())
        assert sum(r.demand.cores for r in held) <= cores
        assert sum(r.demand.ram for r in held) <= ram * GB
        assert sum(r.demand.disk for r in held) <= 100 * GB - reserve * GB or not held
        if cap is not None:
            assert sum(r.demand.disk for r in held) <= cap * GB

"""GPU check on a real machine: what studio_runner.gpus sees, and whether an allocation works end to end.

Meant for a GPU host with a copy of the repository and its .venv, and no network. Steps:

1. NVML's view through ``NvmlBackend`` + ``GpuPool``: every card with its slots, memory, utilisation, ECC
   state and compute processes. No card: prints the reason, "nothing to check", exits 0.
2. Isolation: a child started with ``CUDA_VISIBLE_DEVICES`` unset counts the cards CUDA sees; children with
   ``""`` (our choice for CPU-only experiments) and ``-1`` (Go's) must see none.
3. One card is allocated (``GpuDemand(slots=1, count=1)``) and a child is started with
   ``Allocation.environment()``. It checks CUDA on its card -- torch when importable, else the driver API
   through ctypes (``libcuda.so.1``: cuInit, cuDeviceGetCount, cuDeviceGetName, cuDeviceGetUuid, primary
   context, cuMemAlloc of ``--mib`` MiB) -- prints what it sees and holds the memory ``--hold`` seconds.
   Meanwhile the parent prints NVML's used memory and compute processes of that card. Checks: the child sees
   exactly one device, the allocated one (UUID), and NVML shows its memory (its PID, or a new process when
   NVML reports PIDs of another namespace).
4. Draining: the allocation is released while the child still holds memory; the card must stay
   ``draining`` until the child has exited, then come back by itself (not by the safety-valve timeout).

``--fake FILE`` runs the same steps against the fake backend, with children that simulate CUDA by editing
FILE (a check of this script's own logic on a machine without GPUs).

    bash bench/gpu_check.sh [--mib 256] [--hold 6] [--fake FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from studio_runner.gpus import (  # noqa: E402
    Allocation,
    GpuDemand,
    GpuPool,
    hidden_environment,
    open_gpu_backend,
    visible_from_environ,
)
from studio_runner.units import format_size  # noqa: E402

CHILD = r'''
import ctypes, json, os, sys, time

mode, mib, hold = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
out = {"pid": os.getpid(), "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}


def report(**values):
    out.update(values)
    print("RESULT " + json.dumps(out), flush=True)


def simulated(path):
    """CUDA's view as the fake file describes it; holding memory = listing our PID on the card."""
    cards = json.load(open(path))
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        seen = cards
    else:
        seen = []
        for entry in value.split(",") if value.strip() else []:
            match = [c for c in cards if c["uuid"] == entry.strip()]
            if not match:
                break
            seen += match
    out["api"] = "simulated"
    if mode == "count":
        return report(device_count=len(seen))
    if not seen:
        return report(device_count=0, error="no device")
    def write(holding):
        cards = json.load(open(path))
        for c in cards:
            if c["uuid"] == seen[0]["uuid"]:
                procs = c.setdefault("processes", {})
                if holding:
                    procs[str(os.getpid())] = mib << 20
                else:
                    procs.pop(str(os.getpid()), None)
        open(path + ".tmp", "w").write(json.dumps(cards))
        os.replace(path + ".tmp", path)
    write(True)
    report(device_count=len(seen), name=seen[0].get("name", "Fake GPU"), uuid=seen[0]["uuid"], holding=mib)
    time.sleep(hold)
    write(False)


def with_torch(torch):
    out["api"] = "torch " + torch.__version__
    n = torch.cuda.device_count()
    if mode == "count":
        return report(device_count=n)
    if n < 1:
        return report(device_count=n, error="torch sees no CUDA device")
    props = torch.cuda.get_device_properties(0)
    uuid = str(getattr(props, "uuid", "") or "")
    if uuid and not uuid.startswith("GPU-"):
        uuid = "GPU-" + uuid
    block = torch.empty(mib << 20, dtype=torch.uint8, device="cuda:0")
    block.fill_(1)
    torch.cuda.synchronize()
    report(device_count=n, name=props.name, uuid=uuid, holding=mib)
    time.sleep(hold)
    del block


def with_driver_api():
    out["api"] = "libcuda (ctypes)"
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]

    def check(result, what):
        if result != 0:
            name = ctypes.c_char_p()
            lib.cuGetErrorName(result, ctypes.byref(name))
            raise RuntimeError("%s failed: %d %s" % (what, result, (name.value or b"?").decode()))

    result = lib.cuInit(0)
    count = ctypes.c_int(0)
    if result == 100:  # CUDA_ERROR_NO_DEVICE: every device hidden
        pass
    else:
        check(result, "cuInit")
        check(lib.cuDeviceGetCount(ctypes.byref(count)), "cuDeviceGetCount")
    if mode == "count":
        return report(device_count=count.value, cuInit=result)
    if count.value < 1:
        return report(device_count=count.value, cuInit=result, error="CUDA sees no device")
    device = ctypes.c_int()
    check(lib.cuDeviceGet(ctypes.byref(device), 0), "cuDeviceGet")
    name = ctypes.create_string_buffer(256)
    check(lib.cuDeviceGetName(name, 256, device), "cuDeviceGetName")
    raw = (ctypes.c_ubyte * 16)()
    check(lib.cuDeviceGetUuid(raw, device), "cuDeviceGetUuid")
    h = bytes(raw).hex()
    uuid = "GPU-%s-%s-%s-%s-%s" % (h[:8], h[8:12], h[12:16], h[16:20], h[20:])
    context = ctypes.c_void_p()
    check(lib.cuDevicePrimaryCtxRetain(ctypes.byref(context), device), "cuDevicePrimaryCtxRetain")
    lib.cuCtxSetCurrent.argtypes = [ctypes.c_void_p]
    check(lib.cuCtxSetCurrent(context), "cuCtxSetCurrent")
    pointer = ctypes.c_uint64()
    size = ctypes.c_size_t(mib << 20)
    lib.cuMemAlloc_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t]
    check(lib.cuMemAlloc_v2(ctypes.byref(pointer), size), "cuMemAlloc")
    lib.cuMemsetD8_v2.argtypes = [ctypes.c_uint64, ctypes.c_ubyte, ctypes.c_size_t]
    check(lib.cuMemsetD8_v2(pointer, 1, size), "cuMemsetD8")
    check(lib.cuCtxSynchronize(), "cuCtxSynchronize")
    report(device_count=count.value, name=name.value.decode(), uuid=uuid, holding=mib)
    time.sleep(hold)
    lib.cuMemFree_v2.argtypes = [ctypes.c_uint64]
    check(lib.cuMemFree_v2(pointer), "cuMemFree")


try:
    if os.environ.get("GPU_CHECK_SIMULATE"):
        simulated(os.environ["GPU_CHECK_SIMULATE"])
    else:
        try:
            import torch
        except Exception:
            torch = None
        if torch is not None:
            with_torch(torch)
        else:
            with_driver_api()
except Exception as exc:
    report(error="%s: %s" % (type(exc).__name__, exc))
    sys.exit(3)
'''


class Child:
    """A child running CHILD, its RESULT lines collected by a thread."""

    def __init__(self, mode: str, env: dict[str, str], mib: int = 0, hold: float = 0.0) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, mode, str(mib), str(hold)], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.results: queue.Queue[dict[str, Any]] = queue.Queue()
        self.other: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("RESULT "):
                self.results.put(json.loads(line[7:]))
            else:
                self.other.append(line.rstrip())

    def result(self, timeout: float) -> dict[str, Any] | None:
        try:
            return self.results.get(timeout=timeout)
        except queue.Empty:
            return None

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return -9


class Check:
    def __init__(self) -> None:
        self.failures: list[str] = []

    def __call__(self, ok: bool, what: str) -> bool:
        print(f"  [{'ok' if ok else 'FAIL'}] {what}")
        if not ok:
            self.failures.append(what)
        return ok


def child_env(extra: dict[str, str] | None, simulate: str | None) -> dict[str, str]:
    """The parent's environment without its visible set, plus ``extra``."""
    env = dict(os.environ)
    for name in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):
        env.pop(name, None)
    env.update(extra or {})
    if simulate:
        env["GPU_CHECK_SIMULATE"] = simulate
    return env


def print_cards(pool: GpuPool, only: str | None = None, prefix: str = "  ") -> None:
    for card in pool.snapshot().cards:
        if only and card.uuid != only:
            continue
        util = "?" if card.utilisation is None else f"{card.utilisation}%"
        pids = ",".join(map(str, card.pids)) or "-"
        print(f"{prefix}GPU {card.index} {card.name} {card.uuid}: {card.slots} slots, "
              f"used {format_size(card.memory_used)} / {format_size(card.memory_total)}, util {util}, "
              f"ECC {card.ecc_errors}, {card.state}{' by ' + card.owner if card.owner else ''}, "
              f"compute PIDs {pids}")


def card_state(pool: GpuPool, uuid: str) -> Any:
    return next(c for c in pool.snapshot().cards if c.uuid == uuid)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256, help="memory the child allocates on its card")
    parser.add_argument("--hold", type=float, default=6.0, help="seconds the child holds it")
    parser.add_argument("--drain-wait", type=float, default=30.0,
                        help="seconds to wait for the card to come back after the child exits")
    parser.add_argument("--fake", metavar="FILE", help="fake GPU file (simulated CUDA; checks this script)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="  log %(levelname)s %(message)s")
    check = Check()
    simulate = str(Path(args.fake).resolve()) if args.fake else None

    visible = visible_from_environ(os.environ)
    backend = open_gpu_backend(False, simulate, visible)
    # A drain timeout far beyond the wait below: a card that comes back did so because its holder left.
    pool = GpuPool(backend, drain_timeout=max(120.0, 4 * args.drain_wait))
    print(f"backend {backend.kind}; visible set {visible!r}")
    if not pool.snapshot().cards:
        print(f"{pool.reason.replace('no GPUs: ', '', 1)}; nothing to check")
        return 0
    print("cards:")
    print_cards(pool)
    snap = pool.snapshot()
    print(f"free slots {snap.free_slots}")

    print("isolation (children counting the CUDA devices they see):")
    all_cards = len(snap.cards)
    for label, extra in (("unset", None), ('""', {"CUDA_VISIBLE_DEVICES": "", "NVIDIA_VISIBLE_DEVICES": ""}),
                         ("-1", {"CUDA_VISIBLE_DEVICES": "-1", "NVIDIA_VISIBLE_DEVICES": "-1"}),
                         ("hidden_environment()", hidden_environment())):
        child = Child("count", child_env(extra, simulate))
        result = child.result(120) or {"error": "no answer"}
        child.wait(10)
        count = result.get("device_count")
        detail = f"CUDA_VISIBLE_DEVICES {label}: sees {count} device(s) via {result.get('api')}" + (
            f" ({result['error']})" if result.get("error") else "")
        if label == "unset":
            # The runner's own visible set may be narrower than the machine: at least what NVML lists.
            check(isinstance(count, int) and count >= all_cards, detail)
        else:
            check(count == 0, detail)

    print("allocation:")
    demand = GpuDemand(slots=1, count=1)
    allocation = pool.allocate("gpu-check", demand)
    if not check(isinstance(allocation, Allocation), f"allocate {demand.describe()}: "
                 f"{allocation.describe() if isinstance(allocation, Allocation) else allocation.reason}"):
        return 1
    assert isinstance(allocation, Allocation)
    uuid = allocation.uuids[0]
    every = GpuDemand(slots=1, count=all_cards)
    check(not pool.fits_now(every), f"{every.describe()} do not fit while one is held: "
                                    f"{pool.fits_now(every).reason}")
    print(f"  child environment: {allocation.environment()}")
    pool.refresh()
    before = card_state(pool, uuid)
    child = Child("hold", child_env(allocation.environment(), simulate), args.mib, args.hold)
    answer = child.result(120)
    if answer is None or answer.get("error"):
        child.wait(10)
        check(False, f"child on {uuid}: {answer and answer.get('error') or 'no answer in 120 s'}")
        for line in child.other[-20:]:
            print(f"    child: {line}")
        return 1
    result = answer
    print(f"  child PID {result['pid']} via {result.get('api')}: {result.get('device_count')} device(s), "
          f"{result.get('name')} {result.get('uuid')}, holding {args.mib} MiB")
    check(result.get("device_count") == 1, "the child sees exactly one device")
    check(result.get("uuid") == uuid or not result.get("uuid"), f"it is the allocated card ({uuid})")
    if not result.get("uuid"):
        print("  (this torch does not report device UUIDs: compared names only)")
        check(result.get("name") == before.name, f"its name is the card's ({before.name})")

    print("  NVML while the child holds its memory:")
    peak_used = before.memory_used
    seen_pid = new_pid = False
    for _ in range(3):
        pool.refresh()
        state = card_state(pool, uuid)
        print_cards(pool, only=uuid, prefix="    ")
        peak_used = max(peak_used, state.memory_used)
        seen_pid |= result["pid"] in state.pids
        new_pid |= bool(set(state.pids) - set(before.pids))
        time.sleep(0.5)
    grew = peak_used - before.memory_used
    check(grew >= args.mib * 0.9 * 2**20, f"the card's used memory grew by {format_size(grew)} "
                                          f"(from {format_size(before.memory_used)})")
    if seen_pid:
        check(True, f"NVML lists the child's PID {result['pid']} on the card")
    else:
        check(new_pid, "NVML lists a new compute process on the card (not the child's PID: another PID "
                       "namespace?)" if new_pid else "NVML lists no new compute process on the card")

    print("draining:")
    pool.release("gpu-check", {result["pid"]})
    pool.refresh()
    state = card_state(pool, uuid)
    alive = child.proc.poll() is None
    if alive:
        check(state.state == "draining", f"released while the child holds memory: {state.state}")
    else:
        print("  (the child ended before the release: --hold is too short to check draining)")
    code = child.wait(args.hold + 60)
    exited = time.monotonic()
    check(code == 0, f"child exit status {code}")
    returned_after = None
    while time.monotonic() - exited < args.drain_wait:
        outcome = pool.refresh()
        if uuid in outcome.returned:
            check(uuid not in outcome.timed_out,
                  "the card came back because its holder left (not by timeout)")
            returned_after = time.monotonic() - exited
            break
        time.sleep(0.2)
    check(returned_after is not None, f"the card is back in the pool {returned_after or 0:.2f} s after the "
                                      "child exited" if returned_after is not None else
          f"the card is still {card_state(pool, uuid).state} {args.drain_wait:.0f} s after the child exited")
    print_cards(pool, only=uuid)
    pool.close()
    if check.failures:
        print(f"FAILED: {len(check.failures)} check(s): " + "; ".join(check.failures))
        return 1
    print("all GPU checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

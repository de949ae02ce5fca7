"""Artifact transfer benchmark: S3Store against raw boto3 on one moto server, and cached reuse.

    .venv/bin/python bench/artifacts.py [--size 1GiB] [--rounds 1] [--verbose] [--workdir DIR]

Prints upload and download throughput through ``S3Store`` and through boto3's own transfer manager
(``client.upload_file`` / ``client.download_file`` with a default ``TransferConfig``, on the same client, so
the ratio measures our wrapper: worker threads, the HEAD before a download, the temp file and rename) — target
ratio >= 0.9 — and the time to reuse a cached artifact through ``ArtifactCache`` (target < 1 s).

moto keeps objects in memory (a multipart upload briefly twice), so a 1 GiB run needs about 3 GiB of RAM and
3 GiB of disk under ``--workdir``. Both sides are limited by moto, not the network: moto copies the whole
object for every ranged GET, so downloads slow down with the object's size (about 11 MiB/s at 1 GiB on two
cores: the default run takes about 6 minutes; ``--size 256MiB`` about one). Figures compare the two sides of
one run; they say nothing about a real S3 deployment. Single measurements vary by +-30 % on a busy two-core
machine: use ``--rounds`` (best of N) for a steadier ratio. No assertions: it prints figures.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import trio
from boto3.s3.transfer import TransferConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from support.s3server import REGION, start_moto  # noqa: E402

from studio_runner.cache import ArtifactCache  # noqa: E402
from studio_runner.storage.s3 import S3Store  # noqa: E402

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
}


def parse_size(text: str) -> int:
    """``256MiB``, ``1GiB``, ``500mb``, ``1048576``: powers of 1024 for the ``i`` units, 1000 otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if match is None or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def make_source(path: Path, size: int) -> None:
    """Random bytes, written once per run (compressible data would flatter nobody, but be fair anyway)."""
    chunk = 16 * 1024 * 1024
    with open(path, "wb") as fh:
        left = size
        while left:
            n = min(chunk, left)
            fh.write(os.urandom(n))
            left -= n


def timed(fn, *args) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("1GiB"), help="artifact size (1GiB)")
    parser.add_argument("--rounds", type=int, default=1, help="measurements per side; the best counts (1)")
    parser.add_argument("--verbose", action="store_true", help="print every measurement")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory (a new temp dir)")
    args = parser.parse_args()
    size: int = args.size
    work = Path(tempfile.mkdtemp(prefix="bench-artifacts-", dir=args.workdir))
    server = start_moto(auth=False)
    try:
        run(server, work, size, args.rounds, args.verbose)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def run(server, work: Path, size: int, rounds: int, verbose: bool) -> None:  # type: ignore[no-untyped-def]
    mib = size / 2**20
    print(f"artifact {mib:.0f} MiB, moto at {server.endpoint}, {os.cpu_count()} cores, best of {rounds}")
    src = work / "source.bin"
    print(f"writing the source file... {timed(make_source, src, size):.1f} s")

    store = S3Store()
    creds = server.credentials
    client = store._client(server.endpoint, creds)  # same client for both sides: only the wrapper differs
    bucket = "bench"
    client.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
    ours_url = f"s3://{server.endpoint}/{bucket}/ours.bin"
    raw_cfg = TransferConfig()
    best: dict[str, float] = {}

    def record(name: str, seconds: float) -> None:
        best[name] = min(best.get(name, float("inf")), seconds)
        if verbose:
            print(f"  round {i + 1}  {name:9} {mib / seconds:8.1f} MiB/s")

    # Untimed warm-up: moto's first large object pays for growing the server's memory, which would
    # otherwise penalise whichever side goes first.
    client.upload_file(str(src), bucket, "warmup.bin", Config=raw_cfg)
    client.delete_object(Bucket=bucket, Key="warmup.bin")
    for i in range(rounds):
        sides = ["raw", "ours"] if i % 2 == 0 else ["ours", "raw"]
        for side in sides:
            dest = work / f"{side}.down"
            if side == "raw":
                record("raw up", timed(client.upload_file, str(src), bucket, "raw.bin", None, None, raw_cfg))
                record(
                    "raw down", timed(client.download_file, bucket, "raw.bin", str(dest), None, None, raw_cfg)
                )
                client.delete_object(Bucket=bucket, Key="raw.bin")
            else:
                record("ours up", timed(trio.run, store.put, src, ours_url, creds))
                record("ours down", timed(trio.run, store.get, ours_url, dest, creds))
                if i < rounds - 1:
                    client.delete_object(Bucket=bucket, Key="ours.bin")
            if dest.stat().st_size != size:
                raise SystemExit(f"{side}: downloaded {dest.stat().st_size} bytes, expected {size}")
            dest.unlink()

    for op in ("up", "down"):
        raw, ours = mib / best[f"raw {op}"], mib / best[f"ours {op}"]
        print(
            f"{op + 'load':9} raw boto3 {raw:8.1f} MiB/s   S3Store {ours:8.1f} MiB/s   ratio {ours / raw:.2f}"
            "   (target >= 0.90)"
        )

    cache = ArtifactCache(work / "cache", max_bytes=2 * size)
    miss = timed(trio.run, cache.fetch, store, ours_url, creds, work / "exp1.bin")
    hit = timed(trio.run, cache.fetch, store, ours_url, creds, work / "exp2.bin")
    assert (work / "exp2.bin").stat().st_size == size and cache.hits == 1
    print(f"cache    first fetch (miss) {miss:6.2f} s   reuse (hit) {hit * 1000:7.1f} ms   (target < 1 s)")


if __name__ == "__main__":
    main()

"""A million models: streamed saves and recoveries against the raw disk floor, an update cycle, one
model from a repository just opened, and Dask workers writing one compressed version.

    python bench/fleet.py [--models 1000000] [--slice 50000] [--dir DIR] [--dask-models 100000]
                          [--s3-models 20000] [--sweep] [--no-dask] [--no-s3] [--no-main]

The set is FFNN-48 models (19,972 bytes of float32 each: 20 GB for 10^6),
generated slice by slice (``--slice`` models, 1 GB by default) from a seed
per slice, so the generator holds one slice and never the set. Time spent
inside the generator is measured and subtracted from every streamed case
(mmpack's and the floors'), which time only what they do with the slices.

* **Baseline save, streamed** (``repo.save_stream``, local repository,
  ``fsync=False``) against the raw sequential write floor: the same slices'
  tensors written with ``ndarray.tofile`` one after another into one file,
  once before the save and once after it; the faster run is the floor (the
  disk's speed drifts over minutes).
* **Full recovery, streamed** (``repo.recover_stream``, every piece
  verified) against the raw read floor: that file read back with
  ``numpy.fromfile`` slice by slice, into fresh arrays as recovery does,
  before and after the recovery, the faster run counting. The
  page cache is emptied of both files first (``sync``, then
  ``POSIX_FADV_DONTNEED``), so both read from the disk: 20 GB do not stay
  cached in 24 GB.
* **Update cycle** touching 1 % of the models (every 100th, two tensors
  each: ``fc3.weight`` and ``fc3.bias``), streamed with
  ``approach="update"``: its time against the full save's, its stored bytes
  against the changed rows' bytes.
* **One model from a repository just opened**: ``Repository(path)`` then
  ``recover(vid, [k])``, median of 15 random models, header parse cache
  cleared each time; and the same on moto's S3 server (a separate process)
  with 20 ms injected per request, counting the requests, on a repository
  of ``--s3-models`` models with the same shard size (the count does not
  depend on the set's size, only the shard opened).
* **Dask**: ``--dask-models`` models written as one compressed version by a
  ``distributed.LocalCluster`` of one worker process, then of two (one
  thread each, mmpack's and torch's thread counts set to 1 in each worker),
  each task generating and writing its slice; wall times of the whole
  write and commit, medians of 3, and the tasks' CPU seconds over the wall
  time: the cores the workers actually got (fewer than two when other
  processes share the machine's two).
* ``--sweep``: the shard-size measurement behind the default (16 MiB to
  1 GiB shards on a set of ``--dask-models`` models).

Peak RSS is the process's VmHWM, reset before each case (``/proc/self/clear_refs``).
The files (about twice the set) are removed after each part; the script checks
first that the disk has room. Ratios compare figures of the same run.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
from _common import describe_machine, prime_memory, print_table

import mmpack
from mmpack import Repository, _native
from mmpack._options import Parser, positive_int
from mmpack.fileformat import header as header_module
from mmpack.workloads.synthetic import ARCHITECTURE, CHANGED, EVERY, make_slice, model, slices


def parse_args() -> argparse.Namespace:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=positive_int, default=1_000_000, help="models in the set (default 10^6)")
    parser.add_argument("--slice", type=positive_int, default=50_000, help="models per slice (default 50,000: 1 GB)")
    parser.add_argument("--dir", default=None, help="directory for the files (default: a temporary one)")
    parser.add_argument("--dask-models", type=positive_int, default=100_000, help="models of the Dask case")
    parser.add_argument("--s3-models", type=positive_int, default=20_000, help="models of the S3 case")
    parser.add_argument("--sweep", action="store_true", help="also measure shard sizes from 16 MiB to 1 GiB")
    parser.add_argument("--no-dask", action="store_true", help="skip the Dask case")
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 case (no moto or s3fs installed)")
    parser.add_argument("--no-main", action="store_true",
                        help="skip the streamed cases of --models (to measure the S3, Dask or sweep cases alone)")
    return parser.parse_args()


# -- measuring ------------------------------------------------------------------------------------


@dataclass
class Clock:
    """Seconds spent generating slices (subtracted from the streamed cases)."""

    generating: float = 0.0


def fleet(n: int, slice_models: int, clock: Clock, changed: bool = False):
    """The fleet's slices (``mmpack.workloads.synthetic``), the time spent making them added to ``clock``."""
    made = slices(n, slice_models, changed)
    while True:
        start = time.perf_counter()
        item = next(made, None)
        clock.generating += time.perf_counter() - start
        if item is None:
            return
        yield item
        del item


# -- measuring ------------------------------------------------------------------------------------


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


@dataclass
class Case:
    seconds: float  # generation excluded
    peak: int
    bytes: int
    generating: float = 0.0


def streamed(action, clock: Clock, data_bytes: int) -> Case:
    """Run ``action`` (which consumes a generator reporting to ``clock``), timing it minus generation."""
    os.sync()
    clock.generating = 0.0
    reset_peak()
    start = time.perf_counter()
    action()
    seconds = time.perf_counter() - start - clock.generating
    return Case(seconds, peak_rss(), data_bytes, clock.generating)


def uncached(*paths: str) -> None:
    """Flush and drop the page cache of these files (and the files under these directories)."""
    os.sync()
    for path in paths:
        files = [path] if os.path.isfile(path) else [os.path.join(d, n) for d, _, ns in os.walk(path) for n in ns]
        for name in files:
            fd = os.open(name, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def gb_s(case: Case) -> str:
    return f"{case.bytes / case.seconds / 1e9:.3f}"


def check_room(directory: str, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed * 1.1:
        sys.exit(f"{directory} has {free / 1e9:.1f} GB free; this run needs about {needed * 1.1 / 1e9:.1f} GB")


# -- the parts --------------------------------------------------------------------------------


def raw_write(path: str, n: int, slice_models: int, clock: Clock) -> None:
    with open(path, "wb") as f:
        for _, part in fleet(n, slice_models, clock):
            for spec in ARCHITECTURE.tensors:
                part.tensors[spec.name].numpy().tofile(f)
            del part


def raw_read(path: str, n: int, slice_models: int) -> None:
    with open(path, "rb") as f:
        for first in range(0, n, slice_models):
            count = min(slice_models, n - first)
            parts = [np.fromfile(f, dtype=np.uint8, count=count * s.nbytes) for s in ARCHITECTURE.tensors]
            if sum(p.nbytes for p in parts) != count * ARCHITECTURE.nbytes_per_model:
                raise RuntimeError("the floor's file is short")
            del parts


def stream_recover(repo: Repository, vid: str, slice_models: int) -> None:
    for _, part in repo.recover_stream(vid, slice_models):
        del part


def one_model_local(root: str, vid: str, n: int, runs: int = 15) -> float:
    """Median seconds to open the repository and recover one random model (every piece verified
    against its stored hash; ``main_set`` spot-checks the values elsewhere)."""
    times = []
    rng = random.Random(0)
    for _ in range(runs):
        k = rng.randrange(n)
        header_module._parse_header.cache_clear()
        start = time.perf_counter()
        with Repository(root, create=False) as repo:
            repo.recover(vid, [k])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main_set(args, directory: str) -> dict:
    n, slice_models = args.models, args.slice
    data = n * ARCHITECTURE.nbytes_per_model
    check_room(directory, 2 * data)
    clock = Clock()
    floor_path = os.path.join(directory, "floor.bin")
    root = os.path.join(directory, "repo")
    repo = Repository(root, fsync=False)
    results: dict = {}

    def write_floor() -> Case:
        return streamed(lambda: raw_write(floor_path, n, slice_models, clock), clock, data)

    def read_floor() -> Case:
        uncached(floor_path, os.path.join(root, "objects"))
        return streamed(lambda: raw_read(floor_path, n, slice_models), clock, data)

    # Each floor runs before and after its case and the faster run counts: this disk's speed drifts
    # over minutes, and a floor measured once, first, flattered the case (2.2x) in an earlier run.
    floors = [write_floor()]
    holder: dict = {}
    results["Baseline save, streamed"] = streamed(
        lambda: holder.setdefault("v1", repo.save_stream(fleet(n, slice_models, clock), message="the fleet")),
        clock, data)
    v1 = holder["v1"]
    floors.append(write_floor())
    results["raw write floor (ndarray.tofile)"] = min(floors, key=lambda c: c.seconds)
    results["_write floors"] = floors
    floors = [read_floor()]
    uncached(floor_path, os.path.join(root, "objects"))
    results["full recovery, streamed"] = streamed(lambda: stream_recover(repo, v1, slice_models), clock, data)
    floors.append(read_floor())
    results["raw read floor (numpy.fromfile)"] = min(floors, key=lambda c: c.seconds)
    results["_read floors"] = floors
    os.unlink(floor_path)
    for k in (0, n // 2 + 1, n - 1):  # spot check: the models recovered are the ones generated
        if not repo.recover(v1, [k]).equal(model(k, n, slice_models)):
            raise AssertionError(f"model {k} of {v1} is not the one generated")
    update = streamed(lambda: holder.setdefault("v2", repo.save_stream(
        fleet(n, slice_models, clock, changed=True), approach="update", base=v1, message="1 % of the fleet")),
        clock, data)
    v2 = holder["v2"]
    record = repo.version(v2)
    changed_rows = len(range(0, n, EVERY)) * sum(ARCHITECTURE.tensors[ARCHITECTURE.names.index(c)].nbytes
                                                 for c in CHANGED)
    if record.changes.n_pairs != len(range(0, n, EVERY)) * len(CHANGED):
        raise AssertionError(f"the update recorded {record.changes.n_pairs} changed pieces")
    results["update cycle, 1 % (streamed)"] = update
    for k in (0, EVERY * (n // EVERY // 2), n - 1):
        if not repo.recover(v2, [k]).equal(model(k, n, slice_models, changed=True)):
            raise AssertionError(f"model {k} of {v2} is not the one generated")
    results["_update"] = (record.stored_bytes, changed_rows, len(record.shards))
    results["_one_local"] = one_model_local(root, v2, n)
    results["_shards"] = len(repo.version(v1).shards)
    repo.close()
    shutil.rmtree(root)
    return results


def s3_one_model(args) -> tuple[float, float, dict] | None:
    try:
        import moto  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError:
        return None
    from store_latency import start_moto

    from mmpack.store import FsspecStore
    from mmpack.store.instrumented import instrument

    server, endpoint = start_moto()
    try:
        options = {"key": "bench", "secret": "bench", "client_kwargs": {"endpoint_url": endpoint,
                                                                        "region_name": "us-east-1"}}
        FsspecStore("s3://bench", options)._s3.call("create_bucket", Bucket="bench")
        repo = Repository("s3://bench/fleet", storage_options=options)
        vid = repo.save_stream(fleet(args.s3_models, args.slice, Clock()))
        shards = len(repo.version(vid).shards)
        requests, seconds = [], []
        rng = random.Random(1)
        for _ in range(5):
            store = FsspecStore("s3://bench/fleet", options)
            log = instrument(store, 0.020)
            header_module._parse_header.cache_clear()
            start = time.perf_counter()
            Repository(store=store, create=False).recover(vid, [rng.randrange(args.s3_models)])
            seconds.append(time.perf_counter() - start)
            requests.append(log.requests)
            kinds = dict(log.by_kind)
        return statistics.median(requests), statistics.median(seconds), {"kinds": kinds, "shards": shards}
    finally:
        server.kill()
        server.wait()


def _dask_worker_setup() -> None:
    _native.set_max_threads(1)
    torch.set_num_threads(1)


def _dask_write(handle, first: int, count: int):
    """A worker's task: make its slice and write it; the receipt and the CPU seconds the task took."""
    start = time.thread_time()
    receipt = handle.write(first, make_slice(first, count))
    return receipt, time.thread_time() - start


def dask_scaling(args, directory: str) -> dict | None:
    try:
        import distributed
    except ImportError:
        return None
    n, size = args.dask_models, max(1, args.dask_models // 10)
    check_room(directory, n * ARCHITECTURE.nbytes_per_model)
    walls: dict[int, list[float]] = {1: [], 2: []}
    busy: dict[int, list[float]] = {1: [], 2: []}  # CPU seconds of the tasks over the wall time: cores in use
    stored = 0
    for workers in (1, 2):
        with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                      dashboard_address=":0") as cluster, distributed.Client(cluster) as client:
            client.wait_for_workers(workers)
            client.run(_dask_worker_setup)
            for run in range(3):
                root = os.path.join(directory, f"dask-{workers}-{run}")
                repo = Repository(root, fsync=False, compression="zstd")
                os.sync()
                start = time.perf_counter()
                writer = repo.open_version()
                futures = [client.submit(_dask_write, writer.handle, a, min(size, n - a), pure=False)
                           for a in range(0, n, size)]
                done = client.gather(futures)
                vid = writer.commit([receipt for receipt, _ in done])
                walls[workers].append(time.perf_counter() - start)
                busy[workers].append(sum(cpu for _, cpu in done) / walls[workers][-1])
                stored = repo.storage_bytes(vid)
                if run == 0 and not repo.recover(vid, [n - 1]).equal(model(n - 1, n, size)):
                    raise AssertionError("the Dask version does not hold the generated models")
                repo.close()
                shutil.rmtree(root)
    return {"one": statistics.median(walls[1]), "two": statistics.median(walls[2]), "stored": stored,
            "raw": n * ARCHITECTURE.nbytes_per_model, "cores": {k: statistics.median(v) for k, v in busy.items()},
            "load": os.getloadavg()[0]}


def sweep(args, directory: str) -> list[list[str]]:
    n, slice_models = args.dask_models, args.slice
    data = n * ARCHITECTURE.nbytes_per_model
    check_room(directory, data)
    rows = []
    for mib in (16, 64, 256, 1024):
        clock = Clock()
        root = os.path.join(directory, f"sweep-{mib}")
        repo = Repository(root, fsync=False, shard_bytes=mib << 20)
        holder: dict = {}
        save = streamed(lambda r=repo, h=holder, c=clock: h.setdefault("v", r.save_stream(fleet(n, slice_models, c))),
                        clock, data)
        uncached(root)
        recover = streamed(lambda r=repo, h=holder: stream_recover(r, h["v"], slice_models), clock, data)
        one = one_model_local(root, holder["v"], n, runs=9)
        record = repo.version(holder["v"])
        tail = max(ARCHITECTURE.nbytes_per_model, 1)
        per_shard = min(n, (mib << 20) // tail)
        rows.append([f"{mib} MiB", str(len(record.shards)), gb_s(save), gb_s(recover), f"{one * 1e3:.2f}",
                     f"{per_shard * len(ARCHITECTURE) * 8 / 1e3:.0f}"])
        repo.close()
        shutil.rmtree(root)
    return rows


def main() -> None:
    args = parse_args()
    print(describe_machine())
    n = args.models
    print(f"{n:,} FFNN-48 models, {n * ARCHITECTURE.nbytes_per_model / 1e9:.1f} GB of float32, slices of "
          f"{args.slice:,} models ({args.slice * ARCHITECTURE.nbytes_per_model / 1e9:.2f} GB), shards of "
          f"{mmpack.repository.saving.DEFAULT_SHARD_BYTES >> 20} MiB\n")
    prime_memory()
    directory = args.dir or tempfile.mkdtemp(prefix="mmpack-fleet-")
    os.makedirs(directory, exist_ok=True)
    try:
        targets = []
        if not args.no_main:
            targets = report_main_set(args, directory)
        targets += other_cases(args, directory)
        print()
        for label, value, op, limit in targets:
            met = value >= limit if op == ">=" else value <= limit
            print(f"[{'met' if met else 'MISSED'}] {label}: {value:.3f}")
        if args.sweep:
            print(f"\nshard sizes, {args.dask_models:,} models:")
            print_table(["shard", "shards", "save GB/s", "recover GB/s", "1 model ms", "tail kB"],
                        sweep(args, directory))
    finally:
        if args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)


def report_main_set(args, directory: str) -> list:
    """The streamed cases of the set: print their table, return their targets."""
    results = main_set(args, directory)
    rows = []
    for name in ("raw write floor (ndarray.tofile)", "Baseline save, streamed", "raw read floor (numpy.fromfile)",
                 "full recovery, streamed", "update cycle, 1 % (streamed)"):
        case = results[name]
        rows.append([name, f"{case.seconds:.1f}", gb_s(case), f"{case.peak / 1e9:.2f}"])
    print_table(["case", "seconds", "GB/s", "peak RSS GB"], rows)
    save, write = results["Baseline save, streamed"], results["raw write floor (ndarray.tofile)"]
    recover, read = results["full recovery, streamed"], results["raw read floor (numpy.fromfile)"]
    update = results["update cycle, 1 % (streamed)"]
    stored, changed_rows, update_shards = results["_update"]
    print("floors, before and after their case (the faster counts): write " + ", ".join(
        f"{c.seconds:.1f} s" for c in results["_write floors"]) + "; read " + ", ".join(
        f"{c.seconds:.1f} s" for c in results["_read floors"]))
    print(f"\nshards of the full version: {results['_shards']}; of the update: {update_shards}")
    targets = [
        ("Baseline save, streamed >= 80 % of the raw write floor", write.seconds / save.seconds, ">=", 0.8),
        ("Baseline save peak RSS <= 2 GB", save.peak / 1e9, "<=", 2.0),
        ("full recovery, streamed >= 80 % of the raw read floor", read.seconds / recover.seconds, ">=", 0.8),
        ("full recovery peak RSS <= 2 GB", recover.peak / 1e9, "<=", 2.0),
        ("update cycle time <= 10 % of the full save's", update.seconds / save.seconds, "<=", 0.10),
        ("update stored <= 1.1 x its changed rows", stored / changed_rows, "<=", 1.1),
        ("one model, repository just opened, local <= 10 ms", results["_one_local"] * 1e3, "<=", 10.0),
    ]
    print(f"\nupdate cycle: stored {stored / 1e6:.2f} MB for {changed_rows / 1e6:.2f} MB of changed rows")
    print("generating the slices (excluded above): " + ", ".join(
        f"{name} {results[name].generating:.1f} s" for name in
        ("raw write floor (ndarray.tofile)", "Baseline save, streamed", "update cycle, 1 % (streamed)")))
    return targets


def other_cases(args, directory: str) -> list:
    """The S3 and Dask cases: print their figures, return their targets."""
    targets = []
    if not args.no_s3:
        found = s3_one_model(args)
        if found is None:
            print("S3 case skipped: moto or s3fs is not installed")
        else:
            requests, seconds, detail = found
            print(f"one model from an S3 repository just opened ({args.s3_models:,} models, {detail['shards']} "
                  f"shards, 20 ms per request): {requests:.0f} requests, {seconds * 1e3:.0f} ms; by kind "
                  f"{detail['kinds']}")
            targets.append(("one model on S3: <= 4 requests", requests, "<=", 4))
    if not args.no_dask:
        found = dask_scaling(args, directory)
        if found is None:
            print("Dask case skipped: distributed is not installed")
        else:
            print(f"one compressed version of {args.dask_models:,} models by Dask workers: 1 worker "
                  f"{found['one']:.1f} s, 2 workers {found['two']:.1f} s; stored/raw "
                  f"{found['stored'] / found['raw']:.3f}; the tasks' CPU time over the wall time (cores they "
                  f"got): {found['cores'][1]:.2f} and {found['cores'][2]:.2f}; load average after: "
                  f"{found['load']:.1f} on {os.cpu_count()} CPUs")
            targets.append(("2 Dask workers >= 1.6 x one worker", found["one"] / found["two"], ">=", 1.6))
    return targets


if __name__ == "__main__":
    sys.exit(main())

"""Requests and time per save and recovery on object storage, against one file per model.

    python bench/store_latency.py [--models 5000] [--runs 3] [--latency 0.020] [--subset 100] [--no-s3]

Three stores, each through ``mmpack.store.instrumented.instrument``, which
counts every request and makes it wait ``--latency`` seconds first:

* ``local+lat``: fsspec's local file system on a RAM disk (``/dev/shm``)
  behind the latency hook (20 ms per request by default). It has no
  conditional writes, so versions are published with claims (the
  fallback: 5 requests). (fsspec's ``memory://`` would do, but it copies a
  whole object on its first ranged read, which says nothing about a network.)
* ``s3``: moto's S3 server on 127.0.0.1 (a separate process), through s3fs,
  no injected latency: real HTTP, conditional PUTs.
* ``s3+lat``: the same server with the injected latency per HTTP request
  (concurrent requests wait concurrently, as on a network).

For each: saving a 5,000-model FFNN-48 version (baseline, then an update
of a 10 % U3 cycle), recovering one model from a repository just opened
(nothing cached: manifest, architecture and object header are fetched),
and recovering the whole version. Two floors per store, measured in the
same runs: one PUT of the bytes of a baseline object, and one 64-byte
ranged GET of it. (moto answers a ranged GET by copying the whole object
under a per-object lock, about 0.1 s for 100 MB on the development VM, so
the ranges of one object are served one after another: on moto the
floors, not the request counts, set the times.) Against the
one-file-per-model pattern
(``torch.save`` of each state dict, one PUT per model, one GET per model to
recover), measured on ``--subset`` models through the same hook and
extrapolated linearly to all models (the requests are sequential and
identical, so the cost per model is constant). Medians of ``--runs`` runs;
the ratios compare figures of the same runs. The network's bandwidth is
not modelled: moving 100 MB costs what the loopback or memory costs.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable

import torch
from _common import describe_machine, prime_memory, print_table

from mmpack import ModelSet, Repository
from mmpack.fileformat import encode
from mmpack.store import FsspecStore
from mmpack.store.instrumented import RequestLog, instrument
from mmpack.workloads import ffnn48, make_models, u3_cycle

TARGET_SAVE_S = 0.5
TARGET_RECOVER_ONE_S = 0.2


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per case; the median is reported")
    parser.add_argument("--latency", type=float, default=0.020, help="seconds injected per request")
    parser.add_argument("--subset", type=int, default=100, help="models measured for the one-file-per-model pattern")
    parser.add_argument("--no-s3", action="store_true", help="skip the moto server (no s3fs/moto installed)")
    return parser.parse_args()


class Measured:
    """Seconds and requests of one operation, over runs."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.requests: list[int] = []

    def add(self, log: RequestLog, action: Callable[[], object]) -> object:
        log.reset()
        start = time.perf_counter()
        result = action()
        self.seconds.append(time.perf_counter() - start)
        self.requests.append(log.requests)
        return result

    @property
    def s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def n(self) -> float:
        return statistics.median(self.requests)


def run_backend(name: str, make_store: Callable[[str], FsspecStore], latency: float, args, sets) -> dict[str, Measured]:
    ms, updated = sets
    one = [len(ms) // 3]
    per_file_models = make_models(ffnn48, args.subset, seed=7)
    scale = len(ms) / args.subset
    image = encode(ms).tobytes()  # the bytes of a baseline object: what the floors move
    cases = {k: Measured() for k in (
        "open", "save baseline", "save update", "recover 1 model", "recover 1 model (update)", "recover all",
        "floor: 1 PUT of the object", "floor: 1 ranged GET (64 B)",
        "per-file save", "per-file recover 1", "per-file recover all",
    )}
    for run in range(args.runs):
        root = f"bench-{uuid.uuid4().hex[:10]}"
        store = make_store(root)
        log = instrument(store, latency)
        writer = Repository(store=store)
        writer.save(ms.select([0]))  # untimed: the architecture record, written once per repository
        base = cases["save baseline"].add(log, lambda: writer.save(ms))
        newest = cases["save update"].add(log, lambda: writer.save(updated, approach="update", base=base))
        reader = cases["open"].add(log, lambda: Repository(store=store))
        got = cases["recover 1 model"].add(log, lambda: reader.recover(base, indices=one))
        check = cases["recover 1 model (update)"].add(log, lambda: reader.recover(newest, indices=one))
        everything = cases["recover all"].add(log, lambda: reader.recover(base))
        if run == 0 and not (got.equal(ms.select(one)) and check.equal(updated.select(one)) and everything.equal(ms)):
            raise AssertionError(f"{name}: recovery is not bit-exact")
        del everything
        cases["floor: 1 PUT of the object"].add(log, lambda: store.put("floor/blob", image))
        cases["floor: 1 ranged GET (64 B)"].add(log, lambda: store.get_range("floor/blob", len(image) // 2, 64))
        keys = [f"per-file/{i}.pt" for i in range(args.subset)]
        cases["per-file save"].add(log, lambda: _save_per_file(store, keys, per_file_models))
        cases["per-file recover 1"].add(log, lambda: torch.load(io.BytesIO(store.get(keys[0])), weights_only=True))
        cases["per-file recover all"].add(
            log, lambda: [torch.load(io.BytesIO(store.get(k)), weights_only=True) for k in keys]
        )
        writer.close()
        reader.close()
        getattr(store.fs, "_inner", store.fs).rm(store.root, recursive=True)  # free the server's memory
    for key in ("per-file save", "per-file recover all"):  # measured on a subset: scale to the whole set
        cases[key].seconds = [s * scale for s in cases[key].seconds]
        cases[key].requests = [int(r * scale) for r in cases[key].requests]
    return cases


def _save_per_file(store: FsspecStore, keys: list[str], models: list[torch.nn.Module]) -> None:
    for key, model in zip(keys, models):
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        store.put(key, buffer.getvalue())


def report(name: str, cases: dict[str, Measured], n_models: int, subset: int) -> None:
    print(f"\n== {name}")
    rows = [[case, f"{m.n:.0f}", f"{m.s * 1e3:.1f}", f"{min(m.seconds) * 1e3:.0f}-{max(m.seconds) * 1e3:.0f}"]
            for case, m in cases.items()]
    print_table(["operation", "requests", "ms (median)", "ms (min-max)"], rows)
    print(f"  per-file save / recover-all: measured on {subset} models, scaled x{n_models / subset:.0f}")
    ratio_save = cases["per-file save"].s / cases["save baseline"].s
    ratio_all = cases["per-file recover all"].s / cases["recover all"].s
    ratio_one = cases["per-file recover 1"].s / cases["recover 1 model"].s
    print(
        f"  one file per model / mmpack: save {ratio_save:.0f}x the time, "
        f"{cases['per-file save'].n / cases['save baseline'].n:.0f}x the requests; "
        f"recover all {ratio_all:.0f}x; recover 1 model {ratio_one:.2f}x"
    )
    put, get = cases["floor: 1 PUT of the object"].s, cases["floor: 1 ranged GET (64 B)"].s
    print(f"  mmpack / floor: save {cases['save baseline'].s / put:.2f}x one PUT of its object; "
          f"recover 1 model {cases['recover 1 model'].s / get:.1f}x one ranged GET of it")


def check_targets(name: str, cases: dict[str, Measured]) -> None:
    for label, value, limit in (
        (f"{name}: saving a version takes < {TARGET_SAVE_S} s", cases["save baseline"].s, TARGET_SAVE_S),
        (f"{name}: saving an update version takes < {TARGET_SAVE_S} s", cases["save update"].s, TARGET_SAVE_S),
        (
            f"{name}: recovering 1 model takes < {TARGET_RECOVER_ONE_S} s",
            cases["recover 1 model"].s,
            TARGET_RECOVER_ONE_S,
        ),
    ):
        print(f"  [{'met' if value < limit else 'MISSED'}] {label}: {value:.3f} s")


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(200):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return server, endpoint
        time.sleep(0.05)
    server.kill()
    raise RuntimeError("moto's server did not start")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    print(describe_machine())
    print(
        f"{args.models} FFNN-48 models, median of {args.runs} runs, "
        f"injected latency {args.latency * 1e3:.0f} ms per request"
    )
    prime_memory()
    ms = ModelSet.from_modules(make_models(ffnn48, args.models))
    updated = u3_cycle(ms, 0.10, seed=1)[0]
    results = {}
    with tempfile.TemporaryDirectory(
        prefix="mmpack-bench-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
    ) as ram:
        results["local+lat"] = run_backend(
            "local+lat", lambda root: FsspecStore(f"file://{ram}/{root}", {"auto_mkdir": True}), args.latency, args,
            (ms, updated),
        )
    if not args.no_s3:
        server, endpoint = start_moto()
        try:
            options = {
                "key": "bench",
                "secret": "bench",
                "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
            }
            FsspecStore("s3://bench", options)._s3.call("create_bucket", Bucket="bench")
            for name, latency in (("s3", 0.0), ("s3+lat", args.latency)):
                results[name] = run_backend(
                    name, lambda root: FsspecStore(f"s3://bench/{root}", options), latency, args, (ms, updated)
                )
        finally:
            server.kill()
            server.wait()
    for name, cases in results.items():
        report(name, cases, args.models, args.subset)
    print(f"\ntargets (issue 7, {args.latency * 1e3:.0f} ms injected per request; timings on a shared 2-core VM):")
    check_targets("local+lat", results["local+lat"])
    if "s3+lat" in results:
        check_targets("s3+lat", results["s3+lat"])


if __name__ == "__main__":
    sys.exit(main())

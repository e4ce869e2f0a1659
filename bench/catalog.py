"""The catalog of repository format 2 against format 1: opening, listing, history, requests, metadata.

    python bench/catalog.py [--models 5000] [--versions 10000] [--runs 5] [--latency 0.020] [--s3-runs 1]
                            [--no-s3] [--keep DIR]

Two repositories of each format are built with the same saves: one of 10
versions and one of ``--versions``, a Baseline of ``--models`` FFNN-48
models, then Update versions that each change one tensor (``fc4.weight``)
of 20 models. Then, side by side in one run (medians of ``--runs``):

* locally, a repository just opened (a new ``Repository``): listing every
  version (and, beside it, reading every field of every record listed, which
  checkpoints build on first read), finding the newest, one version by id and (format 2) by tag,
  the history of one model, and recovering one model of the newest version;
* the bytes one such Update version adds beyond its changed rows (the
  version's own objects and catalog entry), and what the catalog costs on top
  (checkpoints, cumulative commits and table objects, per version);
* on moto's S3 server with ``--latency`` injected per request, the requests
  and time to open the repository, list its versions and recover one model
  of the newest. The local repositories are copied there first; the format 2
  ones after a ``gc`` (which keeps the catalog's last two checkpoints).

Targets (issue 12): 10,000 versions list in at most 100 ms locally; the
history of one model over them in at most 100 ms; on S3, opening, listing
and recovering one model of the newest takes at most 12 requests; one such
version adds at most 16 KiB beyond its rows.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time

import numpy as np
from _common import describe_machine, prime_memory, print_table
from store_latency import start_moto

from mmpack import ModelSet, Repository
from mmpack.repository.catalog import create
from mmpack.store import FsspecStore, LocalStore
from mmpack.store.instrumented import instrument
from mmpack.workloads import ffnn48, make_models

CHANGED = 20


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=5000)
    parser.add_argument("--versions", type=int, default=10000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--latency", type=float, default=0.020)
    parser.add_argument("--s3-runs", type=int, default=1,
                        help="runs of each S3 case (format 1 over 10,000 versions takes minutes a run)")
    parser.add_argument("--no-s3", action="store_true")
    parser.add_argument("--dir", default=None, help="where to build (default: a temporary directory)")
    parser.add_argument("--keep", default=None, metavar="DIR",
                        help="build in DIR and keep it; a later run with the same sizes measures without rebuilding")
    return parser.parse_args()


def build(roots: dict[tuple[int, int], str], n_models: int, versions: list[int]) -> dict:
    """Save the same history into a repository of each (format, length); the rows one update holds.
    Repositories left complete by an earlier run (``--keep``) are taken as they are."""
    rng = np.random.default_rng(0)
    ms = ModelSet.from_modules(make_models(ffnn48, n_models))
    row = ms.architecture.tensors[ms.architecture.index("fc4.weight")].nbytes
    if all(os.path.isdir(root) and len(Repository(root, create=False).versions()) == length
           for (_, length), root in roots.items()):
        print("  (reusing the repositories of an earlier run)")
        return {"rows": CHANGED * row, "newest": None}
    repos = {}
    for (fmt, length), root in roots.items():
        create(LocalStore(root, fsync=False), fmt)
        repos[fmt, length] = Repository(root, fsync=False)
        repos[fmt, length].save(ms)
    tensors = {name: t.clone() for name, t in ms.tensors.items()}
    started = time.perf_counter()
    for step in range(2, max(versions) + 1):
        tensors["fc4.weight"][rng.choice(n_models, CHANGED, replace=False)] += 0.001
        current = ModelSet(ms.architecture, tensors)
        for (_, length), repo in repos.items():
            if step <= length:
                repo.save(current, approach="update", base=f"v{step - 1}")
        if step % 1000 == 0:
            print(f"  {step} versions saved in {time.perf_counter() - started:.0f} s", flush=True)
    return {"rows": CHANGED * row, "newest": current}


def median(action, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def read_every_field(root: str) -> list:
    """What ``mmpack log`` and a caller walking the whole history pay: a checkpoint's records build
    their objects, change lists and times on first read."""
    fields = ("id", "created", "message", "objects", "changes", "details")
    return [[getattr(record, name) for name in fields] for record in Repository(root).versions()]


def local_figures(root: str, length: int, runs: int, expected: ModelSet) -> dict[str, float]:
    newest = f"v{length}"
    opened = Repository(root)
    if opened.format_version >= 2 and "production" not in opened.tags():
        opened.tag("production", f"v{length // 2 + 1}")
    assert Repository(root).recover(newest, [17]).equal(expected.select([17]))
    figures = {
        "open + list": median(lambda: Repository(root).versions(), runs),
        "open + list, every field of every record read": median(lambda: read_every_field(root), runs),
        "open + newest": median(lambda: Repository(root).versions()[-1], runs),
        "open + one by id": median(lambda: Repository(root).version(f"v{length // 2}"), runs),
        "history of model 17": median(lambda: opened.history(17), runs),
        "open + recover one model of the newest": median(lambda: Repository(root).recover(newest, [17]), runs),
    }
    if opened.format_version >= 2:
        figures["open + one by tag"] = median(lambda: Repository(root).version("production"), runs)
    return figures


def metadata_figures(root: str, rows: int) -> dict[str, float]:
    repo = Repository(root)
    records = repo.versions()
    record = records[-1]
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
    data = sum(ref.bytes for r in records for ref in r.objects[:1])
    return {
        "one update beyond its rows (B)": record.stored_bytes - rows,
        "its object beyond its rows (B)": record.objects[0].bytes - rows,
        "catalog per version, amortized (B)": (total - data) / len(records),
    }


def s3_figures(local_root: str, url: str, options: dict, latency: float, runs: int, length: int,
               expected: ModelSet) -> tuple[float, int, dict]:
    """Copy the repository to S3, then time open + list + recover one model of the newest."""
    target = FsspecStore(url, options)
    target.fs.put(local_root.rstrip("/") + "/", target.root + "/", recursive=True)

    def once() -> tuple[float, int, dict]:
        store = FsspecStore(url, options)
        log = instrument(store, latency=latency)
        start = time.perf_counter()
        repo = Repository(store=store, create=False)
        repo.versions()
        got = repo.recover(f"v{length}", [17])
        seconds = time.perf_counter() - start
        assert got.equal(expected.select([17]))
        return seconds, log.requests, dict(log.by_kind)

    found = [once() for _ in range(runs)]
    return statistics.median(f[0] for f in found), found[-1][1], found[-1][2]


def main() -> int:
    args = arguments()
    print(describe_machine())
    prime_memory()
    lengths = sorted({10, args.versions})
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
    with contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory(
        prefix="mmpack-catalog-", dir=args.dir
    ) as directory:
        roots = {(fmt, n): os.path.join(directory, f"format{fmt}-{n}") for fmt in (1, 2) for n in lengths}
        print(f"building {args.versions} versions of {args.models} FFNN-48 models, each changing one tensor of "
              f"{CHANGED} models, in both formats")
        built = build(roots, args.models, lengths)
        # The newest set of each length: recovered from the format 2 repository, checked against format 1.
        newest = {n: Repository(roots[2, n]).recover(f"v{n}") for n in lengths}
        for n in lengths:
            assert Repository(roots[1, n]).recover(f"v{n}").equal(newest[n])
        assert built["newest"] is None or newest[args.versions].equal(built["newest"])
        rows = []
        local = {}
        for (fmt, n), root in sorted(roots.items()):
            local[fmt, n] = local_figures(root, n, args.runs, newest[n])
        for name in local[2, lengths[-1]]:
            rows.append([name] + [f"{local[fmt, n][name] * 1e3:.1f}" if name in local[fmt, n] else "-"
                                  for fmt in (1, 2) for n in lengths])
        headers = ["local, ms (median)"] + [f"format {fmt}, {n} versions" for fmt in (1, 2) for n in lengths]
        print()
        print_table(headers, rows)
        print()
        meta = {fmt: metadata_figures(roots[fmt, lengths[-1]], built["rows"]) for fmt in (1, 2)}
        print_table(["bytes, newest update", "format 1", "format 2"],
                    [[k, f"{meta[1][k]:.0f}", f"{meta[2][k]:.0f}"] for k in meta[2]])
        print(f"(the update's {CHANGED} changed rows: {built['rows']} B)")
        if not args.no_s3:
            for n in lengths:
                Repository(roots[2, n]).gc(grace_seconds=0)
            server, endpoint = start_moto()
            try:
                options = {"key": "bench", "secret": "bench",
                           "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
                FsspecStore("s3://bench", options)._s3.call("create_bucket", Bucket="bench")
                s3_rows = []
                for (fmt, n), root in sorted(roots.items()):
                    print(f"  copying format {fmt}, {n} versions to S3", flush=True)
                    seconds, requests, kinds = s3_figures(root, f"s3://bench/f{fmt}-{n}", options, args.latency,
                                                          args.s3_runs, n, newest[n])
                    s3_rows.append([f"format {fmt}", str(n), str(requests), f"{seconds:.2f}",
                                    ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))])
            finally:
                server.kill()
                server.wait()
            print(
                f"\nS3 (moto), {args.latency * 1e3:.0f} ms per request: open, list and recover one model of the newest"
            )
            print_table(["format", "versions", "requests", "seconds", "requests by kind"], s3_rows)
        n = lengths[-1]
        print("\ntargets:")
        print(f"  list {n} versions locally <= 100 ms: {local[2, n]['open + list'] * 1e3:.1f} ms "
              f"(format 1: {local[1, n]['open + list'] * 1e3:.1f} ms)")
        print(f"  history of one model over {n} versions <= 100 ms: {local[2, n]['history of model 17'] * 1e3:.1f} ms")
        print(f"  one update beyond its rows <= 16384 B: {meta[2]['one update beyond its rows (B)']:.0f} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Recovering the newest version of a long history saved with the default settings.

    python bench/long_history.py [--models 5000] [--versions 1000] [--runs 5] [--dir DIR]

A Baseline of ``--models`` FFNN-48 models, then Update versions, each
retraining 1 % of the models fully, saved into one repository with the
default settings (no snapshot policy: one chain of ``--versions`` versions).
At the end the newest set is saved once more as a Baseline, the floor a
recovery is compared with. The table gives, for the newest version of the
first 10, 100, ... versions of the history, the median time to recover it
whole and to recover one model, from a repository just opened (a new
``Repository``: every manifest of the chain is read) and warm (the same
``Repository`` again), beside the Baseline of the same models in the same
run; then the paper's recursive replay of the whole chain, once. The save
times of the history are printed as it is built (they grow with the history:
each save lists the versions and walks the chain).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
from _common import describe_machine, prime_memory, print_table, work_dir

from mmpack import ModelSet, Repository
from mmpack.workloads import ffnn48, make_models


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=5000)
    parser.add_argument("--versions", type=int, default=1000, help="versions in the history (default 1000)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", default=None)
    return parser.parse_args()


def build(directory: str, n_models: int, versions: int) -> tuple[ModelSet, dict[int, ModelSet]]:
    """The history; returns the newest set and the sets at the checkpoints (10, 100, ...)."""
    rng = np.random.default_rng(0)
    ms = ModelSet.from_modules(make_models(ffnn48, n_models))
    repo = Repository(directory, fsync=False)
    vid = repo.save(ms)
    checkpoints = {1: ms}
    tensors = {name: t.clone() for name, t in ms.tensors.items()}
    started, times = time.perf_counter(), []
    for step in range(2, versions + 1):
        retrained = rng.choice(n_models, max(1, n_models // 100), replace=False)
        for t in tensors.values():
            t[retrained] += 0.001
        ms = ModelSet(ms.architecture, tensors)
        start = time.perf_counter()
        vid = repo.save(ms, approach="update", base=vid)
        times.append(time.perf_counter() - start)
        if is_checkpoint(step) or step == versions:
            checkpoints[step] = ModelSet(ms.architecture, {n: t.clone() for n, t in tensors.items()})
            print(f"  {step:>6} versions saved in {time.perf_counter() - started:6.1f} s; "
                  f"last update saves: median {statistics.median(times[-50:]) * 1e3:.1f} ms", flush=True)
    assert vid == f"v{versions}"
    repo.save(ms, message="the newest set as a Baseline")
    return ms, checkpoints


def is_checkpoint(step: int) -> bool:
    return step >= 10 and str(step).rstrip("0") == "1"  # 10, 100, 1000...


def median(action, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    args = arguments()
    print(describe_machine())
    prime_memory()
    with work_dir(args.dir) as directory:
        root = os.path.join(directory, "history.repo")
        print(f"building {args.versions} versions of {args.models} FFNN-48 models (1 % retrained per version)")
        newest, checkpoints = build(root, args.models, args.versions)
        baseline = f"v{args.versions + 1}"
        warm = Repository(root)
        assert warm.recover(baseline).equal(newest)
        rows = []
        base_full = median(lambda: Repository(root).recover(baseline), args.runs)
        base_warm = median(lambda: warm.recover(baseline), args.runs)
        base_one = median(lambda: warm.recover(baseline, indices=[17]), args.runs)
        rows.append(["Baseline (floor)", "1", f"{base_full * 1e3:.1f}", f"{base_warm * 1e3:.1f}", "1.00x",
                     f"{base_one * 1e3:.2f}"])
        for step, expected in sorted(checkpoints.items()):
            if step == 1:
                continue
            vid = f"v{step}"
            assert Repository(root).recover(vid).equal(expected)
            assert warm.recover(vid, indices=[17, 3]).equal(expected.select([17, 3]))
            opened = median(lambda: Repository(root).recover(vid), args.runs)
            again = median(lambda: warm.recover(vid), args.runs)
            one = median(lambda: Repository(root).recover(vid, indices=[17]), args.runs)
            rows.append([f"Update, newest of {step}", str(step), f"{opened * 1e3:.1f}", f"{again * 1e3:.1f}",
                         f"{again / base_warm:.2f}x", f"{one * 1e3:.2f}"])
        print(f"\nrecovery of {args.models} models, medians of {args.runs} runs (ms)\n")
        print_table(["version", "chain", "just opened", "warm", "warm / Baseline", "one model, just opened"], rows)
        newest_id = f"v{args.versions}"
        start = time.perf_counter()
        assert Repository(root).recover(newest_id, strategy="recursive").equal(newest)
        recursive = time.perf_counter() - start
        print(f"\nrecursive replay of the {args.versions}-version chain (the paper's Update recovery), once: "
              f"{recursive:.2f} s")
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
        print(f"repository: {size / 1e6:.0f} MB for {args.versions + 1} versions")


if __name__ == "__main__":
    main()

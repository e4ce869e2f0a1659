"""Recover the newest version of an update chain, and a Baseline version, from a repository just opened.

    python bench/chain_recovery.py [--models 5000] [--updates 20] [--runs 9] [--dir DIR] [--against PYTHON ...]

Builds one repository of FFNN-48 models (fsync off): a Baseline version,
then ``--updates`` Update versions of the paper's U3 cycles (10 % of the
models retrained per cycle), each based on the previous one, so the newest
version's pieces come from every object of the chain. Then times, from a
``Repository`` opened for the run with the header parse cache cleared (what
a fresh process pays, less the imports):

* the newest version, whole;
* the Baseline version, whole (the same bytes from one object);
* one model of the newest version.

``--against`` names other interpreters with another mmpack installed (an
older build, say); each interpreter times in a worker process of its own,
and the workers take turns run by run, so every build sees the same
machine. The table gives medians and each build's ratio to this one's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = ("newest, whole", "baseline, whole", "newest, one model")


def build(directory: str, n_models: int, updates: int) -> None:
    import mmpack
    from mmpack.workloads import ffnn48, make_models, u3_cycle

    repo = mmpack.Repository(directory, fsync=False)
    ms = mmpack.ModelSet.from_modules(make_models(ffnn48, n_models))
    vid = repo.save(ms)
    for cycle in range(updates):
        ms = u3_cycle(ms, 0.10, seed=cycle + 1)[0]
        vid = repo.save(ms, approach="update", base=vid)


def worker(directory: str) -> None:
    """Answer each case name read from stdin with the seconds one run of it took."""
    import mmpack
    from mmpack.fileformat import header as header_module

    versions = [r.id for r in mmpack.Repository(directory).versions()]
    newest, baseline = versions[-1], versions[0]
    actions = {
        "newest, whole": lambda repo: repo.recover(newest),
        "baseline, whole": lambda repo: repo.recover(baseline),
        "newest, one model": lambda repo: repo.recover(newest, indices=[7]),
    }
    for line in sys.stdin:
        case = line.strip()
        header_module._parse_header.cache_clear()
        repo = mmpack.Repository(directory)
        start = time.perf_counter()
        actions[case](repo)
        seconds = time.perf_counter() - start
        repo.close()
        print(json.dumps(seconds), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=5000)
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--dir", default=None, help="repository directory (built if absent)")
    parser.add_argument("--against", nargs="*", default=[], help="other Python interpreters to compare")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker)
        return
    sys.path.insert(0, HERE)
    from _common import describe_machine, prime_memory, print_table, work_dir

    print(describe_machine())
    prime_memory()
    with work_dir(None) as scratch:
        directory = os.path.abspath(args.dir) if args.dir else os.path.join(scratch, "chain.repo")
        if not os.path.exists(directory):
            build(directory, args.models, args.updates)
        interpreters = [sys.executable, *args.against]
        workers = [
            subprocess.Popen([python, os.path.abspath(__file__), "--worker", directory], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd="/")
            for python in interpreters
        ]
        times = {(i, case): [] for i in range(len(workers)) for case in CASES}
        for run in range(args.runs + 1):  # the first round warms the page cache and is dropped
            for case in CASES:
                for i, process in enumerate(workers):
                    process.stdin.write(case + "\n")
                    process.stdin.flush()
                    seconds = json.loads(process.stdout.readline())
                    if run:
                        times[i, case].append(seconds)
        for process in workers:
            process.stdin.close()
            process.wait()
    print(f"{args.models} FFNN-48 models, a Baseline then {args.updates} updates (10 % U3 cycles); "
          f"median of {args.runs} runs, builds taking turns\n")
    medians = {key: statistics.median(values) for key, values in times.items()}
    rows = []
    for case in CASES:
        for i, python in enumerate(interpreters):
            name = "this build" if i == 0 else python
            rows.append(
                [f"{case} ({name})", f"{medians[i, case] * 1e3:.2f}", f"{medians[i, case] / medians[0, case]:.2f}"]
            )
    print_table(["recovery", "ms", "x this build"], rows)
    ratio = medians[0, "newest, whole"] / medians[0, "baseline, whole"]
    print(f"\nnewest version of the chain / Baseline version, this build: {ratio:.2f}")


if __name__ == "__main__":
    main()

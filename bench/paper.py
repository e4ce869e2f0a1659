"""The paper's workload: U1 (initial set) then U3 update cycles, per approach.

    python bench/paper.py [--arch ffnn48] [--models 5000] [--rate 0.10] [--cycles 20] [--runs 5]
                          [--variants] [--json out.json]

For each approach the whole sequence is saved into a fresh repository
``--runs`` times; storage is exact, time-to-save and time-to-recover are
medians over the runs. Time-to-recover is measured on a Repository opened
once per run that has recovered the version once before, as a service
holding it would be (manifests, headers and open data objects stay cached;
the OS page cache is warm, as it is right after saving), and also with a new
Repository object for the first recovery of each version ("fresh").
Update versions are recovered two ways by the same code:
bounded resolution (mmpack's) and the paper's recursive replay
(``strategy="recursive"``), so the staircase and its removal show side by
side. ``--variants`` adds update rates of 20 % and 30 % and FFNN-69.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch

from _common import describe_machine, print_table, prime_memory, work_dir

from mmpack import ModelSet, Repository
from mmpack.workloads import ffnn48, ffnn69, make_models, small_cnn, u3_cycle

ARCHITECTURES = {"ffnn48": ffnn48, "ffnn69": ffnn69, "cnn": small_cnn}
TTR_CHECKPOINTS = (1, 5, 10, 20)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="ffnn48")
    parser.add_argument("--models", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=0.10, help="fraction of models retrained per cycle")
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--variants", action="store_true", help="also rates 0.2, 0.3 and FFNN-69 (5 cycles each)")
    parser.add_argument("--json", default=None, help="write every figure to this JSON file")
    parser.add_argument("--dir", default=None)
    return parser.parse_args()


def workload(arch: str, n_models: int, rate: float, cycles: int) -> list[ModelSet]:
    """U1 then ``cycles`` U3 cycles: the model set after each step."""
    sets = [ModelSet.from_modules(make_models(ARCHITECTURES[arch], n_models, seed=0))]
    for cycle in range(1, cycles + 1):
        sets.append(u3_cycle(sets[-1], rate, seed=cycle)[0])
    return sets


def _timed(action):
    start = time.perf_counter()
    result = action()
    return result, time.perf_counter() - start


def run_approach(sets: list[ModelSet], approach: str, runs: int, directory: str) -> dict:
    """Save the sequence ``runs`` times; recover every version after each run."""
    steps = range(len(sets))
    saves, recovers, fresh, recursive, one_model = ([[] for _ in steps] for _ in range(5))
    one = [len(sets[0]) // 3]
    records = None
    for run in range(runs):
        path = os.path.join(directory, f"{approach}-{run}")
        repo = Repository(path, fsync=False)
        vid = None
        ids = []
        for step, ms in enumerate(sets):
            kind = "baseline" if step == 0 else approach
            vid, seconds = _timed(lambda: repo.save(ms, approach=kind, base=vid))
            saves[step].append(seconds)
            ids.append(vid)
        reader = Repository(path)
        for step, vid in enumerate(ids):
            fresh[step].append(_timed(lambda: Repository(path).recover(vid))[1])
            if run == 0 and not reader.recover(vid).equal(sets[step]):
                raise AssertionError(f"{approach}: {vid} did not recover bit-exactly")
            recovers[step].append(_timed(lambda: reader.recover(vid))[1])
            one_model[step].append(_timed(lambda: reader.recover(vid, indices=one))[1])
            if approach == "update" and step in (0, *TTR_CHECKPOINTS):
                recursive[step].append(_timed(lambda: reader.recover(vid, strategy="recursive"))[1])
        records = repo.versions()
    return {
        "approach": approach,
        "versions": [
            {
                "step": step,
                "stored_as": record.approach,
                "stored_bytes": record.stored_bytes,
                "save_ms": _median_ms(saves[step]),
                "recover_ms": _median_ms(recovers[step]),
                "recover_fresh_ms": _median_ms(fresh[step]),
                "recover_recursive_ms": _median_ms(recursive[step]) if recursive[step] else None,
                "recover_one_model_ms": _median_ms(one_model[step]),
            }
            for step, record in enumerate(records)
        ],
    }


def _median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1e3


def report(results: list[dict], title: str) -> None:
    print(f"\n== {title}")
    by = {r["approach"]: r["versions"] for r in results}
    full_bytes = by["baseline"][0]["stored_bytes"]
    rows = []
    for result in results:
        versions = result["versions"]
        u3 = versions[1:]
        rows.append([
            result["approach"],
            f"{versions[0]['stored_bytes'] / 1e6:.2f}",
            f"{statistics.median(v['stored_bytes'] for v in u3) / 1e6:.3f}",
            f"{statistics.median(v['stored_bytes'] for v in u3) / full_bytes:.2%}",
            f"{versions[0]['save_ms']:.1f}",
            f"{statistics.median(v['save_ms'] for v in u3):.1f}",
            f"{versions[-1]['recover_ms']:.1f}",
            f"{versions[-1]['recover_fresh_ms']:.1f}",
            f"{versions[-1]['recover_one_model_ms']:.2f}",
        ])
    print_table(
        ["approach", "U1 MB", "U3 MB (median)", "U3 / full", "U1 save ms", "U3 save ms", "newest recover ms",
         "  (fresh object)", "newest, 1 model ms"],
        rows,
    )
    update = by.get("update")
    if update:
        reference = baseline_recover_ms(by)
        print(f"\ntime to recover the newest version after k cycles (ms; a baseline version takes {reference:.1f}):")
        ks = [k for k in (0, *TTR_CHECKPOINTS) if k < len(update)]
        print_table(
            ["k", "baseline", "update (bounded)", "  (fresh object)", "update (recursive, paper)", "bounded / baseline"],
            [[str(k), f"{by['baseline'][k]['recover_ms']:.1f}", f"{update[k]['recover_ms']:.1f}",
              f"{update[k]['recover_fresh_ms']:.1f}", f"{update[k]['recover_recursive_ms']:.1f}",
              f"{update[k]['recover_ms'] / reference:.2f}"]
             for k in ks],
        )


def baseline_recover_ms(by: dict) -> float:
    """Time to recover a baseline version: the median over every version of the baseline run."""
    return statistics.median(v["recover_ms"] for v in by["baseline"])


def check_targets(results: list[dict], cycles: int) -> None:
    by = {r["approach"]: r["versions"] for r in results}
    full = by["baseline"][0]
    update = by["update"]
    print("\ntargets (issue 3):")
    _target("update version after one U3 cycle stores <= 9% of a baseline version",
            update[1]["stored_bytes"] / full["stored_bytes"], 0.09, "<=")
    if cycles >= 20:
        _target("recovering the newest of a 20-update chain <= 1.5x recovering a baseline version",
                update[20]["recover_ms"] / baseline_recover_ms(by), 1.5, "<=")
    newest = update[-1]
    _target("recovering 1 model of the newest version <= 5% of its full recovery",
            newest["recover_one_model_ms"] / newest["recover_ms"], 0.05, "<=")
    _target("update save of a U3 cycle <= baseline save of the same set",
            statistics.median(v["save_ms"] for v in update[1:]) / statistics.median(v["save_ms"] for v in by["baseline"][1:]),
            1.0, "<=")


def _target(name: str, value: float, limit: float, op: str) -> None:
    met = value <= limit if op == "<=" else value >= limit
    print(f"  [{'met' if met else 'MISSED'}] {name}: {value:.3f} (target {op} {limit})")


def main() -> None:
    args = parse_args()
    print(describe_machine())
    prime_memory()
    scenarios = [(args.arch, args.rate, args.cycles)]
    if args.variants:
        scenarios += [(args.arch, 0.2, 5), (args.arch, 0.3, 5), ("ffnn69", args.rate, 5)]
    everything = []
    with work_dir(args.dir) as directory:
        for arch, rate, cycles in scenarios:
            sets = workload(arch, args.models, rate, cycles)
            title = f"{arch}, {args.models} models, update rate {rate:.0%}, {cycles} cycles, median of {args.runs} runs"
            results = []
            for approach in ("baseline", "update"):
                scenario_dir = os.path.join(directory, f"{arch}-{rate}-{cycles}")
                os.makedirs(scenario_dir, exist_ok=True)
                results.append(run_approach(sets, approach, args.runs, scenario_dir))
            report(results, title)
            if (arch, rate, cycles) == scenarios[0]:
                check_targets(results, cycles)
            everything.append({"arch": arch, "models": args.models, "rate": rate, "cycles": cycles, "results": results})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": describe_machine(), "scenarios": everything}, f, indent=1)


if __name__ == "__main__":
    torch.set_num_threads(1)
    np.seterr(all="ignore")
    main()

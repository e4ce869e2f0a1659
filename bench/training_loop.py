"""A vmapped training loop that checkpoints every epoch: what a checkpoint costs the loop.

    python bench/training_loop.py [--models 5000] [--runs 5] [--dir DIR] [--threads N]

A fleet of FFNN-48 models is trained with ``torch.func`` (``vmap(grad(loss))``
over stacked parameters, SGD in place; ``mmpack.workloads.fleet``) and
checkpointed after every epoch into a fresh repository per case:

* no checkpoint (the loop alone);
* ``repo.save(approach="update", base=previous)``, blocking;
* the same with ``blocking=False`` (the loop pays for the staging copy);
* ``repo.save(blocking=False)`` of full versions;
* the peer: ``torch.save`` of the stacked state dict, blocking.

For each: the epoch's wall time (training plus the checkpoint call) and the
stall, the time the checkpoint call itself keeps the loop waiting, against
the floor: a plain memcpy of the set's bytes into memory already touched
(what the staging copy into its reused buffers does, without the hashing).
The background work of non-blocking saves competes with training for the
same cores, which the epoch times show (``--threads`` sets torch's threads
for training, default torch's own); when a save takes longer than an epoch
the queue fills (``max_pending_saves=2``) and the loop waits for a place,
which the stall then includes: "full queue" counts those epochs. Each case
runs ``runs`` epochs after one untimed warm-up epoch; medians.

Then recovery of the newest checkpoint into the loop's tensors
(``recover(vid, out=fleet)``) against allocating a fresh set
(``recover(vid)``), on a warm repository and on one just opened, and
without checking hashes (what the checks cost); the peer: ``torch.load`` of
the state dict (no checksums), and ``torch.load`` then ``copy_`` into the
loop's tensors. Page cache warm, rounds interleaved, medians.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import numpy as np
import torch
from _common import describe_machine, interleaved_medians, parse_args, prime_memory, print_table, work_dir

import mmpack
from mmpack import packing
from mmpack.repository import background
from mmpack.workloads.fleet import Fleet


def main() -> None:
    argv = sys.argv[1:]
    if "--threads" in argv:
        at = argv.index("--threads")
        torch.set_num_threads(int(argv[at + 1]))
        del argv[at : at + 2]
    args = parse_args(__doc__.splitlines()[0], argv=argv)
    print(describe_machine())
    print(f"torch threads: {torch.get_num_threads()}")
    prime_memory()
    fleet = Fleet(args.models)
    ms = fleet.modelset()
    runs = args.runs
    print(f"{args.models} FFNN-48 models, {ms.nbytes / 1e6:.1f} MB of parameters, {fleet.samples} samples per model "
          f"and epoch, median of {runs} epochs per case\n")
    fleet.train_epoch(0)

    source = np.concatenate([packing.byte_view(t) for t in ms.tensors.values()])
    warm = np.ones_like(source)
    pool = background.StagingPool(1)

    def stage():
        background.stage(ms, pool).release()

    stage()
    floors = interleaved_medians({"memcpy": lambda: np.copyto(warm, source), "staging": stage,
                                  "hash": ms.hashes}, max(runs, 7))
    memcpy = floors["memcpy"]

    with work_dir(args.dir) as directory:
        cases = {
            "no checkpoint": None,
            "update, blocking": ("update", True),
            "update, blocking=False": ("update", False),
            "full version, blocking=False": ("baseline", False),
            "torch.save of the stacked state dict": "torch",
        }
        rows, newest = [], None
        for k, (name, how) in enumerate(cases.items()):
            epoch_times, stalls, drain, full = _run_case(fleet, ms, how, os.path.join(directory, f"case{k}"), runs)
            if how == ("update", False):
                newest = os.path.join(directory, f"case{k}")
            stall = statistics.median(stalls) if stalls else 0.0
            rows.append([
                name, f"{statistics.median(epoch_times) * 1e3:.0f}", f"{stall * 1e3:.1f}" if stalls else "-",
                f"{stall / memcpy:.2f}" if stalls else "-", f"{drain * 1e3:.0f}" if drain is not None else "-",
                str(full) if drain is not None else "-",
            ])
        print_table(["checkpoint every epoch", "epoch ms", "stall ms", "stall / memcpy", "drain ms", "full queue"],
                    rows)
        print(f"\nfloor: memcpy of {ms.nbytes / 1e6:.1f} MB into a warm buffer (numpy.copyto) {memcpy * 1e3:.1f} ms; "
              f"the staging copy alone (background.stage into its reused buffers) {floors['staging'] * 1e3:.1f} ms "
              f"({floors['staging'] / memcpy:.2f}x); hashing the set, which the worker does, "
              f"{floors['hash'] * 1e3:.1f} ms. 'drain': waiting for the pending saves at the end.\n")
        _recovery(fleet, ms, newest, directory, runs)


def _run_case(fleet: Fleet, ms, how, path: str, runs: int):
    epoch_times, stalls, drain, full = [], [], None, 0
    repo = mmpack.Repository(path) if isinstance(how, tuple) else None
    previous = None
    for epoch in range(runs + 1):
        start = time.perf_counter()
        fleet.train_epoch(epoch)
        called = time.perf_counter()
        if isinstance(how, tuple):
            approach, blocking = how
            base = previous if approach == "update" else None
            if epoch and repo._saver.pending >= 2:  # max_pending_saves: this call waits for a place
                full += 1
            previous = repo.save(ms, approach=approach, base=base, blocking=blocking)
        elif how == "torch":
            os.makedirs(path, exist_ok=True)
            torch.save({**fleet.params, **fleet.buffers}, os.path.join(path, f"epoch{epoch}.pt"))
        end = time.perf_counter()
        if epoch:  # the first epoch warms up (staging buffers, caches)
            epoch_times.append(end - start)
            if how is not None:
                stalls.append(end - called)
    if repo is not None:
        start = time.perf_counter()
        repo.close()
        drain = time.perf_counter() - start
    return epoch_times, stalls, drain, full


def _recovery(fleet: Fleet, ms, path: str, directory: str, runs: int) -> None:
    repo = mmpack.Repository(path)
    vid = repo.versions()[-1].id
    expected = repo.recover(vid)
    peer = os.path.join(directory, "peer.pt")
    torch.save({n: t.clone() for n, t in expected.tensors.items()}, peer)
    targets = {**fleet.params, **fleet.buffers}

    def torch_into():
        loaded = torch.load(peer, weights_only=True)
        with torch.no_grad():
            for name, t in targets.items():
                t.copy_(loaded[name])

    cases = {
        "recover(vid), warm repository": lambda: repo.recover(vid),
        "recover(vid, out=fleet), warm repository": lambda: repo.recover(vid, out=ms),
        "recover(vid, out=fleet, verify=False), warm": lambda: repo.recover(vid, out=ms, verify=False),
        "Repository(path).recover(vid), just opened": lambda: mmpack.Repository(path).recover(vid),
        "Repository(path).recover(vid, out=fleet), just opened": lambda: mmpack.Repository(path).recover(vid, out=ms),
        "torch.load(state dict)": lambda: torch.load(peer, weights_only=True),
        "torch.load(state dict) + copy_ into the loop's tensors": torch_into,
    }
    medians = interleaved_medians(cases, max(runs, 5))
    assert ms.equal(expected)
    floor = medians["recover(vid, out=fleet), warm repository"]
    rows = [[name, f"{seconds * 1e3:.1f}", f"{seconds / floor:.2f}"] for name, seconds in medians.items()]
    print_table(["recover the newest checkpoint", "ms", "vs recover(out=), warm"], rows)
    repo.close()


if __name__ == "__main__":
    main()

"""Subprocess side of the tests that kill a process with saves pending (test_background_saves.py,
test_checkpointer.py).

    python training_driver.py pending DIR N        submit N non-blocking saves of pending_values(0..N-1)
                                                    into DIR (a baseline, then updates, each on the
                                                    pending one before), the first awaited, on a store
                                                    whose object writes are slow; print 'submitted K'
                                                    per save, then SIGKILL this process with saves pending
    python training_driver.py train DIR EPOCHS KILL
                                                    train a Fleet of FLEET models with a Checkpointer
                                                    (keep_last=3) into DIR on that slow store; print
                                                    'epoch E DIGEST' after each epoch's step (DIGEST:
                                                    digest() of the values that epoch submitted), and
                                                    SIGKILL this process right after epoch KILL's step
"""

from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np
import torch

import mmpack
from mmpack import ModelSet, _native
from mmpack.store import local
from mmpack.workloads import ffnn48, make_models
from mmpack.workloads.fleet import Fleet

FLEET = 24
_WRITE_DELAY = 0.4  # seconds before each object write: a save takes long enough to be caught pending


class SlowStore(local.LocalStore):
    def put(self, key, data):
        if key.startswith("objects/"):
            time.sleep(_WRITE_DELAY)
        super().put(key, data)


def pending_values(k: int) -> ModelSet:
    """The set submitted as save ``k``: a fixed fleet, rows 4i..4i+3 bumped for every step i <= k."""
    base = ModelSet.from_modules(make_models(ffnn48, 40, 3))
    tensors = {n: t.clone() for n, t in base.tensors.items()}
    for step in range(1, k + 1):
        for t in tensors.values():
            t[4 * step : 4 * step + 4] += 1.0
    return ModelSet(base.architecture, tensors)


def digest(ms: ModelSet) -> int:
    """One number for a set's values: the XXH3-64 of its hash table."""
    return _native.xxh3_64(np.ascontiguousarray(ms.hashes()).tobytes())


def pending(directory: str, count: int) -> None:
    repo = mmpack.Repository(store=SlowStore(directory), max_pending_saves=count)
    ms = pending_values(0)
    previous = None
    for k in range(count):
        approach = "baseline" if previous is None else "update"
        previous = repo.save(ms, approach=approach, base=previous, message=f"save {k}", blocking=False)
        print(f"submitted {k}", flush=True)
        if k == 0:
            previous.result()  # one complete version at least
        with torch.no_grad():
            for t in ms.tensors.values():
                t[4 * (k + 1) : 4 * (k + 1) + 4] += 1.0  # in place, while the save may be pending
    os.kill(os.getpid(), signal.SIGKILL)


def train(directory: str, epochs: int, kill_at: int) -> None:
    fleet = Fleet(FLEET)
    ms = fleet.modelset()
    ckpt = mmpack.Checkpointer(mmpack.Repository(store=SlowStore(directory), max_pending_saves=4),
                               keep_last=3, gc_grace_seconds=0)
    start = ckpt.resume(out=ms)
    for epoch in range(start, epochs):
        fleet.train_epoch(epoch)
        ckpt.step(epoch, ms)
        print(f"epoch {epoch} {digest(ms)}", flush=True)
        if epoch == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    ckpt.close()


if __name__ == "__main__":
    torch.set_num_threads(1)
    command, *args = sys.argv[1:]
    if command == "pending":
        pending(args[0], int(args[1]))
    elif command == "train":
        train(args[0], int(args[1]), int(args[2]))
    else:
        raise SystemExit(f"unknown command {command!r}")

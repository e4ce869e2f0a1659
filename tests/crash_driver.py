"""Subprocess side of the crash and concurrency tests (run by test_repository_processes.py).

    python crash_driver.py crash DIR PUTS PHASE   save v1 (baseline) then v2 (update) into DIR, SIGKILLing
                                                  this process at store write number PUTS, PHASE being
                                                  'before' (nothing written), 'during' (half the bytes in
                                                  the temporary file) or 'after' (published, not returned)
    python crash_driver.py save DIR SEED COUNT    save COUNT versions of the models made from SEED: a
                                                  baseline, then updates on it, then one update on v1;
                                                  print one 'vid seed step' line per version
"""

from __future__ import annotations

import os
import signal
import sys

import torch

import mmpack
from mmpack import _io
from mmpack.workloads import ffnn48, make_models
from mmpack.store import local

torch.set_num_threads(1)


def models_for(seed: int, step: int) -> mmpack.ModelSet:
    """Deterministic models: seed picks the set, step perturbs a seed-dependent tenth of it."""
    base = mmpack.ModelSet.from_modules(make_models(ffnn48, 40, seed))
    tensors = {n: t.clone() for n, t in base.tensors.items()}
    for name, t in tensors.items():
        t[(seed + step) % 40 :: 10] += 0.5 * step
    return mmpack.ModelSet(base.architecture, tensors)


def crash(directory: str, kill_at: int, phase: str) -> None:
    calls = 0
    publish = _io.publish_atomically

    def dying_publish(path, write, **kwargs):
        nonlocal calls
        calls += 1
        if calls != kill_at:
            return publish(path, write, **kwargs)
        if phase == "before":
            os.kill(os.getpid(), signal.SIGKILL)

        def half_then_die(f):
            if phase == "during":
                write(_Half(f))
                os.kill(os.getpid(), signal.SIGKILL)
            write(f)

        publish(path, half_then_die, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)  # phase "after": published, the caller never learns it

    local._io = _PatchedIO(dying_publish)
    repo = mmpack.Repository(directory)
    v1 = repo.save(models_for(0, 0))
    repo.save(models_for(0, 1), approach="update", base=v1)


class _Half:
    """A file that accepts the first half of what is written to it, then stops the process."""

    def __init__(self, f):
        self._f = f
        self._written = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self._written > 0:
            os.kill(os.getpid(), signal.SIGKILL)
        self._f.write(view[: max(1, len(view) // 2)])
        self._f.flush()
        self._written += 1
        return len(view)


class _PatchedIO:
    def __init__(self, publish):
        self.publish_atomically = publish

    def __getattr__(self, name):
        return getattr(_io, name)


def save(directory: str, seed: int, count: int) -> None:
    repo = mmpack.Repository(directory)
    vid = repo.save(models_for(seed, 0))
    print(vid, seed, 0, flush=True)
    for step in range(1, count - 1):
        vid = repo.save(models_for(seed, step), approach="update", base=vid)
        print(vid, seed, step, flush=True)
    shared = repo.save(models_for(seed, count), approach="update", base="v1")
    print(shared, seed, count, flush=True)


if __name__ == "__main__":
    command, directory, *rest = sys.argv[1:]
    if command == "crash":
        crash(directory, int(rest[0]), rest[1])
    else:
        save(directory, int(rest[0]), int(rest[1]))

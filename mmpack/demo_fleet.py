"""``mmpack demo --fleet``: a million-model version saved, updated and partly recovered, with progress.

The fleet is synthetic (``mmpack.workloads.synthetic``: trained weights would take
hours to make and are stored the same way). Its 20 GB are never in memory: the
version is saved from slices, an update cycle retrains one layer of 1 % of the
models and is saved as a stream that writes only their rows, and a few models,
a slice and a lazily read set are recovered from the repository just opened,
each checked bit for bit against the models as they were made.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable

from mmpack._progress import progress, step
from mmpack.evaluation.timing import print_table, timed
from mmpack.repository import Repository
from mmpack.workloads import synthetic as fleet

FLEET_MODELS = 1_000_000
SLICE_MODELS = 50_000


def run_fleet_demo(models: int = FLEET_MODELS, directory: str | None = None, slice_models: int = SLICE_MODELS,
                   say: Callable[[str], None] = print) -> bool:
    """run_fleet_demo(models=1_000_000, directory=None, slice_models=50_000) -> all checks passed

    Example::

        ok = run_fleet_demo(models=20_000, directory="fleet-demo", slice_models=5_000)
    """
    from mmpack.demo import new_directory

    started = time.perf_counter()
    size = models * fleet.ARCHITECTURE.nbytes_per_model
    root = new_directory(directory)
    free = shutil.disk_usage(root).free
    if free < size * 1.1:
        raise OSError(28, f"the fleet demo writes {size * 1.1 / 1e9:.1f} GB into {os.path.abspath(root)}, which has "
                          f"{free / 1e9:.1f} GB free: pass --models to write fewer")
    n_slices = -(-models // slice_models)
    say(f"mmpack demo --fleet: {models:,} FFNN-48 models ({size / 1e9:.1f} GB of float32) in slices of "
        f"{slice_models:,}, in {os.path.abspath(root)}")
    path = os.path.join(root, "fleet")
    repo = Repository(path, fsync=False)
    rows = []

    stream = progress(fleet.slices(models, slice_models), "saving the fleet, slice", n_slices)
    v1, seconds = timed(lambda: repo.save_stream(stream, message="the whole fleet"))
    record = repo.version(v1)
    rows.append(["save the fleet (Baseline, streamed)", f"{seconds:.1f}", _bytes(record.stored_bytes),
                 f"{len(record.shards)} shards"])

    stream = progress(fleet.slices(models, slice_models, changed=True), "saving the update cycle, slice", n_slices)
    v2, seconds = timed(lambda: repo.save_stream(stream, approach="update", base=v1, message="1 % retrained"))
    record = repo.version(v2)
    rows.append([f"save an update of {len(record.changes.models):,} models (fc3, streamed)", f"{seconds:.1f}",
                 _bytes(record.stored_bytes), f"{len(record.shards)} shards"])

    step("recovering from the repository just opened")
    changed = fleet.changed_models(models)
    few = sorted({0, int(changed[len(changed) // 2]), min(int(changed[-1]) + 1, models - 1), models - 1})
    reader = Repository(path, create=False)
    got, seconds = timed(lambda: reader.recover(v2, few))
    checks = [got.select([k]).equal(_made(m, models, slice_models)) for k, m in enumerate(few)]
    plan = reader.plan(v2, few)
    shards = len({(r.version, r.object) for r in plan.reads})
    rows.append([f"recover {len(few)} models (just opened)", f"{seconds * 1e3:.0f} ms", "",
                 f"{plan.pieces} pieces from {shards} shards"])
    first = (models // 2) - (models // 2) % slice_models
    count = min(slice_models, models - first)
    part, seconds = timed(lambda: reader.recover(v2, range(first, first + count)))
    checks.append(part.equal(fleet.make_slice(first, count, changed=True)))
    rows.append([f"recover models {first:,} to {first + count - 1:,}", f"{seconds:.1f}", _bytes(part.nbytes), ""])
    lazy = reader.recover_lazy(v2)
    picked, seconds = timed(lambda: lazy.select([models - 1, 0]))
    checks.append(picked.select([0]).equal(_made(models - 1, models, slice_models))
                  and picked.select([1]).equal(_made(0, models, slice_models)) and lazy.loaded == ())
    rows.append(["recover_lazy, then select 2 models", f"{seconds * 1e3:.0f} ms", "", "nothing else read"])
    reader.close()
    repo.close()
    say("")
    print_table(["step", "seconds", "stored / read", "note"], rows)
    ok = all(checks)
    say(f"\nrecovered models verified bit-exact against the models made: {ok}; demo finished in "
        f"{time.perf_counter() - started:.0f} s; the repository ({_bytes(_du(path))}) is left in "
        f"{os.path.abspath(path)} (mmpack log {path})")
    return ok


def _made(k: int, models: int, slice_models: int):
    """Model ``k`` of the updated fleet, as it was made."""
    return fleet.model(k, models, slice_models, changed=k % fleet.EVERY == 0)


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(path) for n in names)


def _bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


__all__ = ["run_fleet_demo"]

"""The end-to-end demo (``mmpack demo``): a battery pack's cell models through update cycles.

Generates battery data for N cells, trains their models (vmapped, one step
for all cells), then runs K update cycles in which 5 % of the cells are fully
and 5 % partially retrained on aged data. Every version is saved with each
approach into its own embedded repository, and with the one-file-per-model
pattern of existing managers as the reference. The newest version and a few
single models are then recovered with each approach and checked bit for bit.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mmpack._progress import step
from mmpack.evaluation.per_model import load_per_model, save_per_model
from mmpack.evaluation.timing import prime_memory, print_table, timed
from mmpack.repository import Repository
from mmpack.workloads.battery import BatteryFleet

APPROACHES = ("baseline", "update", "provenance")


@dataclass
class ApproachFigures:
    """What the demo measured for one approach."""

    stored_bytes: list[int] = field(default_factory=list)
    save_seconds: list[float] = field(default_factory=list)
    recover_seconds: float = 0.0
    recover_one_seconds: float = 0.0
    verified: bool = False


def new_directory(path: str | None) -> str:
    """``path`` if given (must not exist yet), else ``./mmpack-demo``, ``./mmpack-demo-2``..."""
    if path is not None:
        if os.path.exists(path) and os.listdir(path):
            raise FileExistsError(f"{path} exists and is not empty; the demo writes into a new directory")
        os.makedirs(path, exist_ok=True)
        return path
    candidate, n = "mmpack-demo", 1
    while os.path.exists(candidate):
        n += 1
        candidate = f"mmpack-demo-{n}"
    os.makedirs(candidate)
    return candidate


def run_demo(models: int = 5000, cycles: int = 3, directory: str | None = None,
             say: Callable[[str], None] = print) -> dict[str, ApproachFigures]:
    """run_demo(models=5000, cycles=3, directory=None) -> figures per approach

    Example::

        figures = run_demo(models=500, cycles=2, directory="demo")
    """
    started = time.perf_counter()
    root = new_directory(directory)
    say(f"mmpack demo: {models} battery cells, {cycles} update cycles, in {os.path.abspath(root)}")
    fleet = BatteryFleet(models, os.path.join(root, "data"))
    step("generating data and training the initial models")
    (sets, _), seconds = timed(fleet.initial_models)
    sets = [sets]
    say(
        f"  trained {models} cell models on their first drive cycle in {seconds:.1f} s "
        f"(batched: every step trains all cells)"
    )
    provenances = [None]
    for cycle in range(1, cycles + 1):
        step(f"update cycle {cycle}")
        (ms, prov), seconds = timed(lambda: fleet.update_cycle(sets[-1], cycle, fraction=0.10))
        sets.append(ms)
        provenances.append(prov)
        say(f"  cycle {cycle}: {len(prov.updates)} aged cells retrained (half fully, half fc3+fc4) in {seconds:.1f} s")

    prime_memory()  # the VM backs fresh memory lazily: do not charge that to the first approach timed
    figures = {name: ApproachFigures() for name in APPROACHES}
    repos = {name: Repository(os.path.join(root, name), fsync=False) for name in APPROACHES}
    reference = ApproachFigures()
    ids: dict[str, list[str]] = {name: [] for name in APPROACHES}
    for version, ms in enumerate(sets):
        for name in APPROACHES:
            step(f"saving version {version + 1} with {name}")
            kind = name if version else "baseline"
            base = ids[name][-1] if ids[name] else None
            prov = provenances[version] if kind == "provenance" else None
            os.sync()  # untimed: no save pays for the writeback of the ones before it
            vid, seconds = timed(lambda: repos[name].save(ms, approach=kind, base=base, provenance=prov,
                                                             message=f"cycle {version}"))
            ids[name].append(vid)
            figures[name].save_seconds.append(seconds)
            figures[name].stored_bytes.append(repos[name].storage_bytes(vid))
        if version in (0, len(sets) - 1):
            # The per-model pattern writes the same files every version: time the first and the newest.
            step(f"saving version {version + 1} one file per model")
            os.sync()
            written, seconds = timed(
                lambda: save_per_model(ms, os.path.join(root, "one-file-per-model", f"v{version + 1}"))
            )
            reference.save_seconds.append(seconds)
        reference.stored_bytes.append(written)

    newest = sets[-1]
    sample = sorted({0, int(provenances[-1].models()[0]), int(provenances[-1].models()[-1])} if cycles else {0})
    for name in APPROACHES:
        step(f"recovering the newest version with {name}")
        reader = Repository(os.path.join(root, name))
        recovered, figures[name].recover_seconds = timed(lambda: reader.recover(ids[name][-1], allow_import=True))
        few, figures[name].recover_one_seconds = timed(
            lambda: Repository(os.path.join(root, name)).recover(ids[name][-1], indices=sample, allow_import=True))
        figures[name].verified = recovered.equal(newest) and few.equal(newest.select(sample))
        reader.close()
    step("recovering the newest version one file per model")
    newest_dir = os.path.join(root, "one-file-per-model", f"v{len(sets)}")
    loaded, reference.recover_seconds = timed(lambda: load_per_model(newest_dir, list(range(models))))
    _, reference.recover_one_seconds = timed(lambda: load_per_model(newest_dir, sample))
    reference.verified = all(
        torch.equal(loaded[i][n], newest.tensors[n][i]) for i in (0, models - 1) for n in newest.architecture.names
    )
    _report(figures, reference, sample, say)
    say(
        f"\nall recovered models verified bit-exact: "
        f"{all(f.verified for f in figures.values()) and reference.verified}; "
        f"demo finished in {time.perf_counter() - started:.0f} s; repositories left in {os.path.abspath(root)}"
    )
    say("  (repositories are written without fsync here, to time the approaches rather than the disk;")
    say("   every save starts after a sync, as one in a training loop hours after the last would)")
    return figures


def _report(figures: dict[str, ApproachFigures], reference: ApproachFigures, sample: list[int],
            say: Callable[[str], None]) -> None:
    ref_store = sum(reference.stored_bytes)
    ref_save = statistics.median(reference.save_seconds)
    rows = []
    for name, f in figures.items():
        later = f.stored_bytes[1:] or f.stored_bytes
        rows.append([
            name,
            f"{sum(f.stored_bytes) / 1e6:.1f}",
            f"{statistics.median(later) / 1e6:.3f}",
            f"{ref_store / sum(f.stored_bytes):.1f}x",
            f"{statistics.median(f.save_seconds) * 1e3:.0f}",
            f"{ref_save / statistics.median(f.save_seconds):.0f}x",
            f"{f.recover_seconds * 1e3:.0f}",
            f"{reference.recover_seconds / f.recover_seconds:.1f}x",
            f"{f.recover_one_seconds * 1e3:.1f}",
            "yes" if f.verified else "NO",
        ])
    rows.append(
        [
            "one file per model",
            f"{ref_store / 1e6:.1f}",
            f"{statistics.median(reference.stored_bytes) / 1e6:.3f}",
            "1.0x",
            f"{ref_save * 1e3:.0f}",
            "1x",
            f"{reference.recover_seconds * 1e3:.0f}",
            "1.0x",
            f"{reference.recover_one_seconds * 1e3:.1f}",
            "yes" if reference.verified else "NO",
        ]
    )
    say("")
    print_table(
        ["approach", "stored MB (all)", "per update MB", "less storage", "save ms", "faster save",
         "recover newest ms", "faster recover", f"recover {len(sample)} models ms", "verified"],
        rows,
    )
    say("  (provenance recovers by retraining the updated cells on their datasets, verified against stored hashes;")
    say("   one file per model: the first and newest versions written and timed, the others take the same bytes)")


__all__ = ["ApproachFigures", "run_demo"]

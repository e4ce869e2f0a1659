"""Save and load a model set: mmpack against the raw floor and the usual ways to do it.

    python bench/save_load.py [--models 5000] [--runs 5] [--dir DIR]

Every contender writes the same 5,000 FFNN-48 models to a fresh path in the
same directory (old files are removed and dirty pages flushed with sync(),
untimed, before each run, so no contender pays for the previous one's
writeback) and reads them back; contenders run round-robin and times are
medians. The floor is numpy writing/reading the same number
of parameter bytes with no format at all.

Loads are timed with the page cache warm, into fresh memory (what
``mmpack.load`` and ``numpy.fromfile`` do) and into memory reused from the
previous run (``readinto`` for the floor; for mmpack, the reader's own code
path into tensors allocated once), and from a repository just opened:
``Repository(path).recover(vid)`` with the header parse cache cleared.
"""

from __future__ import annotations

import os

import numpy as np
import safetensors.torch
import torch
from _common import (
    describe_machine,
    interleaved_medians,
    parse_args,
    prime_memory,
    print_table,
    remove,
    work_dir,
)

import mmpack
from mmpack import ModelSet, fileformat, packing
from mmpack._io import FileReader
from mmpack.fileformat import header as header_module
from mmpack.workloads import ffnn48, make_models


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    print(describe_machine())
    prime_memory()
    models = make_models(ffnn48, args.models)
    ms = ModelSet.from_modules(models)
    stacked = dict(ms.tensors)
    raw = np.concatenate([t.reshape(-1).view(torch.uint8).numpy() for t in stacked.values()])
    runs = args.runs
    print(f"{args.models} FFNN-48 models, {ms.nbytes / 1e6:.1f} MB of parameters, median of {runs} runs\n")

    with work_dir(args.dir) as directory:
        path = lambda name: os.path.join(directory, name)  # noqa: E731

        def per_model_save(target):
            os.mkdir(target)
            for i, m in enumerate(models):
                torch.save(m.state_dict(), os.path.join(target, f"{i}.pt"))

        def per_model_load(target):
            return [torch.load(os.path.join(target, f"{i}.pt")) for i in range(args.models)]

        def stack_module_state_save(target):
            params, buffers = torch.func.stack_module_state(models)
            torch.save({**params, **buffers}, target)

        def safetensors_load_and_read(target):
            tensors = safetensors.torch.load_file(target)
            for t in tensors.values():  # the file is memory-mapped: make every page arrive
                t.view(-1).view(torch.uint8).numpy().sum()
            return tensors

        save_cases = {
            "raw floor: ndarray.tofile": ("raw.bin", raw.tofile),
            "mmpack.save(ModelSet)": ("ms.mmpack", lambda p: mmpack.save(ms, p)),
            "mmpack.save(list of modules)": ("mods.mmpack", lambda p: mmpack.save(models, p)),
            "torch.save, one file per model": ("per-model", per_model_save),
            "stack_module_state + torch.save": ("sms.pt", stack_module_state_save),
            "torch.save(stacked dict)": ("stacked.pt", lambda p: torch.save(stacked, p)),
            "safetensors save_file(stacked dict)": (
                "st.safetensors",
                lambda p: safetensors.torch.save_file(stacked, p),
            ),
        }
        saves = interleaved_medians(
            {name: (lambda a=action, f=file: a(path(f))) for name, (file, action) in save_cases.items()},
            runs,
            setup=lambda name: (remove(path(save_cases[name][0])), os.sync()),
        )
        for file, action in save_cases.values():
            if not os.path.exists(path(file)):
                action(path(file))
        reused_raw = np.empty(os.path.getsize(path("raw.bin")), np.uint8)
        reused_raw.fill(0)
        reused_tensors = {s.name: packing.empty_stacked(len(ms), s) for s in ms.architecture.tensors}
        for t in reused_tensors.values():
            t.zero_()
        repo_dir = path("bench.repo")
        if not os.path.exists(repo_dir):
            repo_vid = mmpack.Repository(repo_dir, fsync=False).save(ms)
        else:
            repo_vid = mmpack.Repository(repo_dir).versions()[-1].id

        def readinto_reused():
            with open(path("raw.bin"), "rb", buffering=0) as f:
                f.readinto(reused_raw)

        def recover_just_opened():
            header_module._parse_header.cache_clear()
            repo = mmpack.Repository(repo_dir)
            repo.recover(repo_vid)
            repo.close()

        load_cases = {
            "raw floor: numpy.fromfile": lambda: np.fromfile(path("raw.bin"), dtype=np.uint8),
            "raw floor: readinto (reused buffer)": readinto_reused,
            "mmpack read into reused tensors (verified)": lambda: _read_into(path("ms.mmpack"), reused_tensors),
            "Repository(path).recover(v), just opened": recover_just_opened,
            "mmpack.load (verified)": lambda: mmpack.load(path("ms.mmpack")),
            "mmpack.load(verify=False)": lambda: mmpack.load(path("ms.mmpack"), verify=False),
            "torch.load, one file per model": lambda: per_model_load(path("per-model")),
            "torch.load(stacked dict)": lambda: torch.load(path("stacked.pt")),
            "safetensors load_file + read all bytes": lambda: safetensors_load_and_read(path("st.safetensors")),
        }
        loads = interleaved_medians(load_cases, runs)
        one = interleaved_medians(
            {
                "mmpack.load(indices=[1234])": lambda: mmpack.load(path("ms.mmpack"), indices=[1234]),
                "torch.load of one per-model file": lambda: torch.load(os.path.join(path("per-model"), "1234.pt")),
            },
            max(runs, 21),
        )
        sizes = {
            "raw": os.path.getsize(path("raw.bin")),
            "mmpack": os.path.getsize(path("ms.mmpack")),
            "per-model": sum(e.stat().st_size for e in os.scandir(path("per-model"))),
            "stacked.pt": os.path.getsize(path("stacked.pt")),
            "safetensors": os.path.getsize(path("st.safetensors")),
        }

    floor_save, floor_load = saves["raw floor: ndarray.tofile"], loads["raw floor: numpy.fromfile"]
    mm_save, mm_mods = saves["mmpack.save(ModelSet)"], saves["mmpack.save(list of modules)"]
    print_table(
        ["save", "ms", "x raw floor", "x mmpack.save(modules)"],
        [[k, f"{v * 1e3:.1f}", f"{v / floor_save:.2f}", f"{v / mm_mods:.2f}"] for k, v in saves.items()],
    )
    print()
    print_table(
        ["load", "ms", "x raw floor", "x mmpack.load"],
        [
            [k, f"{v * 1e3:.1f}", f"{v / floor_load:.2f}", f"{v / loads['mmpack.load (verified)']:.2f}"]
            for k, v in loads.items()
        ],
    )
    print()
    print_table(["load one model", "ms"], [[k, f"{v * 1e3:.2f}"] for k, v in one.items()])
    print()
    print_table(
        ["file size", "bytes", "x parameter bytes"],
        [[k, f"{v:,}", f"{v / ms.nbytes:.4f}"] for k, v in sizes.items()],
    )
    budget = 1.005 * ms.nbytes + 64 * 1024
    print("\ntargets (issue 2):")
    _target("save(ModelSet) <= 1.3x raw write floor", mm_save / floor_save, 1.3, "<=")
    _target("load <= 1.3x raw read floor", loads["mmpack.load (verified)"] / floor_load, 1.3, "<=")
    _target(
        "load into reused memory <= 1.3x readinto of reused memory",
        loads["mmpack read into reused tensors (verified)"] / loads["raw floor: readinto (reused buffer)"],
        1.3,
        "<=",
    )
    _target("recovery, repository just opened, <= 1.3x raw read floor",
            loads["Repository(path).recover(v), just opened"] / floor_load, 1.3, "<=")
    _target("file size <= 1.005 x params + 64 KiB (ratio to budget)", sizes["mmpack"] / budget, 1.0, "<=")
    _target("save(modules) >= 15x faster than one torch.save per model",
            saves["torch.save, one file per model"] / mm_mods, 15, ">=")
    _target("save(modules) faster than stack_module_state + torch.save",
            saves["stack_module_state + torch.save"] / mm_mods, 1.0, ">")


def _read_into(file: str, tensors: dict[str, torch.Tensor]) -> None:
    """What mmpack.load does, verification included, into tensors allocated once (the benchmark's
    "reused destination": the first-touch faults of fresh memory taken out)."""
    with open(file, "rb", buffering=0) as f, FileReader(f) as source:
        header = fileformat.read_header(source)
        fileformat.check_size(source, header)
        fileformat.check_padding(source, header)
        arch, n = header.architecture, header.n_models
        width = len(arch)
        request = fileformat.RowRequest(
            source, header, np.arange(width), np.zeros(width, np.int64), np.zeros(width, np.int64),
            counts=np.full(width, n, np.uint64),
        )
        computed = fileformat.read_rows_many([request], [packing.byte_view(tensors[s.name]) for s in arch.tensors])[0]
        stored = fileformat.read_hash_table(source, header)
        if not np.array_equal(computed.reshape(width, n), stored.T):
            raise mmpack.IntegrityError("checksum mismatch")


def _target(name: str, value: float, limit: float, op: str) -> None:
    met = {"<=": value <= limit, ">=": value >= limit, ">": value > limit}[op]
    print(f"  [{'met' if met else 'MISSED'}] {name}: {value:.2f} (target {op} {limit})")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()

"""Pack/unpack throughput of mmpack's kernels against numpy.copyto of the same bytes.

    python bench/pack.py [--models 5000] [--runs 7]

"Pack" gathers many tensors into contiguous memory and hashes every
(model, tensor) slice in the same pass; "unpack" scatters back. Each row is
compared with a memcpy of the same number of bytes under the same conditions:
into memory already touched ("warm") or into a fresh allocation, which on
Linux costs page faults that every real pack into new memory also pays.

Then ``ModelSet.from_modules`` against its floor, the walk over every
model's parameters plus a memcpy of their bytes, beside
``torch.func.stack_module_state`` and ``state_dict()`` over all models; and
``repo.save`` of the list of modules against ``repo.save`` of the ModelSet
plus that floor. Those cases run round-robin (medians).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import xxhash
from _common import (
    describe_machine,
    interleaved_medians,
    median_seconds,
    parse_args,
    prime_memory,
    print_table,
    remove,
    work_dir,
)

import mmpack
from mmpack import ModelSet, _native, fileformat, packing
from mmpack.workloads import ffnn48, make_models


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], default_runs=7)
    runs = args.runs
    print(describe_machine())
    prime_memory()
    models = make_models(ffnn48, args.models)
    ms = ModelSet.from_modules(models)
    nbytes = ms.nbytes
    print(f"{args.models} FFNN-48 models, {nbytes / 1e6:.1f} MB of parameters, median of {runs} runs\n")

    source = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    warm = np.ones(nbytes, dtype=np.uint8)
    memcpy_warm = median_seconds(lambda: np.copyto(warm, source), runs)
    memcpy_fresh = median_seconds(lambda: np.copyto(np.empty(nbytes, np.uint8), source), runs)

    image = fileformat.encode(ms)
    header = fileformat.read_header(_ImageReader(image))
    plan = _row_plan(ms, header)
    hashes = np.empty(len(plan[1]), dtype=np.uint64)
    image_warm = image.copy()
    rows_warm = {n: t.clone() for n, t in ms.tensors.items()}
    targets = make_models(ffnn48, args.models, seed=1)

    cases = [
        ("memcpy, warm destination (numpy.copyto)", memcpy_warm, memcpy_warm),
        ("memcpy, fresh destination", memcpy_fresh, memcpy_fresh),
        (
            "pack: modules -> ModelSet (from_modules)",
            median_seconds(lambda: ModelSet.from_modules(models), runs),
            memcpy_fresh,
        ),
        (
            "pack: ModelSet -> file image + hashes (encode)",
            median_seconds(lambda: fileformat.encode(ms), runs),
            memcpy_fresh,
        ),
        (
            "pack kernel: stacked rows -> image + hashes, warm",
            median_seconds(
                lambda: _native.copy_segments(
                    plan[0], plan[1], plan[2], [image_warm], plan[3], plan[4], plan[5], hashes
                ),
                runs,
            ),
            memcpy_warm,
        ),
        (
            "unpack kernel: image -> stacked rows + hashes, warm",
            median_seconds(
                lambda: _native.copy_segments(
                    [image],
                    plan[3],
                    plan[4],
                    [packing.byte_view(rows_warm[s.name]) for s in ms.architecture.tensors],
                    plan[1],
                    plan[2],
                    plan[5],
                    hashes,
                ),
                runs,
            ),
            memcpy_warm,
        ),
        (
            "unpack: ModelSet -> existing modules (load_into)",
            median_seconds(lambda: ms.load_into(targets), runs),
            memcpy_warm,
        ),
        (
            "hash only: ModelSet.hashes()",
            median_seconds(ms.hashes, runs),
            median_seconds(lambda: xxhash.xxh3_64_intdigest(source), runs),
        ),
    ]
    rows = []
    for name, seconds, reference in cases:
        rows.append([name, f"{seconds * 1e3:.1f}", f"{nbytes / seconds / 1e9:.2f}", f"{reference / seconds:.2f}"])
    print_table(["operation", "ms", "GB/s", "speed vs its floor"], rows)
    print(
        "\nfloors: memcpy rows compare with the memcpy of the same kind; 'hash only' with one "
        "xxhash.xxh3_64 pass over the same bytes (the PyPI package, one thread).\n"
    )
    _from_modules(models, ms, source, warm, runs)


def _from_modules(models, ms: ModelSet, source: np.ndarray, warm: np.ndarray, runs: int) -> None:
    """ModelSet.from_modules against its floor (walking every model's parameters, plus a memcpy of
    their bytes) and the usual ways to collect them; saving modules against saving the ModelSet."""
    with work_dir(None) as directory:
        fresh = {}

        def setup(name: str) -> None:
            if name.startswith("repo.save"):
                path = os.path.join(directory, "repo")
                remove(path)
                fresh["repo"] = mmpack.Repository(path, fsync=False)

        cases = {
            "walk: [list(m.parameters()) for m in models]": lambda: [list(m.parameters()) for m in models],
            "memcpy of their bytes, warm": lambda: np.copyto(warm, source),
            "ModelSet.from_modules(models)": lambda: ModelSet.from_modules(models),
            "torch.func.stack_module_state(models)": lambda: torch.func.stack_module_state(models),
            "[m.state_dict() for m in models]": lambda: [m.state_dict() for m in models],
            "repo.save(ModelSet)": lambda: fresh["repo"].save(ms),
            "repo.save(list of modules)": lambda: fresh["repo"].save(models),
        }
        medians = interleaved_medians(cases, max(runs, 7), setup=setup)
    floor = medians["walk: [list(m.parameters()) for m in models]"] + medians["memcpy of their bytes, warm"]
    rows = [[name, f"{seconds * 1e3:.1f}", f"{seconds / floor:.2f}"] for name, seconds in medians.items()]
    print_table(["collecting the models' tensors", "ms", "vs walk + memcpy"], rows)
    saved = medians["repo.save(list of modules)"] / (medians["repo.save(ModelSet)"] + floor)
    print(f"\nModelSet.from_modules: {medians['ModelSet.from_modules(models)'] / floor:.2f}x its floor (walk + memcpy; "
          f"target 1.5x). repo.save(list of modules): {saved:.2f}x repo.save(ModelSet) plus that floor (target 1.3x). "
          "Saves go to a fresh repository each (fsync=False, page cache).")


def _row_plan(ms: ModelSet, header: fileformat.Header):
    """copy_segments tables moving every (model, tensor) row between the stacked tensors and the image."""
    n = len(ms)
    width = len(ms.architecture)
    rows = np.arange(n, dtype=np.uint64)
    row_bytes = np.array([s.nbytes for s in ms.architecture.tensors], dtype=np.uint64)
    starts = np.array(header.layout.tensor_offsets, dtype=np.uint64) + np.uint64(header.data_start)
    sources = [packing.byte_view(ms.tensors[s.name]) for s in ms.architecture.tensors]
    src_index = np.repeat(np.arange(width, dtype=np.uint64), n)
    src_offsets = (row_bytes[:, None] * rows[None, :]).reshape(-1)
    dst_index = np.zeros(width * n, dtype=np.uint64)
    dst_offsets = (starts[:, None] + row_bytes[:, None] * rows[None, :]).reshape(-1)
    return sources, src_index, src_offsets, dst_index, dst_offsets, np.repeat(row_bytes, n)


class _ImageReader:
    def __init__(self, image: np.ndarray) -> None:
        self._image = image

    def size(self) -> int:
        return len(self._image)

    def read(self, offset: int, size: int, what: str) -> bytes:
        return self._image[offset : offset + size].tobytes()

    def read_into(self, offset: int, target: memoryview, what: str) -> None:
        target.cast("B")[:] = self._image[offset : offset + target.nbytes]


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()

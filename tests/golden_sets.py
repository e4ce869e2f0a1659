"""Deterministic model sets behind the committed golden files.

Values come from integer arithmetic, not a random generator, so they are the
same on every torch version. Regenerate the files only when adding a new
format version: ``python tests/golden_sets.py``.
"""

from __future__ import annotations

import pathlib

import torch

from mmpack import Architecture, ModelSet, TensorSpec

GOLDEN_DIR = pathlib.Path(__file__).parent / "golden"

_SPECS = (
    TensorSpec("fc.weight", "parameter", torch.float32, (4, 3)),
    TensorSpec("fc.bias", "parameter", torch.float32, (4,)),
    TensorSpec("emb", "parameter", torch.bfloat16, (2, 5)),
    TensorSpec("scale", "parameter", torch.float16, (3,)),
    TensorSpec("precise", "parameter", torch.float64, (2,)),
    TensorSpec("bn.num_batches_tracked", "buffer", torch.int64, ()),
    TensorSpec("mask", "buffer", torch.bool, (6,)),
)


def golden_v1_modelset() -> ModelSet:
    """Five models whose every value is a function of (model, tensor, element)."""
    n = 5
    tensors = {}
    for j, spec in enumerate(_SPECS):
        count = n * spec.numel
        k = torch.arange(count, dtype=torch.int64)
        if spec.dtype == torch.bool:
            values = (k * 7 + j) % 3 == 0
        elif spec.dtype == torch.int64:
            values = k * 1000 + j
        else:
            values = ((k * 37 + j * 11) % 101 - 50).to(torch.float64) / 8.0
        tensors[spec.name] = values.to(spec.dtype).reshape(n, *spec.shape)
    return ModelSet(Architecture(_SPECS, "tests.golden:Golden"), tensors)


GOLDEN_METADATA = {"written-by": "mmpack 0.1.0", "note": "format version 1 golden file"}



def golden_v1_rows() -> tuple[ModelSet, "np.ndarray"]:
    """The golden set with a fixed pattern of changed rows, for the rows-layout golden file."""
    import numpy as np

    ms = golden_v1_modelset()
    changed = np.zeros((len(ms), len(ms.architecture)), dtype=bool)
    changed[1, [0, 2]] = True
    changed[3, :] = True
    changed[4, 6] = True
    return ms, changed


if __name__ == "__main__":
    import mmpack
    from mmpack import fileformat

    GOLDEN_DIR.mkdir(exist_ok=True)
    mmpack.save(golden_v1_modelset(), GOLDEN_DIR / "v1_mixed.mmpack", metadata=GOLDEN_METADATA)
    rows_set, rows_changed = golden_v1_rows()
    image, _ = fileformat.encode_rows(rows_set, rows_changed, rows_set.hashes(), GOLDEN_METADATA)
    (GOLDEN_DIR / "v1_rows.mmpack").write_bytes(image.tobytes())

"""Deterministic model sets behind the committed golden files.

Values come from integer arithmetic, not a random generator, so they are the
same on every torch version. Regenerate the files only when adding a new
format version: ``python tests/golden_sets.py`` (versions 1 and 2),
``python tests/golden_sets.py --version-3`` (version 3 only).
"""

from __future__ import annotations

import pathlib

import numpy as np
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


def golden_v1_modelset(n: int = 5) -> ModelSet:
    """``n`` models (five for version 1) whose every value is a function of (model, tensor, element)."""
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


def golden_v1_rows(n: int = 5) -> tuple[ModelSet, np.ndarray]:
    """The golden set with a fixed pattern of changed rows, for the rows-layout golden files."""
    ms = golden_v1_modelset(n)
    changed = np.zeros((len(ms), len(ms.architecture)), dtype=bool)
    changed[1, [0, 2]] = True
    changed[3, :] = True
    changed[4, 6] = True
    changed[5::3, :2] = True  # more rows, so that some planes compress, when n > 5
    return ms, changed


GOLDEN_V2_METADATA = {"written-by": "mmpack 0.1.0", "note": "format version 2 golden file"}
GOLDEN_V2_MODELS = 48  # enough rows that the exponent planes are stored as zstd frames
GOLDEN_V2_CHUNK_BYTES = 512  # several chunks per tensor


def golden_v2_update() -> tuple[ModelSet, np.ndarray, ModelSet]:
    """(new set, changed mask, reference rows) for the XOR-delta golden file: the golden set with
    the rows of ``golden_v1_rows``'s pattern nudged, stored against the golden set's values."""
    base, changed = golden_v1_rows(GOLDEN_V2_MODELS)
    tensors = {}
    for j, spec in enumerate(_SPECS):
        t = base.tensors[spec.name].clone()
        rows = torch.from_numpy(np.flatnonzero(changed[:, j]))
        if spec.dtype == torch.bool:
            t[rows] = ~t[rows]
        elif spec.dtype == torch.int64:
            t[rows] += 1
        else:
            t[rows] = (t[rows].to(torch.float64) * 1.0625).to(spec.dtype)
        tensors[spec.name] = t
    new = ModelSet(base.architecture, tensors)
    return new, changed, base.select(np.flatnonzero(changed.any(axis=1)).tolist())


def golden_v2_images() -> dict[str, bytes]:
    """The version 2 golden files' bytes, as this mmpack writes them."""
    from mmpack import Compression, fileformat

    setting = Compression(codec="zstd", chunk_bytes=GOLDEN_V2_CHUNK_BYTES)
    stacked = fileformat.encode(golden_v1_modelset(GOLDEN_V2_MODELS), GOLDEN_V2_METADATA, setting).tobytes()
    new, changed, reference = golden_v2_update()
    rows, _ = fileformat.encode_rows(new, changed, new.hashes(), GOLDEN_V2_METADATA, setting, reference)
    return {"v2_stacked_zstd.mmpack": stacked, "v2_rows_xor_zstd.mmpack": rows.tobytes()}


GOLDEN_V3_METADATA = {"written-by": "mmpack 0.1.0", "note": "format version 3 golden file"}


# The version 3 golden files, by the encoder that wrote them: the format is the same, the
# encoder's choices (tables, symbols with raw bits) are not. Every pair must keep reading; the
# last is what this mmpack writes. Pair 2: symbols with raw bits cost the encoder 1 bit an
# element (1/16 before), so fewer of them.
GOLDEN_V3_PAIRS = [("v3_stacked_rans.mmpack", "v3_rows_xor_rans.mmpack"),
                   ("v3_stacked_rans_2.mmpack", "v3_rows_xor_rans_2.mmpack")]


def golden_v3_images() -> dict[str, bytes]:
    """The latest version 3 golden files' bytes, as this mmpack writes them: the sets of the
    version 2 files, coded with rANS (the encoder is mmpack's own, so the bytes do not depend on
    a library)."""
    from mmpack import Compression, fileformat

    setting = Compression(codec="rans", chunk_bytes=GOLDEN_V2_CHUNK_BYTES)
    stacked = fileformat.encode(golden_v1_modelset(GOLDEN_V2_MODELS), GOLDEN_V3_METADATA, setting).tobytes()
    new, changed, reference = golden_v2_update()
    rows, _ = fileformat.encode_rows(new, changed, new.hashes(), GOLDEN_V3_METADATA, setting, reference)
    stacked_name, rows_name = GOLDEN_V3_PAIRS[-1]
    return {stacked_name: stacked, rows_name: rows.tobytes()}


def zstd_library_version() -> str:
    import zstandard

    return (
        zstandard.ZSTD_VERSION
        if isinstance(zstandard.ZSTD_VERSION, str)
        else ".".join(map(str, zstandard.ZSTD_VERSION))
    )


if __name__ == "__main__":
    import sys

    import mmpack
    from mmpack import fileformat

    if sys.argv[1:] == ["--version-3"]:  # add the latest version 3 files, leaving every older one as it is
        for name, blob in golden_v3_images().items():
            (GOLDEN_DIR / name).write_bytes(blob)
        sys.exit(0)
    for name, blob in golden_v2_images().items():
        (GOLDEN_DIR / name).write_bytes(blob)
    (GOLDEN_DIR / "v2_zstd_version.txt").write_text(zstd_library_version() + "\n")

    GOLDEN_DIR.mkdir(exist_ok=True)
    mmpack.save(golden_v1_modelset(), GOLDEN_DIR / "v1_mixed.mmpack", metadata=GOLDEN_METADATA)
    rows_set, rows_changed = golden_v1_rows()
    image, _ = fileformat.encode_rows(rows_set, rows_changed, rows_set.hashes(), GOLDEN_METADATA)
    (GOLDEN_DIR / "v1_rows.mmpack").write_bytes(image.tobytes())

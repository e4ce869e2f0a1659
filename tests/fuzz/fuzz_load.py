"""Coverage-guided fuzzing of the model-set reader with atheris (libFuzzer for Python).

    pip install atheris
    python tests/fuzz/fuzz_load.py -atheris_runs=200000 tests/fuzz/corpus

Any input must either load or raise an MMPackError: any other exception, a
crash or a hang is a bug. The corpus starts from valid files (the golden file
and a few small sets) so mutations explore the header parser and the
integrity checks rather than the magic-bytes check alone; compressed copies
of them (both codecs) take mutations into the chunk tables, the zstd frames,
and the rANS table blocks and chunks.
"""

from __future__ import annotations

import io
import pathlib
import sys

import atheris

with atheris.instrument_imports():
    import mmpack

    # mmpack loads its submodules lazily: import the reader here, or it would be imported
    # uninstrumented on first use and give the fuzzer no coverage.
    import mmpack.compression
    import mmpack.fileformat.reading  # noqa: F401
    from mmpack import MMPackError

CORPUS = pathlib.Path(__file__).parent / "corpus"


def seed_corpus() -> None:
    """Write a few valid files to start from (only when the corpus is empty)."""
    import torch

    from mmpack.workloads import ffnn48, make_models, small_cnn

    sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))
    from golden_sets import golden_v1_modelset

    CORPUS.mkdir(exist_ok=True)
    if any(CORPUS.iterdir()):
        return
    sets = {
        "golden": golden_v1_modelset(),
        "ffnn": mmpack.ModelSet.from_modules(make_models(ffnn48, 2)),
        "cnn": mmpack.ModelSet.from_modules(make_models(small_cnn, 1)),
        "empty": mmpack.ModelSet.from_modules(make_models(lambda: torch.nn.Linear(1, 1), 1)).select([]),
    }
    for name, ms in sets.items():
        mmpack.save(ms, CORPUS / f"{name}.mmpack")
        # Compressed (format versions 2 and 3) files, with small chunks so there are many.
        for codec in ("zstd", "rans"):
            setting = mmpack.Compression(codec=codec, chunk_bytes=256)
            mmpack.save(ms, CORPUS / f"{name}-{codec}.mmpack", compression=setting)


def resigned(data: bytes) -> bytes:
    """The input with its header checksum recomputed, so mutations reach the JSON and layout checks."""
    if len(data) < 32:
        return data
    length = int.from_bytes(data[16:24], "little")
    if length > len(data) - 32:
        return data
    digest = mmpack._native.xxh3_64(data[32 : 32 + length])
    return data[:24] + digest.to_bytes(8, "little") + data[32:]


def check(data: bytes) -> None:
    try:
        ms = mmpack.load(io.BytesIO(data))
    except MMPackError:
        return
    if len(ms):
        mmpack.load(io.BytesIO(data), indices=[len(ms) - 1, 0])


def test_one_input(data: bytes) -> None:
    check(data)
    check(resigned(data))


if __name__ == "__main__":
    seed_corpus()
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()

"""Fuzzing the version 3 chunk decoder with atheris, three decoders compared on every input.

    python tests/fuzz/fuzz_rans.py -atheris_runs=200000 tests/fuzz/corpus_rans

An input is a layout, an element count, a table block and a chunk (see
``split``). The kernels decode it with each of the CPU's loops (portable,
AVX2, AVX-512; the vector ones also as three copies in one call, which the
AVX-512 loop decodes together), and for small chunks the spec's own decoder
(``tests/rans_reference.py``) decodes it too: all must accept it with the
same bytes or all reject it (the kernels with ``DecodeError``, the spec
decoder with ``Corrupt``). Anything else, a crash or a hang is a bug. The
corpus starts from valid encodings of every layout, so mutations reach the
table rules, the directory, the rANS states and words, the raw bits and the
zero-element symbol.

Under the sanitizer build libasan takes over the coverage hooks, so libFuzzer
sees no coverage and shrinks the corpus to one byte; there, ``--mutations N``
runs N plain random mutations of the seeds instead (bit flips, byte writes,
cuts, insertions, copies), which still reach deep into valid streams::

    tests/sanitizers/run.sh --fuzz tests/fuzz/fuzz_rans.py --mutations 200000
"""

from __future__ import annotations

import pathlib
import struct
import sys

import atheris

sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))

# The spec decoder is instrumented too: the kernels give atheris no coverage (they are not
# built for it), but the Python decoder's branches mirror theirs and guide the mutations.
with atheris.instrument_imports():
    import numpy as np
    import rans_reference

    from mmpack import _native

CORPUS = pathlib.Path(__file__).parent / "corpus_rans"
# (kernel layout code, spec layout, element width): every layout of docs/FORMAT.md.
LAYOUTS = [(4, "float", 4), (2, "float", 2), (8, "float", 8), (2 | 2 << 8, "half", 2),
           (1 | 1 << 8, "integer", 1), (2 | 1 << 8, "integer", 2), (4 | 1 << 8, "integer", 4),
           (8 | 1 << 8, "integer", 8)]
MAX_ELEMENTS = 4096
REFERENCE_ELEMENTS = 48  # the spec decoder is slow: only chunks this small


def join(layout: int, n: int, table: bytes, chunk: bytes) -> bytes:
    return struct.pack("<BHH", layout, n, len(table)) + table + chunk


def split(data: bytes) -> tuple[int, int, bytes, bytes] | None:
    if len(data) < 5:
        return None
    layout, n, table_length = struct.unpack_from("<BHH", data, 0)
    return layout % len(LAYOUTS), n % (MAX_ELEMENTS + 1), data[5 : 5 + table_length], data[5 + table_length :]


def seed_corpus() -> None:
    """Valid encodings of every layout: trained-like floats, sparse deltas, constants, random bytes."""
    CORPUS.mkdir(exist_ok=True)
    if any(CORPUS.iterdir()):
        return
    rng = np.random.default_rng(0)
    floats = {8: "<f8", 4: "<f4", 2: "<f2"}
    for index, (code, _, width) in enumerate(LAYOUTS):
        for kind in range(4):
            for n in (int(rng.integers(4, REFERENCE_ELEMENTS + 1)), int(rng.integers(100, 600))):
                if kind == 0 and width > 1:  # trained-like values
                    raw = rng.normal(0, 0.1, n).astype(floats[width]).view(np.uint8)
                elif kind == 1:  # sparse: most elements zero
                    raw = rng.integers(0, 256, n * width, dtype=np.uint8)
                    raw.reshape(n, width)[rng.random(n) < 0.7] = 0
                elif kind == 2:  # one value
                    raw = np.tile(rng.integers(0, 256, width, dtype=np.uint8), n)
                else:  # small integers, or noise
                    raw = rng.integers(0, 256 if kind == 3 else 8, n * width, dtype=np.uint8)
                encoded = _native.rans_encode(np.ascontiguousarray(raw), 1, n * width, 1, code)
                data = bytes(encoded)
                table, chunk = data[: encoded.table_length], data[encoded.table_length :]
                (CORPUS / f"{index}-{kind}-{n}").write_bytes(join(index, n, table, chunk))


SIMD_PATHS = _native.rans_simd_paths()  # portable first


def decode(code: int, width: int, n: int, table: bytes, chunk: bytes, path: str, copies: int = 1,
           prefix: int | None = None) -> bytes | None:
    """The chunk (of n elements) decoded with the ``path`` loops, as ``copies`` jobs of one call
    (so the vector loop decodes them together), or only its first ``prefix`` elements; None when
    rejected. Every copy must come out the same."""
    size = (n if prefix is None else prefix) * width
    out = np.zeros(copies * size, np.uint8)
    jobs = np.array([[0, 0, 0, len(chunk), 0, k * size, size, 0, 0, n * width] for k in range(copies)], np.uint64)
    _native.rans_set_simd(path)
    try:
        _native.rans_decode([np.frombuffer(table, np.uint8)], np.array([code], np.uint64),
                            [np.frombuffer(chunk, np.uint8)], jobs.reshape(-1), [out])
    except _native.DecodeError:
        return None
    finally:
        _native.rans_set_simd(SIMD_PATHS[-1])
    copy = out[:size].tobytes()
    if out.tobytes() != copy * copies:
        raise AssertionError(f"copies of one chunk decoded together differ ({path})")
    return copy


def reference(layout: str, width: int, n: int, table: bytes, chunk: bytes) -> bytes | None:
    try:
        fields = rans_reference.parse_table_block(table, rans_reference.field_widths(layout, width))
        return rans_reference.decode_chunk(chunk, fields, layout, width, n)
    except (rans_reference.Corrupt, struct.error):
        return None


def test_one_input(data: bytes) -> None:
    parts = split(data)
    if parts is None:
        return
    index, n, table, chunk = parts
    code, layout, width = LAYOUTS[index]
    portable = decode(code, width, n, table, chunk, SIMD_PATHS[0])
    for path in SIMD_PATHS[1:]:
        for copies in (1, 3):
            if decode(code, width, n, table, chunk, path, copies) != portable:
                raise AssertionError(f"the {path} and portable decoders disagree on layout {layout}/{width}, n={n} "
                                     f"({copies} copies)")
    # A prefix (what partial reads decode): the same on every loop, and where the whole chunk
    # decodes, the start of it.
    prefix = len(chunk) % (n + 1)
    cut = decode(code, width, n, table, chunk, SIMD_PATHS[0], prefix=prefix)
    for path in SIMD_PATHS[1:]:
        if decode(code, width, n, table, chunk, path, 2, prefix) != cut:
            raise AssertionError(f"the {path} and portable decoders disagree on a prefix of {prefix} elements")
    if portable is not None and cut != portable[: prefix * width]:
        raise AssertionError(f"a prefix of {prefix} elements decodes otherwise than the whole chunk")
    vector = portable
    if n <= REFERENCE_ELEMENTS:
        spec = reference(layout, width, n, table, chunk)
        if spec != vector:
            raise AssertionError(f"the kernels and the spec decoder disagree on layout {layout}/{width}, n={n}: "
                                 f"kernels {'accept' if vector is not None else 'reject'}, "
                                 f"spec {'accepts' if spec is not None else 'rejects'}")


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 5))):
        kind = int(rng.integers(0, 5))
        at = int(rng.integers(0, max(len(out), 1)))
        if kind == 0 and out:
            out[at % len(out)] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1 and out:
            out[at % len(out)] = int(rng.integers(0, 256))
        elif kind == 2:
            del out[at : at + int(rng.integers(1, 9))]
        elif kind == 3:
            out[at:at] = bytes(rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8))
        elif out:
            width = int(rng.integers(1, 9))
            source = int(rng.integers(0, len(out)))
            out[at : at + width] = out[source : source + width]
    return bytes(out)


def random_mutations(count: int) -> None:
    import time

    seeds = [p.read_bytes() for p in sorted(CORPUS.iterdir())]
    rng = np.random.default_rng(int(time.time()))
    start = time.perf_counter()
    for k in range(count):
        test_one_input(mutate(seeds[k % len(seeds)], rng))
    print(f"{count} mutated inputs of {len(seeds)} seeds in {time.perf_counter() - start:.0f} s: no failure")


if __name__ == "__main__":
    seed_corpus()
    if sys.argv[1:2] == ["--mutations"]:
        random_mutations(int(sys.argv[2]))
    else:
        atheris.Setup(sys.argv, test_one_input)
        atheris.Fuzz()

"""Format version 3 (rANS fields): the bit transform on every dtype, the spec's own decoder, the kernels' API.

The field transform must give back every bit of every element: NaN payloads,
infinities, signed zeros and subnormals of each floating dtype, any bytes of
the integer and bool dtypes. ``rans_reference`` decodes what the kernels
encode from docs/FORMAT.md alone, and the vector and portable decoders must
agree with each other on every input.
"""

from __future__ import annotations

import contextlib
import io
import json
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import rans_reference
import torch
from helpers import ffnn_models
from hypothesis import given, settings
from hypothesis import strategies as st

import mmpack
from mmpack import Compression, FormatError, IntegrityError, ModelSet, _native, dtypes, fileformat, packing, rans
from mmpack._io import FileReader
from mmpack.errors import InvalidArgumentError

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
          torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
          torch.float8_e4m3fn, torch.float8_e5m2]
FLOAT_BITS = {  # (bits, exponent bits) of the floating element types
    torch.float32: (32, 8), torch.float64: (64, 11), torch.float16: (16, 5), torch.bfloat16: (16, 8),
    torch.complex64: (32, 8), torch.complex128: (64, 11),
}


def special_floats(bits: int, exponent: int, rng: np.random.Generator, n: int) -> np.ndarray:
    """n elements of `bits` bits (as uint64) mixing NaNs with random payloads, infinities, signed
    zeros, subnormals, extreme normals and random bits."""
    mantissa = bits - 1 - exponent
    top = (1 << exponent) - 1
    sign = rng.integers(0, 2, n, dtype=np.uint64) << np.uint64(bits - 1)
    payload = rng.integers(0, 1 << min(mantissa, 62), n, dtype=np.uint64) & np.uint64((1 << mantissa) - 1)
    kind = rng.integers(0, 7, n)
    exp = np.select(
        [kind == 0, kind == 1, kind == 2, kind == 3, kind == 4, kind == 5],
        [top, top, 0, 0, 1, top - 1],
        rng.integers(0, top + 1, n),
    ).astype(np.uint64)
    payload = np.where(kind == 0, payload | np.uint64(1), payload)  # NaN: a non-zero payload
    payload = np.where((kind == 1) | (kind == 3), np.uint64(0), payload)  # infinities, zeros
    return sign | (exp << np.uint64(mantissa)) | payload


def element_bytes(dtype: torch.dtype, values: np.ndarray) -> np.ndarray:
    width = rans.element_bytes(dtype)
    return values.astype(f"<u{width}").view(np.uint8) if width > 1 else values.astype(np.uint8)


def mixed_bytes(dtype: torch.dtype, rng: np.random.Generator, n: int) -> np.ndarray:
    """n elements' bytes of `dtype`: special values (floats) or random bytes, some runs of zero elements."""
    width = rans.element_bytes(dtype)
    if dtype in FLOAT_BITS:
        raw = element_bytes(dtype, special_floats(*FLOAT_BITS[dtype], rng, n)).copy()
    else:
        raw = rng.integers(0, 256, n * width, dtype=np.uint8)
    zero = rng.random(n) < rng.random()
    raw.reshape(n, width)[zero] = 0
    return raw


def encode(raw: np.ndarray, rows: int, dtype: torch.dtype, chunk_rows: int) -> rans.Encoded:
    return rans.encode_rows(raw, rows, len(raw) // rows if rows else 0, dtype, chunk_rows)


SIMD_PATHS = _native.rans_simd_paths()  # this CPU's decoding loops, portable first


@contextlib.contextmanager
def simd_path(path: str) -> Iterator[None]:
    """Decode with the ``path`` loops inside the block, with the CPU's best after it."""
    _native.rans_set_simd(path)
    try:
        yield
    finally:
        _native.rans_set_simd(SIMD_PATHS[-1])


def decode_jobs(encoded: rans.Encoded, raw_length: int, rows: int, chunk_rows: int) -> np.ndarray:
    """One decode job per chunk of ``encoded``, each into its rows of one output."""
    return rans.section_jobs([encoded], [chunk_rows * (raw_length // rows)], [raw_length])


def decode_native(encoded: rans.Encoded, raw_length: int, rows: int, chunk_rows: int, dtype: torch.dtype) -> np.ndarray:
    out = np.full(raw_length, 0xA5, np.uint8)
    jobs = decode_jobs(encoded, raw_length, rows, chunk_rows)
    rans.decode([encoded.data[: encoded.table_length]], [rans.layout_code(dtype)], [encoded.data],
                jobs, [out], None)
    return out


def decode_reference(encoded: rans.Encoded, raw_length: int, rows: int, chunk_rows: int, dtype: torch.dtype) -> bytes:
    layout, e = rans_reference.layout_of(dtypes.dtype_name(dtype))
    table = rans_reference.parse_table_block(bytes(encoded.data[: encoded.table_length]),
                                             rans_reference.field_widths(layout, e))
    row_bytes = raw_length // rows
    out, at = b"", encoded.table_length
    for c, length in enumerate(encoded.chunk_lengths):
        n = min(chunk_rows, rows - c * chunk_rows) * row_bytes // e
        out += rans_reference.decode_chunk(bytes(encoded.data[at : at + length]), table, layout, e, n)
        at += length
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 12), per_row=st.integers(1, 40),
       chunk_rows=st.integers(1, 12))
def test_every_bit_of_every_dtype_round_trips(dtype, seed, rows, per_row, chunk_rows):
    rng = np.random.default_rng(seed)
    raw = mixed_bytes(dtype, rng, rows * per_row * (2 if dtype.is_complex else 1))
    encoded = encode(raw, rows, dtype, chunk_rows)
    for path in SIMD_PATHS:
        with simd_path(path):
            assert np.array_equal(decode_native(encoded, len(raw), rows, chunk_rows, dtype), raw), path


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 6), per_row=st.integers(1, 30), chunk_rows=st.integers(1, 6))
def test_the_spec_decoder_reads_what_the_kernels_write(dtype, seed, rows, per_row, chunk_rows):
    rng = np.random.default_rng(seed)
    raw = mixed_bytes(dtype, rng, rows * per_row * (2 if dtype.is_complex else 1))
    encoded = encode(raw, rows, dtype, chunk_rows)
    assert decode_reference(encoded, len(raw), rows, chunk_rows, dtype) == raw.tobytes()


def test_fields_hold_every_bit_once():
    rng = np.random.default_rng(5)
    for name in ("float32", "float64", "bfloat16", "float16", "int64", "int16", "uint8"):
        layout, e = rans_reference.layout_of(name)
        for v in [0, (1 << 8 * e) - 1, *(int(x) for x in rng.integers(0, 1 << min(8 * e, 63), 200, dtype=np.uint64))]:
            fields = rans_reference.fields_of(layout, e, v)
            assert all(f < 1 << k for f, k in zip(fields, rans_reference.field_widths(layout, e)))
            assert rans_reference.element_of(layout, e, fields) == v
        for bit in range(8 * e):  # each bit lands in exactly one field bit
            fields = rans_reference.fields_of(layout, e, 1 << bit)
            assert sum(bin(f).count("1") for f in fields) == 1


def _trained_like(n: int, seed: int = 0) -> np.ndarray:
    """float32 weights shaped like trained ones: Gaussian around a uniform init."""
    rng = np.random.default_rng(seed)
    return (rng.uniform(-0.14, 0.14, n) + rng.normal(0, 0.05, n)).astype("<f4").view(np.uint8)


def test_skewed_and_sparse_data_decode_with_both_loops():
    rng = np.random.default_rng(1)
    cases = {
        "99% one value": np.where(rng.random(50_000) < 0.99, 0.5, rng.normal(size=50_000)).astype("<f4"),
        "sparse deltas": np.where(rng.random(50_000) < 0.7, 0.0, rng.normal(0, 1e-3, 50_000)).astype("<f4"),
        "all zero": np.zeros(50_000, "<f4"),
        "two values": rng.choice([1.0, -1.0], 50_000).astype("<f4"),
        "trained": _trained_like(50_000).view("<f4"),
    }
    for name, values in cases.items():
        raw = values.view(np.uint8)
        encoded = encode(raw, 100, torch.float32, 7)
        for path in SIMD_PATHS:
            with simd_path(path):
                assert np.array_equal(decode_native(encoded, len(raw), 100, 7, torch.float32), raw), (name, path)


FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the dtypes of the fused loops


def _trained_rows(dtype: torch.dtype, rows: int, per_row: int, seed: int) -> np.ndarray:
    values = torch.from_numpy(_trained_like(rows * per_row, seed).view("<f4").copy()).to(dtype)
    return values.view(torch.uint8).numpy().copy()


def _decode_all(encoded: rans.Encoded, raw_length: int, rows: int, chunk_rows: int, dtype: torch.dtype,
                payload: np.ndarray) -> tuple[np.ndarray, int | None]:
    """Every chunk of ``payload`` (an encoded section) in one call: the output and the job a
    DecodeError names (None without one)."""
    out = np.full(raw_length, 0xA5, np.uint8)
    jobs = decode_jobs(encoded, raw_length, rows, chunk_rows)
    try:
        _native.rans_decode([encoded.data[: encoded.table_length]], np.array([rans.layout_code(dtype)], np.uint64),
                            [payload], jobs.reshape(-1), [out])
    except _native.DecodeError as exc:
        return out, exc.args[1]
    return out, None


@pytest.mark.parametrize("dtype", FUSED_DTYPES, ids=str)
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 40), chunk_rows=st.integers(1, 9))
def test_chunks_decoded_together_match_the_portable_loops(dtype, seed, rows, chunk_rows):
    # Up to four chunks of a tensor share the AVX-512 loop, chunks of any length among them.
    raw = _trained_rows(dtype, rows, 37, seed)
    encoded = encode(raw, rows, dtype, chunk_rows)
    for path in SIMD_PATHS:
        with simd_path(path):
            out, failed = _decode_all(encoded, len(raw), rows, chunk_rows, dtype, encoded.data)
            assert failed is None and np.array_equal(out, raw), path


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 12), per_row=st.integers(1, 300),
       chunk_rows=st.integers(1, 12), trained=st.booleans(), cut=st.floats(0, 1))
def test_a_prefix_of_every_chunk_decodes_to_the_same_bytes_on_every_loop(dtype, seed, rows, per_row, chunk_rows,
                                                                          trained, cut):
    # Partial reads decode each chunk only as far as their last wanted row; chunks decoded
    # together may each stop elsewhere (one of them whole, with its ends checked).
    rng = np.random.default_rng(seed)
    raw = (_trained_rows(dtype, rows, per_row, seed) if trained and dtype in FUSED_DTYPES
           else mixed_bytes(dtype, rng, rows * per_row * (2 if dtype.is_complex else 1)))
    encoded = encode(raw, rows, dtype, chunk_rows)
    row_bytes = len(raw) // rows
    jobs = decode_jobs(encoded, len(raw), rows, chunk_rows)
    chunk_rows_of = jobs[:, 9] // np.uint64(row_bytes)
    jobs[:, 6] = (chunk_rows_of - (chunk_rows_of * cut).astype(np.uint64) % chunk_rows_of) * np.uint64(row_bytes)
    jobs[1::2, 6] = np.minimum(jobs[1::2, 6], np.uint64(row_bytes) * np.uint64(rng.integers(0, 3)))
    for path in SIMD_PATHS:
        with simd_path(path):
            out = np.full(len(raw), 0xA5, np.uint8)
            rans.decode([encoded.data[: encoded.table_length]], [rans.layout_code(dtype)], [encoded.data], jobs,
                        [out], None)
        for start, length, whole in zip(jobs[:, 5].tolist(), jobs[:, 6].tolist(), jobs[:, 9].tolist()):
            assert np.array_equal(out[start : start + length], raw[start : start + length]), path
            assert (out[start + length : start + whole] == 0xA5).all(), path  # nothing past the prefix


@pytest.mark.parametrize("dtype", FUSED_DTYPES, ids=str)
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), at=st.floats(0, 1, exclude_max=True), flip=st.integers(1, 255),
       rows=st.integers(0, 5))
def test_a_corrupt_chunk_decoded_as_a_prefix_fails_or_decodes_alike_on_every_loop(dtype, seed, at, flip, rows):
    # A prefix's streams are not checked to end where they should, so some corruption only the
    # rows' hashes catch (the readers check them); but every loop must agree, in bounds.
    raw = _trained_rows(dtype, 6, 37, seed)
    encoded = encode(raw, 6, dtype, 6)
    payload = encoded.data.copy()
    payload[encoded.table_length + int(at * encoded.chunk_lengths[0])] ^= flip
    jobs = decode_jobs(encoded, len(raw), 6, 6)
    jobs[:, 6] = rows * (len(raw) // 6)
    results = []
    for path in SIMD_PATHS:
        with simd_path(path):
            out = np.zeros(len(raw), np.uint8)
            try:
                rans.decode([payload[: encoded.table_length]], [rans.layout_code(dtype)], [payload], jobs, [out], None)
                results.append(out.tobytes())
            except IntegrityError:
                results.append(None)
    assert all(r == results[0] for r in results), SIMD_PATHS


@pytest.mark.parametrize("dtype", FUSED_DTYPES, ids=str)
@pytest.mark.parametrize("zeros", [0.0, 0.8], ids=["trained", "xor-delta"])
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), corrupt=st.integers(0, 6), at=st.floats(0, 1, exclude_max=True),
       flip=st.integers(1, 255))
def test_a_corrupt_chunk_decoded_with_others_fails_alone_and_alike_on_every_loop(dtype, zeros, seed, corrupt, at,
                                                                                flip):
    # Trained rows take the fused loops; rows mostly zero (XOR deltas) the field-by-field ones,
    # their streams stepped side by side first.
    rows, chunk_rows = 35, 5  # seven chunks of 185 elements: groups of four, three and one
    raw = _trained_rows(dtype, rows, 37, seed)
    if zeros:
        element = rans.element_bytes(dtype)
        raw.reshape(-1, element)[np.random.default_rng(seed).random(len(raw) // element) < zeros] = 0
    encoded = encode(raw, rows, dtype, chunk_rows)
    payload = encoded.data.copy()
    start = encoded.table_length + sum(encoded.chunk_lengths[:corrupt])
    payload[start + int(at * encoded.chunk_lengths[corrupt])] ^= flip
    results = []
    for path in SIMD_PATHS:
        with simd_path(path):
            out, failed = _decode_all(encoded, len(raw), rows, chunk_rows, dtype, payload)
        assert failed in (None, corrupt), path
        chunk = slice(corrupt * chunk_rows * len(raw) // rows, (corrupt + 1) * chunk_rows * len(raw) // rows)
        others = np.ones(len(raw), bool)
        others[chunk] = False
        assert np.array_equal(out[others], raw[others]), path
        results.append((failed, out[chunk].tobytes() if failed is None else None))
    assert all(r == results[0] for r in results), dict(zip(SIMD_PATHS, results))


_MIXED_TENSOR = st.tuples(st.sampled_from([*FUSED_DTYPES, torch.int32]), st.integers(1, 24), st.integers(1, 200),
                          st.integers(1, 9), st.integers(-20, 20),
                          st.sampled_from([0.0, 0.9]))  # dtype, rows, per row, chunk rows, scale, zeros


def _many_tensor_jobs(tensors, seed: int):
    """Sections of several tensors (each its own table; floats scaled by 2^scale, a fraction
    `zeros` of the elements zero, as in XOR deltas) and one decode job per chunk of each, tensor
    j's table, payload and destination j, hashing its rows."""
    raws, encoded, chunk_bytes = [], [], []
    for j, (dtype, rows, per_row, chunk_rows, scale, zeros) in enumerate(tensors):
        if dtype.is_floating_point:
            values = _trained_rows(torch.float32, rows, per_row, seed + j).view("<f4") * np.float32(2.0**scale)
            raw = torch.from_numpy(values.copy()).to(dtype).view(torch.uint8).numpy().copy()
        else:
            raw = mixed_bytes(dtype, np.random.default_rng(seed + j), rows * per_row)
        element = rans.element_bytes(dtype)
        raw.reshape(-1, element)[np.random.default_rng([seed, j, 1]).random(len(raw) // element) < zeros] = 0
        raws.append(raw)
        encoded.append(encode(raw, rows, dtype, chunk_rows))
        chunk_bytes.append(chunk_rows * (len(raw) // rows))
    jobs = rans.section_jobs(encoded, chunk_bytes, [len(r) for r in raws])
    row_bytes = np.array([len(r) // t[1] for r, t in zip(raws, tensors)], np.uint64)[jobs[:, 0].astype(np.intp)]
    first_row = np.cumsum([0, *(t[1] for t in tensors)])[:-1].astype(np.uint64)[jobs[:, 0].astype(np.intp)]
    jobs[:, 7] = row_bytes
    jobs[:, 8] = first_row + jobs[:, 5] // row_bytes
    return raws, encoded, jobs, sum(t[1] for t in tensors)


def test_section_jobs_place_every_chunk_of_every_section():
    # Sections with no chunks (zero-element tensors) between others, chunk sizes that do not
    # divide the tensor: each job must name its own section's table, bytes and place.
    rng = np.random.default_rng(5)
    rows = [10, 0, 2, 0, 24]  # of 4 bytes
    chunk_rows = [3, 1, 2, 5, 7]
    raws = [rng.integers(0, 256, 4 * n, dtype=np.uint8) for n in rows]
    sections = [rans.encode_rows(r, n, 4, torch.uint8, c) for r, n, c in zip(raws, rows, chunk_rows)]
    assert [len(e.chunk_lengths) for e in sections] == [4, 0, 1, 0, 4]
    chunk_bytes = [4 * c for c in chunk_rows]
    jobs = rans.section_jobs(sections, chunk_bytes, [len(r) for r in raws])
    expected = []
    for k, (e, chunk, raw) in enumerate(zip(sections, chunk_bytes, raws)):
        start = e.table_length
        for c, length in enumerate(e.chunk_lengths):
            at = c * chunk
            expected.append([k, k, start, length, k, at, min(chunk, len(raw) - at), 0, 0, min(chunk, len(raw) - at)])
            start += length
    assert jobs.tolist() == expected
    outs = [np.full(len(r), 0xA5, np.uint8) for r in raws]
    rans.decode([e.data[: e.table_length] for e in sections], [rans.layout_code(torch.uint8)] * len(raws),
                [e.data for e in sections], jobs, outs, None)
    assert all(np.array_equal(o, r) for o, r in zip(outs, raws))
    assert rans.section_jobs([], [], []).shape == (0, rans.JOB_COLUMNS)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), tensors=st.lists(_MIXED_TENSOR, min_size=2, max_size=7),
       cuts=st.lists(st.floats(0, 1), min_size=1, max_size=8), shuffle=st.booleans(),
       corrupt=st.one_of(st.none(), st.tuples(st.integers(0, 10**6), st.floats(0, 1, exclude_max=True),
                                              st.integers(1, 255))),
       from_files=st.booleans())
def test_chunks_of_many_tensors_in_one_call_decode_as_each_alone_on_every_loop(
        tmp_path_factory, seed, tensors, cuts, shuffle, corrupt, from_files):
    # The kernels step chunks of one layout together whatever tensor (table) each comes from,
    # longest first: chunks of different lengths, layouts and tables, in any job order, some
    # decoded as prefixes, one perhaps corrupt, must each decode (and hash) as if alone.
    raws, encoded, jobs, n_hashes = _many_tensor_jobs(tensors, seed)
    row_bytes = jobs[:, 7]
    whole_rows = jobs[:, 9] // row_bytes
    prefix = np.array([cuts[k % len(cuts)] for k in range(len(jobs))])
    jobs[:, 6] = np.minimum(whole_rows, np.ceil(whole_rows * prefix).astype(np.uint64)) * row_bytes
    if shuffle:
        jobs = jobs[np.random.default_rng(seed).permutation(len(jobs))]
    payloads = [e.data.copy() for e in encoded]
    bad_job = None
    if corrupt is not None:
        bad_job = corrupt[0] % len(jobs)
        j, start, length = (int(v) for v in jobs[bad_job, [0, 2, 3]])
        if length:
            payloads[j][start + int(corrupt[1] * length)] ^= corrupt[2]
        else:
            bad_job = None
    tables = [e.data[: e.table_length] for e in encoded]
    layouts = np.array([rans.layout_code(t[0]) for t in tensors], np.uint64)
    if from_files:
        path = tmp_path_factory.mktemp("sections") / "sections.bin"
        path.write_bytes(b"".join(p.tobytes() for p in payloads))
        file_jobs = jobs.copy()
        file_jobs[:, 2] += np.cumsum([0, *map(len, payloads)])[:-1].astype(np.uint64)[jobs[:, 1].astype(np.intp)]
        file_jobs[:, 1] = 0
    results = []
    for path_name in SIMD_PATHS:
        with simd_path(path_name):
            outs = [np.full(len(r), 0xA5, np.uint8) for r in raws]
            hashes = np.zeros(n_hashes, np.uint64)
            failed = None
            try:
                if from_files:
                    with open(path, "rb") as f:
                        _native.rans_decode_files(tables, layouts, [f.fileno()], file_jobs.reshape(-1), outs, hashes)
                else:
                    _native.rans_decode(tables, layouts, payloads, jobs.reshape(-1), outs, hashes)
            except _native.DecodeError as exc:
                failed = exc.args[1]
        assert failed in (None, bad_job), path_name
        for k, (j, at, length, whole, size, first_hash) in enumerate(jobs[:, [0, 5, 6, 9, 7, 8]].tolist()):
            if k == failed:
                continue
            out, raw = outs[j], raws[j]
            if k != bad_job:
                assert np.array_equal(out[at : at + length], raw[at : at + length]), (path_name, k)
                rows = [_native.xxh3_64(raw[r : r + size]) for r in range(at, at + length, size)]
                assert hashes[first_hash : first_hash + length // size].tolist() == rows, (path_name, k)
            assert (out[at + length : at + whole] == 0xA5).all(), (path_name, k)  # nothing past the prefix
        bad = None if bad_job is None or failed is not None else outs[int(jobs[bad_job, 0])].tobytes()
        results.append((failed, bad))
    assert all(r == results[0] for r in results), SIMD_PATHS


@pytest.mark.parametrize("dtype", FUSED_DTYPES, ids=str)
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), order=st.permutations(range(12)), corrupt=st.none() | st.integers(0, 11))
def test_long_xor_delta_chunks_of_many_tables_stepped_side_by_side_decode_as_each_alone(dtype, seed, order, corrupt):
    # Chunks of XOR deltas (heads with the zero symbol) decode field by field, their streams'
    # groups first stepped four side by side: long chunks of four tensors whose tables differ
    # (each its own share of zeros), in any order, one perhaps corrupt, must each decode alone.
    tensors = [(dtype, 48, 1000, 16, 0, zeros) for zeros in (0.5, 0.75, 0.9, 0.97)]
    raws, encoded, jobs, n_hashes = _many_tensor_jobs(tensors, seed)
    assert len({bytes(e.data[: e.table_length]) for e in encoded}) == len(tensors)
    jobs = jobs[list(order)]
    payloads = [e.data.copy() for e in encoded]
    if corrupt is not None:
        j, start, length = (int(v) for v in jobs[corrupt, [0, 2, 3]])
        payloads[j][start + length // 2] ^= 0x5A
    results = []
    for path_name in SIMD_PATHS:
        with simd_path(path_name):
            outs = [np.full(len(r), 0xA5, np.uint8) for r in raws]
            try:
                _native.rans_decode([e.data[: e.table_length] for e in encoded],
                                    np.array([rans.layout_code(dtype)] * len(tensors), np.uint64), payloads,
                                    jobs.reshape(-1), outs, np.zeros(n_hashes, np.uint64))
                failed = None
            except _native.DecodeError as exc:
                failed = exc.args[1]
        assert failed in (None, corrupt), path_name  # a flip in a raw field only the rows' hashes catch
        bad = None
        for k, (j, at, length) in enumerate(jobs[:, [0, 5, 6]].tolist()):
            if k != corrupt:
                assert np.array_equal(outs[j][at : at + length], raws[j][at : at + length]), (path_name, k)
            elif failed is None:
                bad = outs[j][at : at + length].tobytes()
        results.append((failed, bad))
    assert all(r == results[0] for r in results), SIMD_PATHS


@pytest.mark.parametrize("pair", [(torch.bfloat16, torch.float16), (torch.float32, torch.bfloat16),
                                  (torch.float16, torch.int16)], ids=str)
@pytest.mark.parametrize("zeros", [0.0, 0.9], ids=["trained", "xor-delta"])
def test_chunks_of_two_layouts_of_one_width_never_step_together(pair, zeros):
    # bfloat16 and float16 elements are both two bytes but assemble differently: a group mixing
    # them would build one with the other's layout. Same-length chunks of both, in one call.
    tensors = [(dtype, 4, 200, 9, 0, zeros) for dtype in pair]
    raws, encoded, jobs, n_hashes = _many_tensor_jobs(tensors, 5)
    for path_name in SIMD_PATHS:
        with simd_path(path_name):
            outs = [np.zeros(len(r), np.uint8) for r in raws]
            _native.rans_decode([e.data[: e.table_length] for e in encoded],
                                np.array([rans.layout_code(t[0]) for t in tensors], np.uint64),
                                [e.data for e in encoded], jobs.reshape(-1), outs, np.zeros(n_hashes, np.uint64))
        assert all(np.array_equal(o, r) for o, r in zip(outs, raws)), path_name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 30), per_row=st.integers(1, 300),
       chunk_rows=st.integers(1, 12), trained=st.booleans())
def test_every_loop_encodes_the_same_bytes(dtype, seed, rows, per_row, chunk_rows, trained):
    # The vector encoder (rANS words, head symbols and their raw bits) against the portable one.
    rng = np.random.default_rng(seed)
    if trained and dtype in FUSED_DTYPES:
        raw = _trained_rows(dtype, rows, per_row, seed)
    else:
        raw = mixed_bytes(dtype, rng, rows * per_row * (2 if dtype.is_complex else 1))
    encodings = {}
    for path in SIMD_PATHS:
        with simd_path(path):
            encoded = encode(raw, rows, dtype, chunk_rows)
            encodings[path] = (encoded.data.tobytes(), encoded.table_length, encoded.chunk_lengths)
    assert all(e == encodings["scalar"] for e in encodings.values())
    assert np.array_equal(decode_native(encoded, len(raw), rows, chunk_rows, dtype), raw)


def _encoder_states() -> tuple[np.ndarray, np.ndarray]:
    """Every freq with the states whose quotients a rounded estimate gets wrong first: exact
    multiples, one below them and the last state of each quotient, for the smallest quotients,
    those near 2^19 and 2^20 and the largest states (just below freq << 20), plus random ones."""
    freq = np.arange(1, 4096, dtype=np.int64)[:, None]
    q = np.concatenate([np.arange(0, 64), np.arange(-64, 1) + 2**19 + 7, np.arange(-64, 0) + 2**20])[None, :]
    x = np.concatenate([q * freq, q * freq - 1, q * freq + freq - 1,
                        (freq << 20) - 1 - np.arange(64)[None, :],
                        np.random.default_rng(3).integers(0, freq << 20, (4095, 256))], axis=1)
    freq = np.broadcast_to(freq, x.shape)
    keep = (x >= 0) & (x < freq << 20)
    return x[keep].astype(np.uint32), freq[keep].astype(np.uint32)


@pytest.mark.parametrize("dtype", FUSED_DTYPES, ids=str)
@pytest.mark.parametrize("exponents", [3, 16, 40])
def test_head_symbols_of_many_split_exponents_match_the_portable_loop(dtype, exponents):
    # The AVX-512 encoder looks head values up in two levels, an exponent's row of sixteen when
    # its values have several symbols, and gathers instead when more than sixteen exponents are
    # split. Mantissas skewed within each exponent split them all (float16's 8-bit heads split
    # none); the low bits stay noise, so the other fields are raw (the head-only encoder).
    rng = np.random.default_rng(exponents)
    n = 300_000
    exponent = rng.integers(0, exponents, n) + 110  # float16 keeps them all (subnormal to infinite)
    mantissa = np.minimum(rng.geometric(0.3, n) - 1, 15) << 19 | rng.integers(0, 1 << 19, n)
    bits = (rng.integers(0, 2, n) << 31 | exponent << 23 | mantissa).astype("<u4")
    raw = torch.from_numpy(bits.view("<f4")).to(dtype).view(torch.uint8).numpy().copy()
    rows = 100
    encodings = {}
    for path in SIMD_PATHS:
        with simd_path(path):
            encoded = encode(raw, rows, dtype, 7)
            encodings[path] = encoded.data.tobytes()
    assert all(e == encodings["scalar"] for e in encodings.values())
    assert np.array_equal(decode_native(encoded, len(raw), rows, 7, dtype), raw)


def test_every_encoding_loop_divides_every_state_exactly():
    # The vector encoders estimate x / freq in single precision (vrcp14ps or vrcpps and a
    # Newton step) and correct the estimate by one either way; their quotients must be exact,
    # or the words would differ from the scalar loop's.
    x, freq = _encoder_states()
    for path in SIMD_PATHS:
        with simd_path(path):
            q = np.empty_like(x)
            _native.rans_encoder_quotients(x, freq, q)
        assert np.array_equal(q, x // freq), path
    bad = np.array([1 << 20], np.uint32), np.array([1], np.uint32)
    with pytest.raises(ValueError, match="pair 0 is not one the encoder divides"):
        _native.rans_encoder_quotients(*bad, np.empty(1, np.uint32))
    with pytest.raises(TypeError, match="uint32"):
        _native.rans_encoder_quotients(x.astype(np.uint64), freq, np.empty_like(x))


def test_simd_paths_are_named_and_checked():
    assert SIMD_PATHS[0] == "scalar" and _native.rans_simd_path() == SIMD_PATHS[-1]
    with pytest.raises(ValueError, match="unknown rANS loops"):
        _native.rans_set_simd("neon")
    for path in ("avx2", "avx512"):
        if path not in SIMD_PATHS:
            with pytest.raises(ValueError, match="cannot run"):
                _native.rans_set_simd(path)


def test_the_encoder_is_deterministic_and_picks_a_code_per_field():
    raw = _trained_like(200_000)
    first, second = encode(raw, 100, torch.float32, 10), encode(raw, 100, torch.float32, 10)
    assert np.array_equal(first.data, second.data)
    table = rans_reference.parse_table_block(bytes(first.data[: first.table_length]), [12, 4, 8, 8])
    assert [f["mode"] for f in table] == ["rans", "raw", "raw", "raw"]  # exponent coded, mantissa noise raw
    assert len(first.data) < 0.83 * len(raw)
    coded = encode(np.full(4000, 2.0, "<f4").view(np.uint8), 10, torch.float32, 3)
    modes = rans_reference.parse_table_block(bytes(coded.data[: coded.table_length]), [12, 4, 8, 8])
    assert [f["mode"] for f in modes] == ["constant"] * 4 and sum(coded.chunk_lengths) == 0


@pytest.mark.parametrize("dtype, n, widths", [(torch.float32, 40_000, [12, 4, 8, 8]),
                                              (torch.float32, 300_000, [12, 4, 8, 8]),
                                              (torch.bfloat16, 300_000, [12, 4]), (torch.float16, 300_000, [8, 8]),
                                              (torch.int16, 300_000, [8, 8]), (torch.int32, 300_000, [8] * 4)],
                         ids=str)
def test_zero_elements_take_the_zero_symbol_and_the_other_fields_skip_them(dtype, n, widths):
    # From 2^18 elements the histograms count whole 16-bit elements (or the top 16 bits) at once,
    # and a 16-bit element's zeros are its table's entry 0; wider ones are tested one by one
    # (int32 here: most nonzero elements have their top 16 bits zero too).
    rng = np.random.default_rng(2)
    values = torch.from_numpy(np.where(rng.random(n) < 0.6, 0.0, rng.normal(0, 1e-2, n)).astype("<f4"))
    values = (values * 2**15).to(dtype) if dtype in (torch.int16, torch.int32) else values.to(dtype)
    raw = values.view(torch.uint8).numpy().copy()
    rows = 40
    encoded = encode(raw, rows, dtype, 8)
    table = rans_reference.parse_table_block(bytes(encoded.data[: encoded.table_length]), widths)
    assert table[0]["mode"] == "rans" and table[0]["symbols"][0]["zero"]
    zero_fraction = float((raw.reshape(n, -1) == 0).all(axis=1).mean())
    assert abs(table[0]["symbols"][0]["freq"] / 4096 - zero_fraction) < 0.01
    assert np.array_equal(decode_native(encoded, len(raw), rows, 8, dtype), raw)
    if n < 100_000:
        assert decode_reference(encoded, len(raw), rows, 8, dtype) == raw.tobytes()


def test_float16_and_bfloat16_use_their_layouts():
    x = torch.from_numpy(_trained_like(40_000).view("<f4"))
    for dtype in (torch.float16, torch.bfloat16):
        raw = x.to(dtype).view(torch.uint8).numpy()
        encoded = encode(raw, 10, dtype, 3)
        assert len(encoded.data) < 0.9 * len(raw)
        assert decode_reference(encoded, len(raw), 10, 3, dtype) == raw.tobytes()


# -- the kernels' API checks every size and range --------------------------------------------


def _small() -> tuple[np.ndarray, rans.Encoded]:
    raw = _trained_like(4096)
    return raw, encode(raw, 4, torch.float32, 2)


def _jobs(encoded: rans.Encoded, **change) -> np.ndarray:
    starts = np.cumsum([encoded.table_length, *encoded.chunk_lengths])
    job = dict(table=0, payload=0, offset=int(starts[0]), length=encoded.chunk_lengths[0], dst=0, dst_offset=0,
               out=8192, row_bytes=4096, hash=0, chunk_bytes=8192)
    job.update(change)
    return np.array(list(job.values()), np.uint64)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(table=1), "table index"),
        (dict(payload=3), "payload buffer index"),
        (dict(offset=10**9), "exceeds payload"),
        (dict(length=10**9), "exceeds payload"),
        (dict(dst=2), "destination buffer index"),
        (dict(dst_offset=16385), "exceeds destination"),
        (dict(out=8191), "whole elements"),
        (dict(row_bytes=3000), "whole rows"),
        (dict(hash=2), "hashes"),
        (dict(chunk_bytes=8190), "whole elements"),
        (dict(chunk_bytes=4096), "longer than its chunk"),
    ],
)
def test_decode_jobs_out_of_range_are_refused_before_anything_runs(change, message):
    raw, encoded = _small()
    out = np.zeros(len(raw), np.uint8)
    with pytest.raises(ValueError, match=message):
        _native.rans_decode([encoded.data[: encoded.table_length]], np.array([4], np.uint64), [encoded.data],
                            _jobs(encoded, **change), [out], np.zeros(3, np.uint64))
    assert not out.any()


def test_decode_arguments_of_the_wrong_kind_are_type_errors():
    raw, encoded = _small()
    table = encoded.data[: encoded.table_length]

    def call(layouts, jobs, out):
        _native.rans_decode([table], layouts, [encoded.data], jobs, [out])

    with pytest.raises(ValueError, match="layout"):
        call(np.array([3], np.uint64), _jobs(encoded), np.zeros(8192, np.uint8))
    with pytest.raises(ValueError, match="entries"):
        call(np.array([4, 4], np.uint64), _jobs(encoded), np.zeros(8192, np.uint8))
    with pytest.raises(ValueError, match="10 numbers"):
        call(np.array([4], np.uint64), _jobs(encoded)[:5], np.zeros(8192, np.uint8))
    with pytest.raises(TypeError, match="writable"):
        call(np.array([4], np.uint64), _jobs(encoded), bytes(8192))
    with pytest.raises(TypeError, match="uint64"):
        call(np.array([4], np.int32), _jobs(encoded), np.zeros(8192, np.uint8))


def test_encode_arguments_are_checked():
    raw = _trained_like(1024)
    with pytest.raises(ValueError, match="rows of"):
        _native.rans_encode(raw, 3, 1024, 1, 4)
    with pytest.raises(ValueError, match="whole elements"):
        _native.rans_encode(raw, 2, 2046, 1, 4)
    with pytest.raises(ValueError, match="chunk_rows"):
        _native.rans_encode(raw, 4, 1024, 0, 4)
    with pytest.raises(ValueError, match="layout"):
        _native.rans_encode(raw, 4, 1024, 1, 4 | 7 << 8)
    empty = _native.rans_encode(np.zeros(0, np.uint8), 5, 0, 2, 4)
    assert empty.table_length == 0 and list(empty.chunk_lengths) == [0, 0, 0] and len(bytes(empty)) == 0


def test_corrupt_tables_and_chunks_raise_decode_errors_never_wrong_bytes():
    raw, encoded = _small()
    rng = np.random.default_rng(3)
    starts = np.cumsum([encoded.table_length, *encoded.chunk_lengths])
    jobs = np.concatenate([_jobs(encoded, offset=int(starts[c]), length=encoded.chunk_lengths[c], dst_offset=c * 8192,
                                 hash=2 * c) for c in range(2)])
    # Flips in the table block, the first chunk's directory or its rANS stream: the decoder must
    # notice most (raw fields decode whatever their bits; only the hashes can tell).
    head_stream = int(encoded.data[encoded.table_length : encoded.table_length + 4].view("<u4")[0])
    coded_end = encoded.table_length + 20 + head_stream
    errors = 0
    for _ in range(300):
        forged = encoded.data.copy()
        at = int(rng.integers(0, coded_end))
        forged[at] ^= np.uint8(1 << int(rng.integers(0, 8)))
        out = np.zeros(len(raw), np.uint8)
        try:
            _native.rans_decode([forged[: encoded.table_length]], np.array([4], np.uint64), [forged], jobs, [out],
                                np.zeros(4, np.uint64))
        except _native.DecodeError as exc:
            errors += 1
            assert isinstance(exc, ValueError) and isinstance(exc.args[1], int)
            continue
        # Decoded without complaint: the values are right, or the rows' hashes show they are not.
        hashes = np.zeros(4, np.uint64)
        _native.hash_rows(out, 4096, hashes)
        expected = np.zeros(4, np.uint64)
        _native.hash_rows(raw, 4096, expected)
        assert np.array_equal(out, raw) or not np.array_equal(hashes, expected)
    assert errors > 200


def test_truncated_and_padded_chunks_are_corrupt():
    raw, encoded = _small()
    chunk = encoded.data[encoded.table_length : encoded.table_length + encoded.chunk_lengths[0]]
    table = encoded.data[: encoded.table_length]
    for forged in (chunk[:-1], chunk[:10], np.concatenate([chunk, np.zeros(1, np.uint8)]), chunk[:0]):
        job = np.array([0, 0, 0, len(forged), 0, 0, 8192, 0, 0, 8192], np.uint64)
        with pytest.raises(_native.DecodeError):
            _native.rans_decode([table], np.array([4], np.uint64), [forged], job, [np.zeros(8192, np.uint8)])


def _directory(encoded: rans.Encoded, dtype: torch.dtype) -> list[tuple[int, str]]:
    """Each directory entry of the section's chunks: (field, "values" | "stream" | "raw bits")."""
    layout, e = rans_reference.layout_of(dtypes.dtype_name(dtype))
    fields = rans_reference.parse_table_block(bytes(encoded.data[: encoded.table_length]),
                                              rans_reference.field_widths(layout, e))
    kinds = {"raw": ["values"], "constant": [], "rans": ["stream", "raw bits"]}
    return [(f, kind) for f, field in enumerate(fields) for kind in kinds[field["mode"]]]


def _assert_short_raw_bit_streams_are_corrupt(raw: np.ndarray, dtype: torch.dtype) -> None:
    """Each field's raw low bits, one byte short in turn, fail on every loop: the directory still
    adds up (the byte is gone from the stream and from its length), so only the reader can tell."""
    encoded = encode(raw, 1, dtype, 1)
    chunk = encoded.data[encoded.table_length :]
    entries = _directory(encoded, dtype)
    lengths = np.frombuffer(chunk[: 4 * len(entries)].tobytes(), "<u4").copy()
    starts = 4 * len(entries) + np.cumsum(lengths) - lengths
    shortened = 0
    for k, (_, kind) in enumerate(entries):
        if kind != "raw bits" or lengths[k] == 0:
            continue
        cut_lengths = lengths.copy()
        cut_lengths[k] -= 1
        end = int(starts[k] + lengths[k])
        forged = np.concatenate([cut_lengths.astype("<u4").view(np.uint8), chunk[4 * len(entries) : end - 1],
                                 chunk[end:]])
        for path in SIMD_PATHS:
            with simd_path(path), pytest.raises(_native.DecodeError):
                _native.rans_decode([encoded.data[: encoded.table_length]],
                                    np.array([rans.layout_code(dtype)], np.uint64), [forged],
                                    np.array([0, 0, 0, len(forged), 0, 0, len(raw), 0, 0, len(raw)], np.uint64),
                                    [np.zeros(len(raw), np.uint8)])
        shortened += 1
    assert shortened > 0, entries


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_raw_bit_stream_one_byte_short_is_corrupt_on_every_loop(dtype):
    rng = np.random.default_rng(11)
    n = 3000
    raw = mixed_bytes(dtype, rng, n) if dtype not in FUSED_DTYPES else _trained_rows(dtype, 1, n, 11)
    if dtype in FUSED_DTYPES:
        raw.reshape(n, -1)[rng.random(n) < 0.2] = 0  # zeros: the generic loops, not the fused ones
    _assert_short_raw_bit_streams_are_corrupt(raw, dtype)


def _uniform_raw_bits_data(kind: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, torch.dtype]:
    """Elements some field of which has raw bits in every symbol: bytes below a power of two,
    16-bit integers with zeros, float32 values in [1, 2)."""
    if kind.startswith("uint8"):
        return rng.integers(0, 1 << int(kind[5:]), n).astype(np.uint8), torch.uint8
    if kind == "int16 with zeros":  # the low bytes' field codes a block's non-zero elements alone
        values = rng.integers(1, 4, n) << 8 | rng.integers(0, 128, n)
        return np.where(rng.random(n) < 0.6, 0, values).astype("<u2").view(np.uint8), torch.int16
    return (1 + rng.random(n)).astype("<f4").view(np.uint8), torch.float32


def _uniform_fields(encoded: rans.Encoded, dtype: torch.dtype) -> list[int]:
    layout, e = rans_reference.layout_of(dtypes.dtype_name(dtype))
    fields = rans_reference.parse_table_block(bytes(encoded.data[: encoded.table_length]),
                                              rans_reference.field_widths(layout, e))
    return [f for f, field in enumerate(fields) if field["mode"] == "rans"
            and len({(s["zero"], s.get("r")) for s in field["symbols"]}) == 1 and field["symbols"][0].get("r")]


# The sizes at which this encoder codes such a field with symbols that all have raw bits (it
# weighs a table entry, 32 bits, against a bit an element for raw bits). Beyond them it takes one
# symbol a value or stores the field raw; the decoder must still read such fields fast and right,
# from files of an earlier encoder (the first golden pair) or of another writer.
UNIFORM_KINDS = {"uint84": (200, 300), "uint86": (500, 1200), "uint87": (800, 3000),
                 "int16 with zeros": (2100, 6000), "float32 [1, 2)": (100, 300)}


@pytest.mark.parametrize("kind", UNIFORM_KINDS)
@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), at=st.floats(0, 1))
def test_fields_whose_every_symbol_has_raw_bits_decode_alike_on_every_loop(kind, seed, at):
    # Their raw bits are read from known places, not one value after another (bits.hpp
    # read_many): the last values sit near the stream's end, and with zeros a block's values
    # start inside a byte.
    low, high = UNIFORM_KINDS[kind]
    n = low + round(at * (high - low))
    raw, dtype = _uniform_raw_bits_data(kind, n, np.random.default_rng(seed))
    encoded = encode(raw, 1, dtype, 1)
    assert _uniform_fields(encoded, dtype), kind  # the case this test is for
    for path in SIMD_PATHS:
        with simd_path(path):
            assert np.array_equal(decode_native(encoded, len(raw), 1, 1, dtype), raw), path
    if n <= 400:
        assert decode_reference(encoded, len(raw), 1, 1, dtype) == raw.tobytes()


@pytest.mark.parametrize("kind", UNIFORM_KINDS)
def test_fields_whose_every_symbol_has_raw_bits_fail_when_their_bits_run_out(kind):
    raw, dtype = _uniform_raw_bits_data(kind, UNIFORM_KINDS[kind][1], np.random.default_rng(5))
    assert _uniform_fields(encode(raw, 1, dtype, 1), dtype)
    _assert_short_raw_bit_streams_are_corrupt(raw, dtype)


@pytest.mark.parametrize(
    "table",
    [b"", b"\x00\x00\x00", b"\x00\x00\x00\x00\x00", b"\x03\x00\x00\x00", b"\x01\x00\x10\x00\x00\x00",
     b"\x02\x01\x00\x00\x00\x00\x10\x00\x00\x00",  # one symbol
     b"\x02\x02\x00\x00\x00\x00\x08\x01\x00\xff\x07\x00\x00\x00",  # sums to 4095
     b"\x02\x02\x00\x05\x00\x00\x08\x01\x00\x00\x08\x00\x00\x00",  # descending values
     b"\x02\x02\x00\x01\x10\x00\x08\x04\x00\x00\x08\x00\x00\x00",  # base not a multiple of its range
     b"\x02\x02\x00\x00\xd0\x00\x08\x00\x00\x00\x08\x00\x00\x00"],  # 13 raw bits on a 12-bit field
)
def test_tables_that_break_the_rules_are_refused(table):
    with pytest.raises(_native.DecodeError, match="table block"):
        _native.rans_decode([np.frombuffer(table, np.uint8)], np.array([4], np.uint64), [np.zeros(0, np.uint8)],
                            np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 0], np.uint64), [np.zeros(0, np.uint8)])


def test_decoding_many_jobs_from_many_threads_at_once():
    raw = _trained_like(400_000)
    rows = 100
    encoded = encode(raw, rows, torch.float32, 7)

    def run(_: int) -> bool:
        return np.array_equal(decode_native(encoded, len(raw), rows, 7, torch.float32), raw)

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(run, range(8)))


# -- version 3 objects --------------------------------------------------------------------------


def _saved(ms: ModelSet, **setting) -> bytes:
    buffer = io.BytesIO()
    mmpack.save(ms, buffer, compression=Compression(**setting))
    return buffer.getvalue()


def _rewrite(blob: bytes, edit, version: int | None = None) -> bytes:
    length = struct.unpack_from("<Q", blob, 16)[0]
    document = json.loads(blob[32 : 32 + length])
    edit(document)
    body = json.dumps(document).encode()
    start = -(-(32 + length) // 64) * 64
    version = struct.unpack_from("<I", blob, 8)[0] if version is None else version
    prefix = struct.pack("<8sIIQQ", b"\x89MMPACK\n", version, 0, len(body), _native.xxh3_64(body)) + body
    return prefix + bytes(-len(prefix) % 64) + blob[start:]


def test_a_version_3_object_describes_its_tables_and_chunks():
    ms = ModelSet.from_modules(ffnn_models(40))
    blob = _saved(ms, chunk_bytes=9216 * 8)
    assert struct.unpack_from("<I", blob, 8)[0] == 3
    header = fileformat.read_header(FileReader(io.BytesIO(blob)))
    chunking = header.layout.chunking
    assert isinstance(chunking, rans.RansChunking)
    assert chunking.chunk_rows[1] == 8 and len(chunking.lengths[1]) == 5
    assert all(t > 0 for t in chunking.tables)
    assert header.layout.tensor_lengths[1] == chunking.tables[1] + sum(chunking.lengths[1])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["compression"].pop("tables"), "keys"),
        (lambda d: d["compression"].update(codec="zstd"), "unsupported codec"),
        (lambda d: d["compression"].update(transform="byte-planes"), "unsupported codec"),
        (lambda d: d["compression"].update(delta="xor"), "XOR"),
        (lambda d: d["compression"]["tables"].pop(), "tables"),
        (lambda d: d["compression"]["tables"].__setitem__(0, 2), "table block"),
        (lambda d: d["compression"]["tables"].__setitem__(0, 10**6), "table block"),
        (lambda d: d["compression"]["tables"].__setitem__(0, -1), "tables"),
        (lambda d: d["compression"]["chunks"][1].pop(), "chunks"),
        (lambda d: d["compression"]["chunks"][1].__setitem__(0, -5), "chunk lengths"),
        (lambda d: d["compression"]["chunks"][1].__setitem__(0, d["compression"]["chunks"][1][0] + 1), "sections"),
    ],
)
def test_version_3_headers_that_lie_are_rejected(edit, message):
    blob = _saved(ModelSet.from_modules(ffnn_models(20)), chunk_bytes=9216 * 8)
    with pytest.raises(FormatError, match=message):
        mmpack.load(io.BytesIO(_rewrite(blob, edit)))


def test_each_version_reads_only_its_own_compression_object():
    ms = ModelSet.from_modules(ffnn_models(4))
    with pytest.raises(FormatError, match="chunk_rows|keys|codec"):
        mmpack.load(io.BytesIO(_rewrite(_saved(ms), lambda d: None, version=2)))
    with pytest.raises(FormatError, match="keys|codec"):
        mmpack.load(io.BytesIO(_rewrite(_saved(ms, codec="zstd"), lambda d: None, version=3)))


def test_a_corrupt_chunk_in_a_file_is_an_integrity_error():
    ms = ModelSet.from_modules(ffnn_models(30))
    blob = bytearray(_saved(ms))
    header = fileformat.read_header(FileReader(io.BytesIO(bytes(blob))))
    at = header.data_start + header.layout.tensor_offsets[1] + header.layout.chunking.tables[1] + 100
    blob[at : at + 16] = bytes(16)
    with pytest.raises(IntegrityError):
        mmpack.load(io.BytesIO(bytes(blob)))
    blob = bytearray(_saved(ms))
    blob[header.data_start + header.layout.tensor_offsets[1]] = 7  # the first field's mode
    with pytest.raises(IntegrityError, match="table block"):
        mmpack.load(io.BytesIO(bytes(blob)), indices=[3])


class _FlakyReader(FileReader):
    """Reads as a FileReader, except that the next ``read_segments`` call gets one byte wrong
    when ``flip_next`` is set; counts its ``read_segments`` calls."""

    flip_next = False
    calls = 0

    def read_segments(self, offsets, lengths, dst, dst_index, dst_offsets, hashes=None, counts=None):
        super().read_segments(offsets, lengths, dst, dst_index, dst_offsets, hashes, counts)
        self.calls += 1
        if self.flip_next:
            self.flip_next = False
            dst[int(dst_index[0])][int(dst_offsets[0])] ^= 0x40


def test_a_table_block_read_wrong_is_not_kept_for_later_reads():
    # Table blocks are kept per header once chunks decoded with them; one that a store got
    # wrong must fail its read and be read again by the next one, not poison the header.
    ms = ModelSet.from_modules(ffnn_models(30))
    blob = _saved(ms)
    reader = _FlakyReader(io.BytesIO(blob))
    header = fileformat.read_header(reader)
    tensors = np.arange(len(ms.architecture), dtype=np.int64)
    rows = np.full(len(tensors), 4, np.int64)

    def read_model_4() -> ModelSet:
        out = {s.name: packing.empty_stacked(1, s) for s in ms.architecture.tensors}
        views = [packing.byte_view(out[s.name]).reshape(-1) for s in ms.architecture.tensors]
        hashes = fileformat.read_rows(reader, header, tensors, rows, views, np.zeros(len(tensors), np.int64))
        assert np.array_equal(hashes, [_native.xxh3_64(v.tobytes()) for v in views])
        return ModelSet(ms.architecture, out)

    reader.flip_next = True  # the first read of a compressed object reads every table block it needs
    with pytest.raises(IntegrityError):
        read_model_4()
    assert not header.per_tensor.table_blocks
    reader.calls = 0
    assert read_model_4().equal(ms.select([4])) and reader.calls == 2  # the tables, then the chunks
    assert len(header.per_tensor.table_blocks) == len(tensors)
    reader.calls = 0
    assert read_model_4().equal(ms.select([4])) and reader.calls == 1  # the chunks only


def test_zero_element_tensors_store_nothing():
    arch = mmpack.Architecture(
        (mmpack.TensorSpec("empty", "parameter", torch.float32, (0, 3)),
         mmpack.TensorSpec("w", "parameter", torch.float32, (2,))), None)
    ms = ModelSet(arch, {"empty": torch.zeros(5, 0, 3), "w": torch.arange(10.0).reshape(5, 2)})
    blob = _saved(ms)
    header = fileformat.read_header(FileReader(io.BytesIO(blob)))
    assert header.layout.chunking.tables[0] == 0 and not any(header.layout.chunking.lengths[0])
    assert mmpack.load(io.BytesIO(blob)).equal(ms)
    assert mmpack.load(io.BytesIO(blob), indices=[4, 1]).equal(ms.select([4, 1]))


def test_rans_objects_are_smaller_than_zstd_ones_on_trained_like_weights():
    ms = ModelSet.from_modules(ffnn_models(200))
    assert len(_saved(ms)) < len(_saved(ms, codec="zstd"))


def _opened(blob: bytes, where: str, tmp_path) -> io.IOBase:
    """``blob`` as a stream (chunks read, then decoded) or as a file (the kernels read the chunks)."""
    if where == "stream":
        return io.BytesIO(blob)
    path = tmp_path / "object.mmpack"
    path.write_bytes(blob)
    return open(path, "rb")


@pytest.mark.parametrize("where", ["stream", "file"])
def test_reads_in_many_rounds_with_empty_tensors_and_xor_rows(monkeypatch, where, tmp_path):
    """Small rounds (a chunk or two each) give the same rows and hashes as one round, whether the
    chunks are read before decoding (a stream) or by the threads that decode them (a file; its
    full load is one round, whole chunks staging nothing, its partial and XOR reads many)."""
    from mmpack.fileformat import compressed

    arch = mmpack.Architecture(
        (mmpack.TensorSpec("w", "parameter", torch.float32, (30,)),
         mmpack.TensorSpec("none", "buffer", torch.float32, (0,)),
         mmpack.TensorSpec("h", "parameter", torch.float16, (7,))), None)
    rng = np.random.default_rng(4)
    ms = ModelSet(arch, {"w": torch.from_numpy(rng.normal(0, 0.1, (60, 30)).astype("f4")),
                         "none": torch.zeros(60, 0),
                         "h": torch.from_numpy(rng.normal(0, 1, (60, 7)).astype("f2"))})
    blob = _saved(ms, chunk_bytes=400)
    expected = mmpack.load(io.BytesIO(blob), indices=[5, 59, 6, 0, 31])
    monkeypatch.setattr(compressed, "_ROUND_BYTES", 300)
    with _opened(blob, where, tmp_path) as f:
        assert mmpack.load(f).equal(ms)
    with _opened(blob, where, tmp_path) as f:
        assert mmpack.load(f, indices=[5, 59, 6, 0, 31]).equal(expected)
    # XOR rows of a rows-layout object, through many rounds.
    new = ModelSet(arch, {k: (v * 1.001).to(v.dtype) if v.numel() else v for k, v in ms.tensors.items()})
    changed = new.hashes() != ms.hashes()
    changed[:, 1] = True  # the empty tensor's rows too
    holders = np.flatnonzero(changed.any(axis=1))
    image, header = fileformat.encode_rows(new, changed, new.hashes(), compression=Compression(chunk_bytes=400),
                                           reference=ms.select(holders))
    with _opened(image.tobytes(), where, tmp_path) as stream:
        source = FileReader(stream)
        assert (source.descriptor() is None) == (where == "stream")
        models = np.concatenate([np.flatnonzero(changed[:, j]) for j in range(3)])
        columns = np.concatenate([np.full(changed[:, j].sum(), j) for j in range(3)])
        stored = np.concatenate([np.arange(changed[:, j].sum()) for j in range(3)])
        out = {n: t.clone() for n, t in ms.tensors.items()}
        views = [out[s.name].view(-1).view(torch.uint8).numpy() for s in arch.tensors]
        hashes = fileformat.read_rows_many([fileformat.RowRequest(source, header, columns, stored, models, xor=True)],
                                           views)[0]
    assert ModelSet(arch, out).equal(new)
    assert np.array_equal(hashes, new.hashes()[models, columns])


def _mixed_set(n: int) -> ModelSet:
    arch = mmpack.Architecture(
        (mmpack.TensorSpec("w", "parameter", torch.float32, (30,)),
         mmpack.TensorSpec("none", "buffer", torch.float32, (0,)),
         mmpack.TensorSpec("h", "parameter", torch.float16, (7,)),
         mmpack.TensorSpec("b", "parameter", torch.bfloat16, (5, 3)),
         mmpack.TensorSpec("steps", "buffer", torch.int64, (1,))), None)
    rng = np.random.default_rng(5)
    return ModelSet(arch, {"w": torch.from_numpy(rng.normal(0, 0.1, (n, 30)).astype("f4")),
                           "none": torch.zeros(n, 0),
                           "h": torch.from_numpy(rng.normal(0, 1, (n, 7)).astype("f2")),
                           "b": torch.from_numpy(rng.normal(0, 1, (n, 5, 3)).astype("f4")).to(torch.bfloat16),
                           "steps": torch.arange(n).reshape(n, 1)})


_SMALL_READ_SET = _mixed_set(40)
_SMALL_READ_BLOB = _saved(_SMALL_READ_SET, chunk_bytes=100)


@pytest.mark.parametrize("where", ["stream", "file"])
@settings(max_examples=40, deadline=None)
@given(runs=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 45), st.integers(0, 9)), min_size=1, max_size=3),
       xor=st.booleans(), corrupt=st.one_of(st.none(), st.floats(0, 1, exclude_max=True)))
def test_small_reads_planned_with_integers_match_the_array_plan(tmp_path_factory, where, runs, xor, corrupt):
    """Reads of a few chunks are planned with Python integers (one model's rows); every such read,
    copied or XORed, over chunks of every kind (empty rows, several pieces of one chunk, rows out
    of range, a corrupt chunk), gives the rows, hashes or error of the array plan. (At most 27
    chunks here, rows of w being chunks of their own: always small enough.)"""
    from mmpack.fileformat import compressed

    blob = bytearray(_SMALL_READ_BLOB)
    header = fileformat.read_header(FileReader(io.BytesIO(bytes(blob))))
    if corrupt is not None:
        blob[header.data_start + int(corrupt * header.layout.data_length)] ^= 0x5A
    arch = _SMALL_READ_SET.architecture
    t, first, counts = (np.array(x, np.int64) for x in zip(*runs))
    dst = np.zeros(len(runs), np.int64)
    for j in range(len(arch)):  # each tensor's runs land on distinct destination rows
        dst[t == j] = np.cumsum(counts[t == j]) - counts[t == j]
    results = []
    for few in (compressed._FEW_CHUNKS, 0):
        out = {s.name: packing.empty_stacked(60, s) for s in arch.tensors}
        views = [packing.byte_view(out[s.name]).reshape(-1) for s in arch.tensors]
        for v in views:  # rows the read does not write, and references for XOR reads
            v[:] = np.random.default_rng(len(v)).integers(0, 256, len(v), np.uint8)
        with _opened(bytes(blob), where, tmp_path_factory.mktemp("small-read")) as stream:
            source = FileReader(stream)
            opened = fileformat.read_header(source)
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(compressed, "_FEW_CHUNKS", few)
                if few == 0:
                    assert compressed._read_rans_few(source, opened, t, first, counts, dst, views, xor,
                                                     np.empty(int(counts.sum()), np.uint64)) is False
                else:
                    patch.setattr(compressed, "plan", None)  # small enough: never planned as arrays
                try:
                    hashes = compressed.read_rows(source, opened, t, first, counts, dst, views, xor)
                    results.append(([v.tobytes() for v in views], hashes.tolist()))
                except (FormatError, IntegrityError) as exc:
                    results.append(type(exc))
                    continue
                # Again with the header's table blocks kept from the first read.
                again = compressed.read_rows(source, opened, t, first, counts, dst, views, False)
                assert xor or again.tolist() == hashes.tolist()
    assert results[0] == results[1]
    if corrupt is None and (first + counts <= 40).all():
        assert isinstance(results[0], tuple)


def test_reads_of_many_chunks_or_rows_take_the_array_plan():
    from mmpack.fileformat import compressed

    blob = _SMALL_READ_BLOB
    source = FileReader(io.BytesIO(blob))
    header = fileformat.read_header(source)
    arch = _SMALL_READ_SET.architecture
    views = [packing.byte_view(packing.empty_stacked(40, s)).reshape(-1) for s in arch.tensors]
    for runs in ([(0, 0, 33)], [(0, k, 1) for k in range(33)], [(4, 0, 40)] * 7):  # 33 chunks; 280 rows
        t, first, counts = (np.array(x, np.int64) for x in zip(*runs))
        assert not compressed._read_rans_few(source, header, t, first, counts, np.zeros(len(t), np.int64), views,
                                             False, np.empty(int(counts.sum()), np.uint64))
    assert mmpack.load(io.BytesIO(blob)).equal(_SMALL_READ_SET)  # 33 chunks and more: the array plan
    # More than the array plan's first round (it measures chunks decoded into scratch whole).
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compressed, "_ROUND_BYTES", 200)
        t, first, counts = np.zeros(2, np.int64), np.array([0, 1]), np.ones(2, np.int64)  # rows of 120 bytes
        assert not compressed._read_rans_few(source, header, t, first, counts, np.array([0, 1]), views, True,
                                             np.empty(2, np.uint64))


@pytest.mark.parametrize("few", [True, False])
@pytest.mark.parametrize("run, error", [((-1, 0, 1, 0), InvalidArgumentError), ((5, 0, 1, 0), InvalidArgumentError),
                                        ((0, 0, -1, 0), InvalidArgumentError), ((0, 0, 1, -1), InvalidArgumentError),
                                        ((0, -1, 1, 0), FormatError), ((0, 40, 1, 0), FormatError),
                                        ((0, 2**63 - 1, 1, 0), FormatError)])
def test_bad_runs_are_refused_alike_by_both_plans(few, run, error):
    # A tensor index outside the object, a negative count or destination row, rows outside the
    # stored ones (their end overflowing too): nothing read, the same error from either plan.
    from mmpack.fileformat import compressed

    source = FileReader(io.BytesIO(_SMALL_READ_BLOB))
    header = fileformat.read_header(source)
    views = [packing.byte_view(packing.empty_stacked(40, s)).reshape(-1) for s in _SMALL_READ_SET.architecture.tensors]
    t, first, counts, dst = (np.array([x, y], np.int64) for x, y in zip((2, 3, 1, 0), run))  # a good run, then a bad
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compressed, "_FEW_CHUNKS", compressed._FEW_CHUNKS if few else 0)
        with pytest.raises(error):
            compressed.read_rows(source, header, t, first, counts, dst, views, False)


def _section_file(tmp_path, dtype: torch.dtype = torch.float32, rows: int = 64, per_row: int = 300,
                  chunk_rows: int = 5) -> tuple[np.ndarray, rans.Encoded, object]:
    raw = mixed_bytes(dtype, np.random.default_rng(11), rows * per_row) if rows * per_row < 10**5 else \
        np.resize(mixed_bytes(dtype, np.random.default_rng(11), 10**5), rows * per_row * rans.element_bytes(dtype))
    encoded = encode(raw, rows, dtype, chunk_rows)
    path = tmp_path / "section.bin"
    path.write_bytes(b"x" * 7 + encoded.data.tobytes())  # the section at position 7 of its file
    return raw, encoded, path


@pytest.mark.parametrize("dtype", [*FUSED_DTYPES, torch.int16, torch.float64], ids=str)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("chunk_rows", [7, 1000])  # small chunks step together, chunks over 1 MiB alone
def test_chunks_read_from_files_decode_and_hash_as_from_buffers(dtype, threads, chunk_rows, tmp_path):
    # Over 8 MiB of output, so that two threads split the jobs (4 MiB each at least).
    rows = -(-(9 << 20) // (300 * rans.element_bytes(dtype)))
    raw, encoded, path = _section_file(tmp_path, dtype, rows=rows, chunk_rows=chunk_rows)
    row_bytes = len(raw) // rows
    jobs = decode_jobs(encoded, len(raw), rows, chunk_rows)
    jobs[:, 7] = row_bytes
    jobs[:, 8] = jobs[:, 5] // np.uint64(row_bytes)
    table, layouts = [encoded.data[: encoded.table_length]], [rans.layout_code(dtype)]
    expected_hashes = np.zeros(rows, np.uint64)
    expected = np.zeros(len(raw), np.uint8)
    rans.decode(table, layouts, [encoded.data], jobs, [expected], expected_hashes)
    in_file = jobs.copy()
    in_file[:, 2] += np.uint64(7)
    out, hashes = np.zeros(len(raw), np.uint8), np.zeros(rows, np.uint64)
    _native.set_max_threads(threads)
    try:
        with open(path, "rb") as f:
            rans.decode_files(table, layouts, [f.fileno()], in_file, [out], hashes)
    finally:
        _native.set_max_threads(0)
    assert np.array_equal(out, raw) and np.array_equal(out, expected)
    assert np.array_equal(hashes, expected_hashes)


def test_a_chunk_beyond_the_end_of_its_file_is_a_truncation_and_a_bad_descriptor_an_os_error(tmp_path):
    raw, encoded, path = _section_file(tmp_path)
    jobs = decode_jobs(encoded, len(raw), 64, 5)
    jobs[:, 2] += np.uint64(7)
    table, layouts = [encoded.data[: encoded.table_length]], [rans.layout_code(torch.float32)]
    out = np.zeros(len(raw), np.uint8)
    with open(path, "r+b") as f:
        f.truncate(7 + int(jobs[5, 2]) + 3)  # inside chunk 5
        with pytest.raises(IntegrityError, match=r"file is truncated: section\.bin ends at byte \d+, a read needs"):
            rans.decode_files(table, layouts, [f.fileno()], jobs, [out], None, names=["section.bin"])
        with pytest.raises(_native.ShortReadError) as caught:
            _native.rans_decode_files(table, np.array(layouts, np.uint64), [f.fileno()], jobs.reshape(-1), [out])
        assert "job 5" in caught.value.args[0] and caught.value.args[1] == 0
        with pytest.raises(ValueError, match="file index 1 out of range"):
            bad = jobs.copy()
            bad[3, 1] = 1
            rans.decode_files(table, layouts, [f.fileno()], bad, [out], None)
        with pytest.raises(ValueError, match="not a file descriptor"):
            rans.decode_files(table, layouts, [-1], jobs, [out], None)
    with open(path, "rb") as f:
        fd = f.fileno()
    with pytest.raises(OSError, match="Bad file descriptor"):
        rans.decode_files(table, layouts, [fd], jobs, [out], None)


def test_a_corrupt_chunk_read_from_a_file_is_an_integrity_error(tmp_path):
    raw, encoded, path = _section_file(tmp_path)
    jobs = decode_jobs(encoded, len(raw), 64, 5)
    jobs[:, 2] += np.uint64(7)
    blob = bytearray(path.read_bytes())
    blob[int(jobs[2, 2]) : int(jobs[2, 2]) + 8] = b"\xff" * 8  # chunk 2's directory
    path.write_bytes(bytes(blob))
    with open(path, "rb") as f, pytest.raises(IntegrityError, match="does not decode"):
        rans.decode_files([encoded.data[: encoded.table_length]], [rans.layout_code(torch.float32)],
                          [f.fileno()], jobs, [np.zeros(len(raw), np.uint8)], None)

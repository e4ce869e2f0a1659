"""The C++ kernels against pure numpy/xxhash references."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from mmpack import _native

U64 = np.uint64


@pytest.fixture(scope="module")
def noise() -> bytes:
    return np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()


def test_xxh3_equals_reference_for_every_length_up_to_1024(noise):
    for length in range(1025):
        assert _native.xxh3_64(noise[:length]) == xxhash.xxh3_64_intdigest(noise[:length]), length


@pytest.mark.parametrize("seed", [1, 0x9E3779B97F4A7C15, 2**64 - 1])
def test_xxh3_seeded_equals_reference(noise, seed):
    for length in (0, 1, 3, 4, 8, 9, 16, 17, 128, 129, 240, 241, 1024, 4096):
        assert _native.xxh3_64(noise[:length], seed) == xxhash.xxh3_64_intdigest(noise[:length], seed)


@pytest.mark.parametrize("size", [1025, 4096, 65536 + 7, 1 << 20, 10_000_019, 64 << 20])
def test_xxh3_equals_reference_on_large_random_inputs(size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    assert _native.xxh3_64(data) == xxhash.xxh3_64_intdigest(data)


@given(st.binary(max_size=5000), st.integers(0, 2**64 - 1))
def test_xxh3_property(data, seed):
    assert _native.xxh3_64(data, seed) == xxhash.xxh3_64_intdigest(data, seed)


def test_simd_path_is_reported():
    assert _native.simd_path() in {"avx2", "sse2", "scalar"}


@given(st.integers(0, 300), st.integers(0, 64), st.integers(0, 5))
def test_hash_rows_matches_per_row_reference(row_bytes, n_rows, seed):
    data = np.random.default_rng(seed).integers(0, 256, row_bytes * n_rows, dtype=np.uint8)
    out = np.empty(n_rows, dtype=U64)
    _native.hash_rows(data, row_bytes, out)
    expected = [xxhash.xxh3_64_intdigest(data[r * row_bytes : (r + 1) * row_bytes]) for r in range(n_rows)]
    assert out.tolist() == expected


def test_hash_rows_parallel_large():
    data = np.random.default_rng(3).integers(0, 256, 9216 * 2000, dtype=np.uint8)
    out = np.empty(2000, dtype=U64)
    _native.hash_rows(data, 9216, out)
    assert out[1234] == xxhash.xxh3_64_intdigest(data[1234 * 9216 : 1235 * 9216])


def test_hash_rows_rejects_wrong_sizes():
    with pytest.raises(ValueError, match="not 3 rows of 4 bytes"):
        _native.hash_rows(np.zeros(13, np.uint8), 4, np.empty(3, U64))
    with pytest.raises(ValueError, match="fewer than"):
        _native.hash_rows(np.zeros(8, np.uint8), 2**62, np.empty(4, U64))
    with pytest.raises(TypeError, match="uint64"):
        _native.hash_rows(np.zeros(8, np.uint8), 4, np.empty(2, np.int32))
    with pytest.raises(TypeError, match="writable"):
        _native.hash_rows(np.zeros(8, np.uint8), 4, np.empty(2, U64).tobytes())


@st.composite
def segment_plans(draw):
    """Random sources and a plan copying pieces of them into disjoint destination ranges."""
    n_src = draw(st.integers(1, 4))
    sources = [
        np.frombuffer(draw(st.binary(min_size=0, max_size=400)), dtype=np.uint8).copy() for _ in range(n_src)
    ]
    pieces = []
    for _ in range(draw(st.integers(0, 20))):
        s = draw(st.integers(0, n_src - 1))
        size = len(sources[s])
        start = draw(st.integers(0, size))
        length = draw(st.integers(0, size - start))
        pieces.append((s, start, length))
    n_dst = draw(st.integers(1, 3))
    placement = [draw(st.integers(0, n_dst - 1)) for _ in pieces]
    gaps = [draw(st.integers(0, 8)) for _ in pieces]
    return sources, pieces, n_dst, placement, gaps


def _layout_destinations(pieces, n_dst, placement, gaps):
    ends = [0] * n_dst
    offsets = []
    for (_, _, length), d, gap in zip(pieces, placement, gaps):
        offsets.append(ends[d] + gap)
        ends[d] += gap + length
    return [np.full(e, 0xAB, np.uint8) for e in ends], offsets


def _reference_copy(sources, pieces, dsts, placement, offsets):
    for (s, start, length), d, off in zip(pieces, placement, offsets):
        dsts[d][off : off + length] = sources[s][start : start + length]


@given(segment_plans(), st.booleans())
def test_copy_segments_matches_reference(plan, with_hashes):
    sources, pieces, n_dst, placement, gaps = plan
    dsts, offsets = _layout_destinations(pieces, n_dst, placement, gaps)
    expected = [d.copy() for d in dsts]
    _reference_copy(sources, pieces, expected, placement, offsets)
    hashes = np.empty(len(pieces), U64) if with_hashes else None
    _native.copy_segments(
        sources,
        np.array([p[0] for p in pieces], U64),
        np.array([p[1] for p in pieces], U64),
        dsts,
        np.array(placement, U64),
        np.array(offsets, U64),
        np.array([p[2] for p in pieces], U64),
        hashes,
    )
    for got, want in zip(dsts, expected):
        assert np.array_equal(got, want)
    if with_hashes:
        assert hashes.tolist() == [
            xxhash.xxh3_64_intdigest(sources[s][a : a + n].tobytes()) for s, a, n in pieces
        ]


@given(segment_plans())
def test_gather_from_addresses_then_scatter_back(plan):
    sources, pieces, n_dst, placement, gaps = plan
    dsts, offsets = _layout_destinations(pieces, n_dst, placement, gaps)
    expected = [d.copy() for d in dsts]
    _reference_copy(sources, pieces, expected, placement, offsets)
    addresses = np.array([sources[s].ctypes.data + start for s, start, _ in pieces], U64)
    lengths = np.array([p[2] for p in pieces], U64)
    hashes = np.empty(len(pieces), U64)
    _native.gather(addresses, lengths, dsts, np.array(placement, U64), np.array(offsets, U64), hashes)
    for got, want in zip(dsts, expected):
        assert np.array_equal(got, want)
    # Scatter the gathered bytes into fresh copies of the sources.
    restored = [np.zeros_like(s) for s in sources]
    targets = np.array([restored[s].ctypes.data + start for s, start, _ in pieces], U64)
    _native.scatter(dsts, np.array(placement, U64), np.array(offsets, U64), lengths, targets)
    for (s, start, length) in pieces:
        assert np.array_equal(restored[s][start : start + length], sources[s][start : start + length])


def test_large_unhashed_copies_are_split_across_threads_correctly():
    src = np.random.default_rng(5).integers(0, 256, (8 << 20) + 13, dtype=np.uint8)
    dst = np.zeros_like(src)
    z = np.zeros(1, U64)
    _native.copy_segments([src], z, z, [dst], z, z, np.array([len(src)], U64))
    assert np.array_equal(src, dst)


def _one_segment(src_len=16, dst_len=16):
    return [np.zeros(src_len, np.uint8)], [np.zeros(dst_len, np.uint8)]


@pytest.mark.parametrize(
    ("src_offset", "dst_offset", "length", "message"),
    [
        (0, 0, 17, "source range"),
        (10, 0, 7, "source range"),
        (0, 10, 7, "destination range"),
        (2**64 - 1, 0, 2, "source range"),
        (0, 2**64 - 8, 16, "destination range"),
    ],
)
def test_copy_segments_rejects_out_of_bounds(src_offset, dst_offset, length, message):
    src, dst = _one_segment()
    before = dst[0].copy()
    with pytest.raises(ValueError, match=message):
        _native.copy_segments(
            src, np.zeros(1, U64), np.array([src_offset], U64), dst, np.zeros(1, U64),
            np.array([dst_offset], U64), np.array([length], U64),
        )
    assert np.array_equal(dst[0], before)


def test_bad_plans_raise_before_any_byte_moves():
    src, dst = [np.ones(16, np.uint8)], [np.zeros(32, np.uint8)]
    # The first segment is fine, the second is not: nothing may be written.
    with pytest.raises(ValueError, match="segment 1"):
        _native.copy_segments(
            src, np.zeros(2, U64), np.zeros(2, U64), dst, np.array([0, 1], U64),
            np.zeros(2, U64), np.array([16, 16], U64),
        )
    assert not dst[0].any()


def test_plan_tables_must_agree_in_length_and_type():
    src, dst = _one_segment()
    with pytest.raises(ValueError, match="dst_offsets has 2 entries"):
        _native.copy_segments(
            src, np.zeros(1, U64), np.zeros(1, U64), dst, np.zeros(1, U64), np.zeros(2, U64), np.ones(1, U64)
        )
    with pytest.raises(TypeError, match="uint64"):
        _native.copy_segments(
            src, np.zeros(1, np.int64), np.zeros(1, U64), dst, np.zeros(1, U64), np.zeros(1, U64), np.ones(1, U64)
        )
    with pytest.raises(TypeError, match="C-contiguous"):
        _native.copy_segments(
            src, np.zeros(4, U64)[::2], np.zeros(2, U64), dst, np.zeros(2, U64), np.zeros(2, U64), np.ones(2, U64)
        )
    with pytest.raises(TypeError, match="writable"):
        _native.copy_segments(
            src, np.zeros(1, U64), np.zeros(1, U64), [b"x" * 16], np.zeros(1, U64), np.zeros(1, U64), np.ones(1, U64)
        )
    with pytest.raises(ValueError, match="buffer index 3 out of range"):
        _native.copy_segments(
            src, np.zeros(1, U64), np.zeros(1, U64), dst, np.array([3], U64), np.zeros(1, U64), np.ones(1, U64)
        )
    with pytest.raises(ValueError, match="hashes has 3 entries"):
        _native.copy_segments(
            src,
            np.zeros(1, U64),
            np.zeros(1, U64),
            dst,
            np.zeros(1, U64),
            np.zeros(1, U64),
            np.ones(1, U64),
            np.zeros(3, U64),
        )


def test_address_plans_reject_null_pointers_and_bad_destinations():
    dst = [np.zeros(8, np.uint8)]
    with pytest.raises(ValueError, match="null source address"):
        _native.gather(np.zeros(1, U64), np.ones(1, U64), dst, np.zeros(1, U64), np.zeros(1, U64))
    src = np.ones(8, np.uint8)
    with pytest.raises(ValueError, match="destination range"):
        _native.gather(np.array([src.ctypes.data], U64), np.array([9], U64), dst, np.zeros(1, U64), np.zeros(1, U64))
    with pytest.raises(ValueError, match="null destination address"):
        _native.scatter([src], np.zeros(1, U64), np.zeros(1, U64), np.ones(1, U64), np.zeros(1, U64))
    with pytest.raises(ValueError, match="source range"):
        _native.scatter(
            [src], np.zeros(1, U64), np.array([4], U64), np.array([5], U64), np.array([dst[0].ctypes.data], U64)
        )


def test_kernels_are_safe_to_call_from_many_threads_at_once():
    rng = np.random.default_rng(11)
    rows = [rng.integers(0, 256, (512, 1000), dtype=np.uint8) for _ in range(8)]
    expected = [[xxhash.xxh3_64_intdigest(r.tobytes()) for r in block] for block in rows]
    barrier = threading.Barrier(8)

    def work(k: int) -> bool:
        barrier.wait()
        ok = True
        for _ in range(5):
            out = np.empty(512, U64)
            _native.hash_rows(rows[k].reshape(-1), 1000, out)
            copy = np.empty_like(rows[k])
            n = np.arange(512, dtype=U64)
            hashes = np.empty(512, U64)
            _native.copy_segments([rows[k].reshape(-1)], np.zeros(512, U64), n * 1000, [copy.reshape(-1)],
                                  np.zeros(512, U64), n * 1000, np.full(512, 1000, U64), hashes)
            ok &= out.tolist() == expected[k] and hashes.tolist() == expected[k] and np.array_equal(copy, rows[k])
        return ok

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(work, range(8)))


def test_thread_setting_round_trips():
    default = _native.max_threads()
    try:
        _native.set_max_threads(1)
        assert _native.max_threads() == 1
        src = np.random.default_rng(2).integers(0, 256, 4 << 20, dtype=np.uint8)
        out1 = np.empty(4096, U64)
        _native.hash_rows(src, 1024, out1)
        _native.set_max_threads(4)
        out4 = np.empty(4096, U64)
        _native.hash_rows(src, 1024, out4)
        assert np.array_equal(out1, out4)
    finally:
        _native.set_max_threads(0)
    assert _native.max_threads() == default


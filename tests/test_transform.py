"""Byte-plane transform and XOR segments (csrc/transform.cpp, csrc/copy.cpp) against numpy references."""

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


def reference_split(data: np.ndarray, width: int) -> np.ndarray:
    """Planes, most significant byte first, then the trailing bytes as they are."""
    whole = len(data) // width * width
    planes = data[:whole].reshape(-1, width)[:, ::-1].T.reshape(-1)
    return np.concatenate([planes, data[whole:]])


@given(st.binary(max_size=3000), st.sampled_from([1, 2, 3, 4, 5, 8, 16]))
def test_split_and_merge_match_the_reference_for_any_length(raw, width):
    data = np.frombuffer(raw, dtype=np.uint8)
    planes = np.full(len(data), 0xAB, np.uint8)
    _native.split_byte_planes(data, planes, width)
    assert np.array_equal(planes, reference_split(data, width))
    back = np.full(len(data), 0xCD, np.uint8)
    _native.merge_byte_planes(planes, back, width)
    assert np.array_equal(back, data)


@given(st.integers(0, 700), st.sampled_from([1, 2, 3, 4, 8, 16]), st.booleans())
def test_merge_from_separate_planes_matches_the_contiguous_merge(n, width, as_bytes):
    data = np.random.default_rng(n).integers(0, 256, n * width, dtype=np.uint8)
    planes = reference_split(data, width)
    separate = [planes[p * n : (p + 1) * n].copy() for p in range(width)]
    if as_bytes:  # zstd hands back bytes; raw planes are slices of a mapping
        separate = [p.tobytes() for p in separate]
    out = np.full(len(data), 0xEE, np.uint8)
    _native.merge_byte_planes_from(separate, out, width)
    assert np.array_equal(out, data)


def test_merge_from_planes_checks_its_arguments():
    out = np.zeros(8, np.uint8)
    with pytest.raises(ValueError, match="expected 4 planes, got 3"):
        _native.merge_byte_planes_from([b"ab"] * 3, out, 4)
    with pytest.raises(ValueError, match="each plane must hold 2"):
        _native.merge_byte_planes_from([b"ab", b"ab", b"abc", b"ab"], out, 4)
    with pytest.raises(ValueError, match="not whole elements"):
        _native.merge_byte_planes_from([b"ab"] * 4, np.zeros(9, np.uint8), 4)
    with pytest.raises(ValueError, match="overlaps dst"):
        _native.merge_byte_planes_from([out[:2], b"ab", b"ab", b"ab"], out, 4)
    with pytest.raises(ValueError, match="width must be"):
        _native.merge_byte_planes_from([], out, 0)
    with pytest.raises(TypeError, match="writable"):
        _native.merge_byte_planes_from([b"ab"] * 4, bytes(8), 4)


@pytest.mark.parametrize("width", [1, 2, 4, 8])
def test_large_inputs_split_across_threads_equal_the_single_thread_result(width):
    data = np.random.default_rng(width).integers(0, 256, (3 << 20) + 5, dtype=np.uint8)
    many, one = np.empty_like(data), np.empty_like(data)
    _native.split_byte_planes(data, many, width)
    default = _native.max_threads()
    try:
        _native.set_max_threads(1)
        _native.split_byte_planes(data, one, width)
    finally:
        _native.set_max_threads(0)
    assert _native.max_threads() == default
    assert np.array_equal(many, one) and np.array_equal(many, reference_split(data, width))
    back = np.empty_like(data)
    _native.merge_byte_planes(many, back, width)
    assert np.array_equal(back, data)
    whole = len(data) // width * width
    n = whole // width
    back_from = np.empty(whole, np.uint8)
    _native.merge_byte_planes_from([many[p * n : (p + 1) * n] for p in range(width)], back_from, width)
    assert np.array_equal(back_from, data[:whole])


def test_float32_planes_put_sign_and_exponent_first():
    values = np.array([1.0, -2.0, 0.5], dtype="<f4")
    planes = np.empty(12, np.uint8)
    _native.split_byte_planes(values.view(np.uint8), planes, 4)
    assert planes[:3].tolist() == [0x3F, 0xC0, 0x3F]  # the top byte of each value


def test_transforms_reject_bad_arguments():
    src = np.zeros(8, np.uint8)
    with pytest.raises(ValueError, match="width must be"):
        _native.split_byte_planes(src, np.zeros(8, np.uint8), 0)
    with pytest.raises(ValueError, match="width must be"):
        _native.merge_byte_planes(src, np.zeros(8, np.uint8), _native.MAX_PLANE_WIDTH + 1)
    with pytest.raises(ValueError, match="exactly the 8 bytes"):
        _native.split_byte_planes(src, np.zeros(9, np.uint8), 4)
    with pytest.raises(TypeError, match="writable"):
        _native.split_byte_planes(src, bytes(8), 4)
    with pytest.raises(ValueError, match="overlap"):
        _native.split_byte_planes(src[:4], src[2:6], 2)
    with pytest.raises(TypeError, match="C-contiguous"):
        _native.merge_byte_planes(np.zeros(16, np.uint8)[::2], np.zeros(8, np.uint8), 4)


@given(st.lists(st.binary(max_size=200), max_size=12), st.booleans())
def test_xor_segments_xor_the_source_into_the_destination_and_hash_the_result(pieces, with_hashes):
    sources = [np.frombuffer(p, np.uint8).copy() for p in pieces]
    rng = np.random.default_rng(len(pieces))
    dst = rng.integers(0, 256, sum(len(p) for p in pieces), dtype=np.uint8)
    expected = dst.copy()
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in pieces])])[:-1].astype(U64)
    for s, at in zip(sources, offsets):
        expected[int(at) : int(at) + len(s)] ^= s
    hashes = np.empty(len(pieces), U64) if with_hashes else None
    n = len(pieces)
    _native.copy_segments(sources, np.arange(n, dtype=U64), np.zeros(n, U64), [dst], np.zeros(n, U64), offsets,
                          np.array([len(p) for p in pieces], U64), hashes, xor=True)
    assert np.array_equal(dst, expected)
    if with_hashes:
        assert hashes.tolist() == [
            xxhash.xxh3_64_intdigest(expected[int(a) : int(a) + len(s)].tobytes()) for s, a in zip(sources, offsets)
        ]


def test_large_xor_is_split_across_threads_correctly():
    rng = np.random.default_rng(9)
    a = rng.integers(0, 256, (6 << 20) + 3, dtype=np.uint8)
    b = rng.integers(0, 256, len(a), dtype=np.uint8)
    dst = b.copy()
    z = np.zeros(1, U64)
    _native.copy_segments([a], z, z, [dst], z, z, np.array([len(a)], U64), xor=True)
    assert np.array_equal(dst, a ^ b)


def test_transforms_are_safe_to_call_from_many_threads_at_once():
    rng = np.random.default_rng(4)
    blocks = [rng.integers(0, 256, 300_001, dtype=np.uint8) for _ in range(8)]
    barrier = threading.Barrier(8)

    def work(k: int) -> bool:
        barrier.wait()
        ok = True
        for width in (2, 4, 8):
            planes = np.empty_like(blocks[k])
            back = np.empty_like(blocks[k])
            _native.split_byte_planes(blocks[k], planes, width)
            _native.merge_byte_planes(planes, back, width)
            ok &= np.array_equal(back, blocks[k]) and np.array_equal(planes, reference_split(blocks[k], width))
        return ok

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(work, range(8)))

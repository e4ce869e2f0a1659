"""Zstandard frames inside stored planes: every decode is bounded by the plane size the header gives.

Frames that declare another content size (1 TiB, a few GiB, one byte too
many) are rejected before anything is allocated; frames that omit their
content size are valid Zstandard and decode, bounded; bytes after a frame
inside a stored plane are rejected. The memory bounds are checked in child
processes whose address space is capped.
"""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import zstandard
from helpers import ffnn_models, mixed_models
from hypothesis import given, settings
from hypothesis import strategies as st
from limited import run_limited

import mmpack
from mmpack import Compression, IntegrityError, ModelSet, compression

MAGIC = struct.pack("<I", 0xFD2FB528)


def _frame(plane: bytes, *, content_size: bool = True, level: int = 3) -> bytes:
    return zstandard.ZstdCompressor(level=level, write_content_size=content_size).compress(plane)


def _with_header(frame: bytes, *, declared: int | None, window_log: int = 17) -> bytes:
    """``frame`` with its header rewritten: 8-byte content size ``declared``, or none (then a
    window of ``2**window_log`` bytes); checksum and blocks kept."""
    descriptor = frame[4]
    checksum = descriptor & 0x04
    body = frame[zstandard.frame_header_size(frame) :]
    if declared is None:
        return MAGIC + bytes([checksum, (window_log - 10) << 3]) + body
    # Single segment: the window is the content size, as zstd writes for known sizes.
    return MAGIC + bytes([0xC0 | 0x20 | checksum]) + struct.pack("<Q", declared) + body


def _decode(stored: bytes, n: int) -> np.ndarray:
    out = np.empty(n, np.uint8)
    compression.decode_chunk(np.frombuffer(stored, np.uint8), [len(stored)], 1, out)
    return out


def _plane(n: int, seed: int = 0) -> bytes:
    # Few distinct values in runs: compresses well, like an exponent plane.
    rng = np.random.default_rng(seed)
    return np.repeat(rng.integers(0, 4, -(-n // 8), dtype=np.uint8), 8)[:n].tobytes()


@given(st.integers(64, 300_000), st.integers(0, 2**32 - 1), st.sampled_from([1, 3, 19]))
@settings(max_examples=40, deadline=None)
def test_frames_without_a_content_size_decode(n, seed, level):
    plane = _plane(n, seed)
    frame = _frame(plane, content_size=False, level=level)
    assert zstandard.get_frame_parameters(frame).content_size == zstandard.CONTENTSIZE_UNKNOWN
    assert _decode(frame, n).tobytes() == plane


@given(st.integers(64, 100_000), st.integers(0, 2**32 - 1), st.booleans(), st.integers(1, 2**40))
@settings(max_examples=60, deadline=None)
def test_a_frame_declaring_another_size_is_rejected(n, seed, known, declared):
    plane = _plane(n, seed)
    frame = _with_header(_frame(plane), declared=declared if declared != n else n + 1)
    with pytest.raises(IntegrityError, match="declares|decode"):
        _decode(frame, n)
    if not known:  # the same frame without a size, but longer or shorter than the plane
        longer = _frame(plane + b"\x01", content_size=False)
        with pytest.raises(IntegrityError, match="decode"):
            _decode(longer, n)
        shorter = _frame(plane[:-1], content_size=False)
        with pytest.raises(IntegrityError, match="decode"):
            _decode(shorter, n)


@given(st.integers(1_000, 100_000), st.binary(min_size=1, max_size=64), st.booleans())
@settings(max_examples=40, deadline=None)
def test_bytes_after_the_frame_are_rejected(n, extra, content_size):
    frame = _frame(_plane(n), content_size=content_size)
    with pytest.raises(IntegrityError):
        _decode(frame + extra, n)


def test_garbage_and_skippable_frames_are_rejected():
    n = 10_000
    with pytest.raises(IntegrityError, match="frame header"):
        _decode(b"\x00" * 100, n)
    skippable = struct.pack("<II", 0x184D2A50, 4) + b"abcd"
    with pytest.raises(IntegrityError):
        _decode(skippable, n)


def test_a_frame_asking_for_a_huge_window_is_rejected():
    frame = _with_header(_frame(_plane(5000)), declared=None, window_log=31)
    with pytest.raises(IntegrityError, match="decode"):
        _decode(frame, 5000)


_FORGED_DECODE = """
import numpy as np, struct, zstandard
from mmpack import compression

n = 1 << 20
plane = np.repeat(np.arange(n // 4096, dtype=np.uint8), 4096).tobytes()
frame = zstandard.ZstdCompressor(level=3).compress(plane)
body = frame[zstandard.frame_header_size(frame):]
descriptor = frame[4] & 0x04
if {declared} is None:
    forged = struct.pack("<I", 0xFD2FB528) + bytes([descriptor, (31 - 10) << 3]) + body
else:
    forged = struct.pack("<I", 0xFD2FB528) + bytes([0xE0 | descriptor]) + struct.pack("<Q", {declared}) + body

def read():
    out = np.empty(n, np.uint8)
    compression.decode_chunk(np.frombuffer(forged, np.uint8), [len(forged)], 1, out)
"""


@pytest.mark.parametrize(
    "declared", [2**40, 6 << 30, 600 << 20, None], ids=["1TiB", "6GiB", "600MiB", "no-size-2GiB-window"]
)
def test_forged_frame_sizes_fail_typed_within_a_small_memory_budget(declared):
    # Before: 1 TiB raised a plain MemoryError, 6 GiB allocated 6 GiB before failing.
    result = run_limited(_FORGED_DECODE.format(declared=declared), budget_bytes=256 << 20)
    assert result.survived, result
    assert result.outcome == "typed" and result.error == "IntegrityError", result


def _save_with(ms, compressor_options, **kwargs) -> bytes:
    """Save ``ms`` compressed, with the writer's zstd contexts built with other options."""
    original = compression._compressor

    def patched(level):
        return zstandard.ZstdCompressor(level=level, **compressor_options)

    compression._compressor = patched
    try:
        buffer = io.BytesIO()
        mmpack.save(ms, buffer, compression=Compression(codec="zstd", **kwargs))
        return buffer.getvalue()
    finally:
        compression._compressor = original


@pytest.mark.parametrize("build", [lambda: ffnn_models(40), lambda: mixed_models(6)], ids=["ffnn48", "mixed-dtypes"])
def test_files_whose_frames_omit_their_size_load_whole_and_in_part(build):
    ms = ModelSet.from_modules(build())
    blob = _save_with(ms, {"write_content_size": False}, chunk_bytes=4096)
    loaded = mmpack.load(io.BytesIO(blob))
    assert loaded.equal(ms)
    assert mmpack.load(io.BytesIO(blob), indices=[len(ms) - 1, 0]).equal(ms.select([len(ms) - 1, 0]))


def test_a_file_with_bytes_after_a_frame_inside_a_plane_is_rejected():
    ms = ModelSet.from_modules(ffnn_models(40))
    blob = bytearray(_save_with(ms, {"write_content_size": True}))
    header = mmpack.fileformat.read_header(mmpack._io.FileReader(io.BytesIO(bytes(blob))))
    chunking = header.layout.chunking
    j = 1  # fc2.weight: chunk 0's exponent plane is a frame well below the plane's size
    stored = chunking.lengths[j][0]
    at = header.data_start + header.layout.tensor_offsets[j]
    plane = zstandard.ZstdDecompressor().decompress(bytes(blob[at : at + stored]))
    assert stored < len(plane)
    # The same plane in a shorter frame, followed by zeros up to the stored length: the
    # header stays valid, the frame decodes exactly, and only the trailing bytes are wrong.
    shorter = zstandard.ZstdCompressor(level=19).compress(plane)
    if len(shorter) >= stored:
        shorter = _frame(plane[: len(plane) // 2] + plane[len(plane) // 2 :], level=22)
    assert len(shorter) < stored
    blob[at : at + stored] = shorter + bytes(stored - len(shorter))
    with pytest.raises(IntegrityError, match="unused data|decode"):
        mmpack.load(io.BytesIO(bytes(blob)))

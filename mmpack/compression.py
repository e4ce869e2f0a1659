"""Compression settings, and the zstd codec of format version 2: byte planes, then Zstandard, in chunks.

The settings (:class:`Compression`) choose between this codec and the rANS
codec of format version 3 (``mmpack/rans.py``). The zstd encoding is
specified in docs/FORMAT.md ("Compressed objects (version 2)"). Each
tensor's stored rows are cut into chunks of about ``chunk_bytes`` raw bytes;
each chunk is split into byte planes by the native kernel (all most
significant bytes, then the next...), and each plane is stored as one
Zstandard frame, or as it is when the frame would not be shorter (the low
mantissa planes of trained float32 weights are noise: storing them raw costs
nothing and decodes at memcpy speed). Chunks are independent, so reading a
few models decodes only the chunks that hold them, and many chunks are
encoded or decoded at once on ``_native.max_threads()`` threads (zstandard
and the kernels release the GIL).

``zstandard`` is imported on first use, so mmpack without it still reads and
writes uncompressed objects.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from mmpack import _native
from mmpack.errors import CompressionError, FormatError, IntegrityError

CODEC = "zstd"
TRANSFORM = "byte-planes"
DELTA_NONE = "none"
DELTA_XOR = "xor"
DEFAULT_CHUNK_BYTES = 256 * 1024
_PARALLEL_MIN_BYTES = 1 << 20  # below this, threads cost more than they save

T = TypeVar("T")


CODECS = ("rans", CODEC)  # format version 3 (mmpack/rans.py), version 2 (zstd byte planes)
DEFAULT_CODEC = "rans"
DEFAULT_ZSTD_LEVEL = 3
# Chunks of the rans codec cost 84 bytes each (states and directory): a quarter of the zstd
# codec's size keeps that near 0.1 % and quarters what reading one model decodes (see
# DESIGN-NOTES, "Chunks of 64 KiB").
DEFAULT_RANS_CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True)
class Compression:
    """Compression(codec="rans", level=None, xor=True, chunk_bytes=None)

    How to compress the data objects a save writes. ``compression="rans"``
    (or ``"zstd"``) on :func:`mmpack.save` or :meth:`mmpack.Repository.save`
    means ``Compression(codec=...)``; pass an instance to change the defaults.

    ``codec``: ``"rans"`` (format version 3, the default: each element's
    fields, exponent with the top mantissa bits first, rANS-coded with
    tables per tensor; smaller and faster both ways) or ``"zstd"`` (format
    version 2: byte planes and Zstandard frames, for readers of mmpack
    before version 3). ``level``: the Zstandard level (1-22, default 3) of
    the zstd codec; the rans codec has no levels (``level`` stays None). ``xor``: Update versions
    store each changed row XORed with its value in the chain's full
    version, which fine-tuned weights share sign, exponent and high mantissa
    bits with (see docs/DESIGN-NOTES.md). ``chunk_bytes``: raw bytes per
    independently decodable chunk (default 65536 for rans, 262144 for
    zstd); smaller chunks make reading a few models cheaper and compress
    slightly worse.

    Example::

        repo.save(models, compression=mmpack.Compression(codec="zstd", level=9))
    """

    codec: str = DEFAULT_CODEC
    level: int | None = None
    xor: bool = True
    chunk_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise CompressionError(f"unknown codec {self.codec!r}; mmpack compresses with 'rans' or 'zstd'")
        if self.codec == CODEC and self.level is None:
            object.__setattr__(self, "level", DEFAULT_ZSTD_LEVEL)  # so that equal settings compare equal
        if self.level is not None:
            if self.codec != CODEC:
                raise CompressionError(
                    f"level is a zstd setting; the {self.codec!r} codec has none "
                    f"(use Compression(codec='zstd', level={self.level!r}))"
                )
            if type(self.level) is not int or not 1 <= self.level <= 22:
                raise CompressionError(f"zstd level must be an integer from 1 to 22, got {self.level!r}")
        if self.chunk_bytes is None:
            default = DEFAULT_CHUNK_BYTES if self.codec == CODEC else DEFAULT_RANS_CHUNK_BYTES
            object.__setattr__(self, "chunk_bytes", default)
        if type(self.chunk_bytes) is not int or self.chunk_bytes < 1:
            raise CompressionError(f"chunk_bytes must be a positive integer, got {self.chunk_bytes!r}")
        if not isinstance(self.xor, bool):
            raise CompressionError(f"xor must be True or False, got {self.xor!r}")

    @property
    def zstd_level(self) -> int:
        """The Zstandard level the zstd codec uses (``level``, or 3)."""
        return DEFAULT_ZSTD_LEVEL if self.level is None else self.level

    def describe(self) -> str:
        """Short form for records: ``"rans"``, ``"zstd-3"``."""
        return f"{self.codec}-{self.zstd_level}" if self.codec == CODEC else self.codec

    @classmethod
    def described(cls, text: str) -> Compression:
        """The setting a record's ``describe()`` text stands for (chunk size and XOR aside)."""
        codec, _, level = text.partition("-")
        if codec == CODEC:
            return cls(codec=CODEC, level=int(level) if level.isdigit() else None)
        return cls(codec=codec) if codec in CODECS else cls()


def resolve(compression: str | Compression | None) -> Compression | None:
    """resolve(compression) -> Compression or None

    Normalise a ``compression=`` argument: ``None`` or ``"none"`` (store
    raw), ``"rans"``, ``"zstd"``, or a :class:`Compression`. Anything else
    raises :class:`~mmpack.CompressionError`.

    Example::

        assert resolve("rans") == Compression()
    """
    if compression is None or isinstance(compression, Compression):
        return compression
    if isinstance(compression, str):
        if compression == "none":
            return None
        if compression in CODECS:
            return Compression(codec=compression)
    raise CompressionError(
        f"unknown compression {compression!r}; use None, 'rans', 'zstd' or mmpack.Compression(...)"
    )


@functools.cache
def element_width(dtype: torch.dtype) -> int:
    """Bytes per element that the byte planes split (one component of a complex value)."""
    size = torch.empty((), dtype=dtype).element_size()
    return size // 2 if dtype.is_complex else size


def rows_per_chunk(row_bytes: int, chunk_bytes: int) -> int:
    """Rows of ``row_bytes`` that fit ``chunk_bytes`` (at least one)."""
    return max(1, chunk_bytes // max(row_bytes, 1))


def _zstd() -> Any:
    try:
        import zstandard
    except ImportError:
        raise CompressionError(
            "compressed objects need the 'zstandard' package: pip install zstandard (or mmpack[zstd])"
        ) from None
    return zstandard


_local = threading.local()


def _compressor(level: int) -> Any:
    # zstd contexts are not thread-safe and are costly to create: one per thread and level.
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    found = cache.get(level)
    if found is None:
        zstandard = _zstd()
        # Byte planes hold few distinct values in long random runs: short matches cost more
        # than the literals they replace. A minimum match of 7 bytes brought the exponent
        # planes of trained FFNN-48 weights from 40.5 % to 36.3 % at level 3 (entropy: 33 %),
        # and only makes the encoder faster. Decoders are unaffected.
        params = zstandard.ZstdCompressionParameters.from_level(
            level, min_match=7, write_checksum=0, write_content_size=1
        )
        found = cache[level] = zstandard.ZstdCompressor(compression_params=params)
    return found


def _decompressor(window_log: int) -> Any:
    # One per thread and window bound: a context caps the window a frame may ask for.
    cache = getattr(_local, "decompressors", None)
    if cache is None:
        cache = _local.decompressors = {}
    found = cache.get(window_log)
    if found is None:
        found = cache[window_log] = _zstd().ZstdDecompressor(max_window_size=1 << window_log)
    return found


# A frame that omits its content size is decoded by streaming through a window
# the frame declares; allow what zstd's levels up to 19 use without a known size
# (8 MiB), or the plane's own size if larger, and nothing above.
_MIN_WINDOW_LOG = 23


_pool_lock = threading.Lock()
_pool: tuple[int, ThreadPoolExecutor] | None = None


def parallel_map(function: Callable[[Any], T], items: Sequence[Any], total_bytes: int) -> list[T]:
    """``[function(x) for x in items]``, on the kernels' thread count when the job is large."""
    threads = min(_native.max_threads(), len(items))
    if threads <= 1 or total_bytes < _PARALLEL_MIN_BYTES:
        return [function(x) for x in items]
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != threads:
            if _pool is not None:
                _pool[1].shutdown(wait=False)
            _pool = (threads, ThreadPoolExecutor(threads, thread_name_prefix="mmpack-zstd"))
        pool = _pool[1]
    return list(pool.map(function, items))


def encode_rows(
    data: np.ndarray, n_rows: int, row_bytes: int, width: int, chunk_rows: int, level: int
) -> tuple[list[np.ndarray], list[int]]:
    """Encode the ``n_rows`` contiguous rows in ``data`` (uint8) chunk by chunk: the stored
    planes, in file order, and their stored lengths (``n_chunks * width`` of them)."""
    starts = range(0, n_rows, chunk_rows)

    def encode_chunk(first: int) -> list[np.ndarray]:
        raw = data[first * row_bytes : min(first + chunk_rows, n_rows) * row_bytes]
        planes = np.empty_like(raw)
        _native.split_byte_planes(raw, planes, width)
        n = len(raw) // width
        stored = []
        for p in range(width):
            plane = planes[p * n : (p + 1) * n]
            frame = _compressor(level).compress(plane) if n else b""
            stored.append(np.frombuffer(frame, np.uint8) if len(frame) < n else plane)
        return stored

    pieces = [plane for chunk in parallel_map(encode_chunk, starts, len(data)) for plane in chunk]
    return pieces, [len(p) for p in pieces]


def decode_chunk(stored: np.ndarray | memoryview, plane_lengths: Sequence[int], width: int, out: np.ndarray) -> None:
    """Decode one chunk (its stored planes, back to back) into ``out``, its raw row bytes.

    Raw planes are merged straight from ``stored`` and zstd frames from the
    decoder's output: no plane is copied before the merge. Every frame is
    decoded into at most its plane's size (``len(out) // width``, which the
    validated header gives): a frame that declares another content size is
    rejected before anything is allocated, one that omits it is decoded with
    that bound, and bytes after the frame are rejected.
    """
    n = len(out) // width
    planes: list[Any] = []
    position = 0
    for length in plane_lengths:
        piece = stored[position : position + length]
        position += length
        planes.append(piece if length == n else _decode_plane(piece, n))
    _native.merge_byte_planes_from(planes, out, width)


def _decode_plane(frame: np.ndarray | memoryview, n: int) -> bytes:
    """One stored Zstandard frame that must decode to exactly ``n`` bytes."""
    zstandard = _zstd()
    try:
        declared = zstandard.get_frame_parameters(frame).content_size
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"a compressed plane has no valid frame header ({exc}): the data is corrupt") from None
    if declared != zstandard.CONTENTSIZE_UNKNOWN and declared != n:
        raise IntegrityError(
            f"a compressed plane's frame declares {declared} bytes, its header gives {n}: the data is corrupt"
        )
    window_log = min(31, max(_MIN_WINDOW_LOG, (n - 1).bit_length()))
    try:
        decoded = _decompressor(window_log).decompress(frame, max_output_size=n, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"a compressed plane does not decode to {n} bytes ({exc}): the data is corrupt") from None
    if len(decoded) != n:
        raise IntegrityError(f"a compressed plane decodes to {len(decoded)} bytes, not {n}: the data is corrupt")
    return decoded


@dataclass(frozen=True)
class Chunking:
    """The ``compression`` object of a version 2 header, validated against the layout it describes.

    ``lengths[j]`` lists the stored length of every plane of every chunk of
    tensor j (chunk-major); ``widths[j]`` is that tensor's element width.
    """

    delta: str
    chunk_rows: tuple[int, ...]
    lengths: tuple[tuple[int, ...], ...]
    widths: tuple[int, ...]
    # Start of every chunk within its tensor's section, plus the section's end.
    starts: tuple[np.ndarray, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        starts = []
        for lengths, width in zip(self.lengths, self.widths):
            per_chunk = np.asarray(lengths, dtype=np.int64).reshape(-1, width).sum(axis=1)
            starts.append(np.concatenate([[0], np.cumsum(per_chunk)]).astype(np.int64))
        object.__setattr__(self, "starts", tuple(starts))

    def section_length(self, j: int) -> int:
        return int(self.starts[j][-1])

    def to_json(self) -> dict[str, Any]:
        return {
            "codec": CODEC,
            "transform": TRANSFORM,
            "delta": self.delta,
            "chunk_rows": list(self.chunk_rows),
            "chunks": [list(x) for x in self.lengths],
        }

    @classmethod
    def from_json(cls, data: object, widths: Sequence[int], row_bytes: Sequence[int], rows: Sequence[int]) -> Chunking:
        """Parse and check a header's ``compression`` object; ``rows[j]`` is tensor j's stored row count."""
        n = len(widths)
        chunk_rows, chunks = check_compression_object(data, set(), CODEC, TRANSFORM, n, "stored plane lengths")
        for j in range(n):
            stored, width = chunks[j], widths[j]
            n_chunks = -(-rows[j] // chunk_rows[j])
            # Counted before anything is built: a forged header cannot make the reader allocate.
            if len(stored) != n_chunks * width:
                raise FormatError(f"tensor #{j} has {len(stored)} stored planes, its rows make {n_chunks * width}")
            for k, length in enumerate(stored):
                plane = _plane_bytes(chunk_rows[j], rows[j], row_bytes[j], width, k // width)
                if not _is_int(length, 0) or length > plane:
                    raise FormatError(
                        f"tensor #{j}: stored plane {k} has length {length!r}, above its {plane} raw bytes"
                    )
        return cls(data["delta"], tuple(chunk_rows), tuple(tuple(c) for c in chunks), tuple(widths))


def check_compression_object(
    data: object, extra_keys: set[str], codec: str, transform: str, n: int, chunks_are: str
) -> tuple[list, list]:
    """Checks shared by the ``compression`` objects of both versions: exactly the version's keys,
    its codec and transform, a known delta, and a positive ``chunk_rows`` and a ``chunks`` list per
    tensor (``n`` of them). Returns ``(chunk_rows, chunks)``."""
    keys = {"codec", "transform", "delta", "chunk_rows", "chunks"} | extra_keys
    if not isinstance(data, dict) or set(data) != keys:
        raise FormatError(f"compression must be an object with keys {sorted(keys)}")
    if data["codec"] != codec or data["transform"] != transform:
        raise FormatError(f"unsupported codec {data['codec']!r} with transform {data['transform']!r}")
    if data["delta"] not in (DELTA_NONE, DELTA_XOR):
        raise FormatError(f"unsupported delta {data['delta']!r}")
    chunk_rows, chunks = data["chunk_rows"], data["chunks"]
    if not (isinstance(chunk_rows, list) and len(chunk_rows) == n and all(_is_int(r, 1) for r in chunk_rows)):
        raise FormatError(f"chunk_rows must list a positive row count for each of the {n} tensors")
    if not (isinstance(chunks, list) and len(chunks) == n and all(isinstance(c, list) for c in chunks)):
        raise FormatError(f"chunks must list the {chunks_are} of each of the {n} tensors")
    return chunk_rows, chunks


def _plane_bytes(chunk_rows: int, rows: int, row_bytes: int, width: int, chunk: int) -> int:
    return (min(chunk_rows, rows - chunk * chunk_rows) * row_bytes) // width


def _is_int(value: object, minimum: int) -> bool:
    return type(value) is int and minimum <= value < 2**63

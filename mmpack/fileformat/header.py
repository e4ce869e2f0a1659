"""Preamble and header of mmpack objects (docs/FORMAT.md): constants, layouts, parsing."""

from __future__ import annotations

import functools
import json
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmpack import _json, _native
from mmpack.architecture import Architecture
from mmpack.compression import Chunking, element_width
from mmpack.errors import FormatError, IntegrityError, MMPackError, UnsupportedFormatVersionError
from mmpack.rans import RansChunking
from mmpack.store.base import Reader

MAGIC = b"\x89MMPACK\n"
FORMAT_VERSION = 1  # what uncompressed objects are written as
COMPRESSED_FORMAT_VERSION = 2  # version 1 plus zstd-compressed tensor sections
RANS_FORMAT_VERSION = 3  # version 1 plus rANS-coded tensor sections
READABLE_VERSIONS = (FORMAT_VERSION, COMPRESSED_FORMAT_VERSION, RANS_FORMAT_VERSION)
ALIGNMENT = 64
MAX_HEADER_BYTES = 16 * 2**20
MAX_DATA_BYTES = 2**62  # a data section this large cannot be a file; offsets stay far from u64 overflow
HASH_ALGORITHM = "xxh3-64"
STACKED = "stacked"
ROWS = "rows"
PREAMBLE = struct.Struct("<8sIIQQ")
ZEROS = bytes(ALIGNMENT)
_COMMON_KEYS = {"n_models", "architecture", "layout", "alignment", "tensors", "hashes", "data_length", "metadata"}
_KEYS = {STACKED: _COMMON_KEYS, ROWS: _COMMON_KEYS | {"row_index"}}


def align(offset: int) -> int:
    """``offset`` rounded up to the format's alignment."""
    return -(-offset // ALIGNMENT) * ALIGNMENT


def check_host() -> None:
    if sys.byteorder != "little":
        raise MMPackError("mmpack stores little-endian data and does not run on big-endian hosts")


@dataclass(frozen=True)
class Layout:
    """Where each section of the data section starts, derived from what the object holds.

    ``rows[j]`` is the number of stored rows of tensor j: ``n_models`` for the
    stacked layout, the number of changed models for the rows layout, whose
    model ids then sit in the row index. ``chunking`` describes compressed
    tensor sections (format version 2 for :class:`Chunking`, 3 for
    :class:`~mmpack.rans.RansChunking`); None for raw ones.
    """

    kind: str
    rows: tuple[int, ...]
    tensor_offsets: tuple[int, ...]
    tensor_lengths: tuple[int, ...]
    row_index_offset: int
    row_index_length: int
    hashes_offset: int
    hashes_length: int
    data_length: int
    chunking: Chunking | RansChunking | None = None

    @classmethod
    def stacked(
        cls, architecture: Architecture, n_models: int, chunking: Chunking | RansChunking | None = None
    ) -> Layout:
        return cls._build(STACKED, architecture, n_models, (n_models,) * len(architecture), chunking)

    @classmethod
    def of_rows(
        cls,
        architecture: Architecture,
        n_models: int,
        rows: Sequence[int],
        chunking: Chunking | RansChunking | None = None,
    ) -> Layout:
        return cls._build(ROWS, architecture, n_models, tuple(rows), chunking)

    @classmethod
    def _build(
        cls, kind: str, architecture: Architecture, n_models: int, rows: tuple[int, ...],
        chunking: Chunking | RansChunking | None,
    ) -> Layout:
        offsets, lengths, end = [], [], 0
        for j, (spec, count) in enumerate(zip(architecture.tensors, rows)):
            offsets.append(align(end))
            lengths.append(count * spec.nbytes if chunking is None else chunking.section_length(j))
            end = offsets[-1] + lengths[-1]
        index_offset, index_length = end, 0
        if kind == ROWS:
            index_offset, index_length = align(end), 4 * sum(rows)
            end = index_offset + index_length
        hashes_offset = align(end)
        hashes_length = n_models * len(architecture) * 8
        return cls(
            kind, rows, tuple(offsets), tuple(lengths), index_offset, index_length,
            hashes_offset, hashes_length, hashes_offset + hashes_length, chunking,
        )

    @property
    def version(self) -> int:
        """The format version an object with this layout is written as."""
        if self.chunking is None:
            return FORMAT_VERSION
        return RANS_FORMAT_VERSION if isinstance(self.chunking, RansChunking) else COMPRESSED_FORMAT_VERSION

    @property
    def tail_offset(self) -> int:
        """Where the object's *tail* starts: the row index (rows layout) or the hash table. The
        tail runs to the end of the object; its XXH3-64 is the pin a manifest records."""
        return self.row_index_offset if self.kind == ROWS else self.hashes_offset

    def sections(self) -> list[tuple[int, int]]:
        """(offset, length) of every section in file order, for padding checks."""
        spans = list(zip(self.tensor_offsets, self.tensor_lengths))
        if self.kind == ROWS:
            spans.append((self.row_index_offset, self.row_index_length))
        spans.append((self.hashes_offset, self.hashes_length))
        return spans


@dataclass(frozen=True)
class PerTensor:
    """A header's numbers per tensor as int64 arrays, for planning reads without Python loops:
    stored ``rows``, where each section starts in the object (``starts``), ``row_bytes``, and for
    compressed objects ``chunk_rows`` and (version 3) the table block lengths ``tables``.
    ``table_blocks`` keeps, by tensor, the version 3 table blocks that chunks have decoded with:
    an object never changes, so a reader of it reads each block once (a header belongs to one
    opening of one object)."""

    rows: np.ndarray
    starts: np.ndarray
    row_bytes: np.ndarray
    chunk_rows: np.ndarray | None
    tables: np.ndarray | None
    table_blocks: dict[int, np.ndarray] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True)
class Header:
    """A parsed, validated header: what a reader knows before touching the data."""

    architecture: Architecture
    n_models: int
    layout: Layout
    data_start: int
    metadata: dict[str, str]
    header_hash: int

    @property
    def file_size(self) -> int:
        """Exact size of a well-formed object with this header."""
        return self.data_start + self.layout.data_length

    @functools.cached_property
    def per_tensor(self) -> PerTensor:
        """The layout's per-tensor numbers as arrays (computed once per header)."""
        layout, chunking = self.layout, self.layout.chunking

        def array(values) -> np.ndarray:
            return np.array(values, np.int64).reshape(-1)

        return PerTensor(
            array(layout.rows), self.data_start + array(layout.tensor_offsets),
            array([s.nbytes for s in self.architecture.tensors]),
            None if chunking is None else array(chunking.chunk_rows),
            array(chunking.tables) if isinstance(chunking, RansChunking) else None,
        )


def encode_header(
    architecture: Architecture, n_models: int, metadata: Mapping[str, str], layout: Layout | None = None
) -> tuple[bytes, Header]:
    """Preamble, header and padding, ready to write before the data section."""
    layout = layout or Layout.stacked(architecture, n_models)
    tensors: list[dict[str, int]] = [
        {"offset": o, "length": n} for o, n in zip(layout.tensor_offsets, layout.tensor_lengths)
    ]
    if layout.kind == ROWS:
        for entry, count in zip(tensors, layout.rows):
            entry["rows"] = count
    document: dict[str, Any] = {
        "n_models": n_models,
        "architecture": architecture.to_json(),
        "layout": layout.kind,
        "alignment": ALIGNMENT,
        "tensors": tensors,
        "hashes": {"algorithm": HASH_ALGORITHM, "offset": layout.hashes_offset, "length": layout.hashes_length},
        "data_length": layout.data_length,
        "metadata": dict(metadata),
    }
    if layout.kind == ROWS:
        document["row_index"] = {"offset": layout.row_index_offset, "length": layout.row_index_length}
    if layout.chunking is not None:
        document["compression"] = layout.chunking.to_json()
    body = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
    if len(body) > MAX_HEADER_BYTES:
        raise FormatError(f"header of {len(body)} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
    header_hash = _native.xxh3_64(body)
    preamble = PREAMBLE.pack(MAGIC, layout.version, 0, len(body), header_hash)
    data_start = align(len(preamble) + len(body))
    prefix = preamble + body + bytes(data_start - len(preamble) - len(body))
    return prefix, Header(architecture, n_models, layout, data_start, dict(metadata), header_hash)


def read_header(source: Reader) -> Header:
    """Read and validate the preamble and header of a model-set object."""
    check_host()
    size = source.size()
    if size == 0:
        raise FormatError("empty file: not an mmpack model-set file")
    preamble = source.read(0, min(size, PREAMBLE.size), "the preamble")
    if len(preamble) < PREAMBLE.size or preamble[:8] != MAGIC:
        raise FormatError("not an mmpack model-set file (bad magic bytes)")
    _, version, flags, header_length, header_hash = PREAMBLE.unpack(preamble)
    if version not in READABLE_VERSIONS:
        raise UnsupportedFormatVersionError(
            f"file has format version {version}; this mmpack reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))} (upgrade mmpack to read newer files)"
        )
    if flags != 0:
        raise FormatError(f"unknown flags {flags:#x} in preamble")
    if not 2 <= header_length <= MAX_HEADER_BYTES:
        raise FormatError(f"header length {header_length} outside 2..{MAX_HEADER_BYTES}")
    data_start = align(PREAMBLE.size + header_length)
    # The padding after the header comes with it: one read, and checked like all padding.
    padded = source.read(PREAMBLE.size, data_start - PREAMBLE.size, "the header")
    body, padding = padded[:header_length], padded[header_length:]
    if _native.xxh3_64(body) != header_hash:
        raise IntegrityError("header checksum mismatch: the file is corrupt")
    if padding != ZEROS[: len(padding)]:
        raise IntegrityError("non-zero padding after the header: the file is corrupt")
    parse = _parse_header if len(body) <= _CACHED_HEADER_BYTES else _parse_header.__wrapped__
    architecture, n_models, layout, metadata = parse(body, version)
    metadata = dict(metadata)  # the parse is cached and shared: hand out a copy of the mutable part
    return Header(architecture, n_models, layout, data_start, metadata, header_hash)


# Headers up to this size are cached by their bytes (a 5,000-model FFNN-48 header is
# about 1 KB, a compressed one 10 KB): the cache then holds at most 256 MiB of keys
# plus their parses, whatever objects a repository holds; larger headers are parsed
# each time.
_CACHED_HEADER_BYTES = 1 << 20


@functools.lru_cache(maxsize=256)
def _parse_header(body: bytes, version: int) -> tuple[Architecture, int, Layout, dict[str, str]]:
    # Cached by the exact (checksummed) header bytes: objects are immutable and
    # recovering a version reopens the same few headers again and again.
    try:
        document = _json.loads(body)
    except _json.Malformed as exc:
        raise FormatError(f"header is not valid JSON: {exc}") from None
    kind = document.get("layout") if isinstance(document, dict) else None
    if kind not in _KEYS:
        raise FormatError(f"unsupported layout {kind!r}; expected one of {sorted(_KEYS)}")
    expected_keys = _KEYS[kind] | ({"compression"} if version != FORMAT_VERSION else set())
    if set(document) != expected_keys:
        raise FormatError(
            f"a version {version} header of layout {kind!r} must have keys {sorted(expected_keys)}, "
            f"got {sorted(document)}"
        )
    n_models = document["n_models"]
    if not _is_count(n_models, 2**32):
        raise FormatError(f"malformed n_models {n_models!r}")
    if not _json.same(document["alignment"], ALIGNMENT):
        raise FormatError(f"unsupported alignment {document['alignment']!r}")
    architecture = Architecture.from_json(document["architecture"])
    if kind == STACKED:
        rows = [n_models] * len(architecture)
    else:
        rows = [t.get("rows") if isinstance(t, dict) else None for t in document["tensors"]]
        if len(rows) != len(architecture) or not all(_is_count(r, n_models + 1) for r in rows):
            raise FormatError(f"row counts {rows!r} do not fit {n_models} models")
    chunking: Chunking | RansChunking | None = None
    specs = architecture.tensors
    if version == COMPRESSED_FORMAT_VERSION:
        chunking = Chunking.from_json(
            document["compression"], [element_width(s.dtype) for s in specs], [s.nbytes for s in specs], rows
        )
    elif version == RANS_FORMAT_VERSION:
        chunking = RansChunking.from_json(
            document["compression"], [s.dtype for s in specs], [s.nbytes for s in specs], rows
        )
    if chunking is not None and kind == STACKED and chunking.delta != "none":
        raise FormatError("only rows-layout objects may hold XOR deltas")
    layout = Layout._build(kind, architecture, n_models, tuple(rows), chunking)
    expected_tensors = [{"offset": o, "length": n} for o, n in zip(layout.tensor_offsets, layout.tensor_lengths)]
    if kind == ROWS:
        for entry, count in zip(expected_tensors, layout.rows):
            entry["rows"] = count
        expected_index = {"offset": layout.row_index_offset, "length": layout.row_index_length}
        if not _json.same(document["row_index"], expected_index):
            raise FormatError(f"row index section {document['row_index']!r} is not {expected_index!r}")
    # Compared with their types: 64.0 and true are not the integers 64 and 1.
    if not _json.same(document["tensors"], expected_tensors):
        raise FormatError("tensor sections in the header do not follow the layout of FORMAT.md")
    expected_hashes = {"algorithm": HASH_ALGORITHM, "offset": layout.hashes_offset, "length": layout.hashes_length}
    if not _json.same(document["hashes"], expected_hashes):
        raise FormatError(f"hash section {document['hashes']!r} is not {expected_hashes!r}")
    if not _json.same(document["data_length"], layout.data_length):
        raise FormatError(f"data_length {document['data_length']!r} is not {layout.data_length}")
    if layout.data_length >= MAX_DATA_BYTES:
        raise FormatError(f"the header describes {layout.data_length} bytes of data, beyond the format's 2**62")
    metadata = document["metadata"]
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError("metadata must map strings to strings")
    return architecture, n_models, layout, metadata


def _is_count(value: object, limit: int) -> bool:
    return type(value) is int and 0 <= value < limit



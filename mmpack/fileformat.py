"""The one-file format for one model set (docs/FORMAT.md): ``save`` and ``load``.

Reading never unpickles and never imports: the header is JSON checked
against a fixed schema, and dtypes come from a fixed table.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

import numpy as np
import torch
from torch import nn

from mmpack import _io, _native, packing
from mmpack.architecture import Architecture
from mmpack.errors import FormatError, IntegrityError, MMPackError, UnsupportedFormatVersionError
from mmpack.modelset import ModelSet, normalize_indices

__all__ = ["load", "save"]

MAGIC = b"\x89MMPACK\n"
FORMAT_VERSION = 1
ALIGNMENT = 64
MAX_HEADER_BYTES = 16 * 2**20
HASH_ALGORITHM = "xxh3-64"
_PREAMBLE = struct.Struct("<8sIIQQ")
_HEADER_KEYS = {"n_models", "architecture", "layout", "alignment", "tensors", "hashes", "data_length", "metadata"}
_ZEROS = bytes(ALIGNMENT)

Target = str | os.PathLike[str] | BinaryIO


class Reader(Protocol):
    """Random access to the bytes of one stored object (a file, or a store's range reads)."""

    def size(self) -> int: ...

    def read(self, offset: int, size: int, what: str) -> bytes: ...

    def read_into(self, offset: int, target: memoryview, what: str) -> None: ...


def _align(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


@dataclass(frozen=True)
class Layout:
    """Where each section of the data section starts, derived from architecture and model count."""

    tensor_offsets: tuple[int, ...]
    tensor_lengths: tuple[int, ...]
    hashes_offset: int
    hashes_length: int
    data_length: int

    @classmethod
    def of(cls, architecture: Architecture, n_models: int) -> Layout:
        offsets, lengths, end = [], [], 0
        for spec in architecture.tensors:
            offsets.append(_align(end))
            lengths.append(n_models * spec.nbytes)
            end = offsets[-1] + lengths[-1]
        hashes_offset = _align(end)
        hashes_length = n_models * len(architecture) * 8
        return cls(tuple(offsets), tuple(lengths), hashes_offset, hashes_length, hashes_offset + hashes_length)


@dataclass(frozen=True)
class Header:
    """A parsed, validated header: what a reader knows before touching the data."""

    architecture: Architecture
    n_models: int
    layout: Layout
    data_start: int
    metadata: dict[str, str]

    @property
    def file_size(self) -> int:
        """Exact size of a well-formed file with this header."""
        return self.data_start + self.layout.data_length


def _check_host() -> None:
    if sys.byteorder != "little":
        raise MMPackError("mmpack stores little-endian data and does not run on big-endian hosts")


def encode_header(architecture: Architecture, n_models: int, metadata: Mapping[str, str]) -> tuple[bytes, Header]:
    """Preamble, header and padding, ready to write before the data section."""
    layout = Layout.of(architecture, n_models)
    document = {
        "n_models": n_models,
        "architecture": architecture.to_json(),
        "layout": "stacked",
        "alignment": ALIGNMENT,
        "tensors": [{"offset": o, "length": n} for o, n in zip(layout.tensor_offsets, layout.tensor_lengths)],
        "hashes": {"algorithm": HASH_ALGORITHM, "offset": layout.hashes_offset, "length": layout.hashes_length},
        "data_length": layout.data_length,
        "metadata": dict(metadata),
    }
    body = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
    if len(body) > MAX_HEADER_BYTES:
        raise FormatError(f"header of {len(body)} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
    preamble = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, 0, len(body), _native.xxh3_64(body))
    data_start = _align(len(preamble) + len(body))
    prefix = preamble + body + bytes(data_start - len(preamble) - len(body))
    return prefix, Header(architecture, n_models, layout, data_start, dict(metadata))


def read_header(source: Reader) -> Header:
    """Read and validate the preamble and header of a model-set object."""
    _check_host()
    size = source.size()
    if size == 0:
        raise FormatError("empty file: not an mmpack model-set file")
    preamble = source.read(0, min(size, _PREAMBLE.size), "the preamble")
    if len(preamble) < _PREAMBLE.size or preamble[:8] != MAGIC:
        raise FormatError("not an mmpack model-set file (bad magic bytes)")
    _, version, flags, header_length, header_hash = _PREAMBLE.unpack(preamble)
    if version != FORMAT_VERSION:
        raise UnsupportedFormatVersionError(
            f"file has format version {version}; this mmpack reads version {FORMAT_VERSION} "
            "(upgrade mmpack to read newer files)"
        )
    if flags != 0:
        raise FormatError(f"unknown flags {flags:#x} in preamble")
    if not 2 <= header_length <= MAX_HEADER_BYTES:
        raise FormatError(f"header length {header_length} outside 2..{MAX_HEADER_BYTES}")
    data_start = _align(_PREAMBLE.size + header_length)
    # The padding after the header comes with it: one read, and checked like all padding.
    padded = source.read(_PREAMBLE.size, data_start - _PREAMBLE.size, "the header")
    body, padding = padded[:header_length], padded[header_length:]
    if _native.xxh3_64(body) != header_hash:
        raise IntegrityError("header checksum mismatch: the file is corrupt")
    if padding != _ZEROS[: len(padding)]:
        raise IntegrityError("non-zero padding after the header: the file is corrupt")
    header = _parse_header(body)
    return Header(header[0], header[1], header[2], data_start, header[3])


def _parse_header(body: bytes) -> tuple[Architecture, int, Layout, dict[str, str]]:
    try:
        document = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise FormatError(f"header is not valid JSON: {exc}") from None
    if not isinstance(document, dict) or set(document) != _HEADER_KEYS:
        keys = sorted(document) if isinstance(document, dict) else type(document).__name__
        raise FormatError(f"header must be an object with keys {sorted(_HEADER_KEYS)}, got {keys}")
    n_models = document["n_models"]
    if type(n_models) is not int or not 0 <= n_models < 2**40:
        raise FormatError(f"malformed n_models {n_models!r}")
    if document["layout"] != "stacked" or document["alignment"] != ALIGNMENT:
        raise FormatError(f"unsupported layout {document['layout']!r} / alignment {document['alignment']!r}")
    architecture = Architecture.from_json(document["architecture"])
    layout = Layout.of(architecture, n_models)
    expected_tensors = [{"offset": o, "length": n} for o, n in zip(layout.tensor_offsets, layout.tensor_lengths)]
    expected_hashes = {"algorithm": HASH_ALGORITHM, "offset": layout.hashes_offset, "length": layout.hashes_length}
    if document["tensors"] != expected_tensors:
        raise FormatError("tensor sections in the header do not follow the layout of FORMAT.md")
    if document["hashes"] != expected_hashes:
        raise FormatError(f"hash section {document['hashes']!r} is not {expected_hashes!r}")
    if document["data_length"] != layout.data_length:
        raise FormatError(f"data_length {document['data_length']!r} is not {layout.data_length}")
    metadata = document["metadata"]
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError("metadata must map strings to strings")
    return architecture, n_models, layout, metadata


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def write_body(
    f: BinaryIO, prefix: bytes, header: Header, models: ModelSet, hashes: np.ndarray | Future[np.ndarray]
) -> None:
    """Write ``prefix`` (preamble, header), the tensors and the hash table: few large writes, no copies.

    ``hashes`` may still be computing in another thread: they are needed
    only for the table at the end, so hashing overlaps the tensor writes.
    """
    f.write(prefix)
    position = 0
    for spec, offset in zip(header.architecture.tensors, header.layout.tensor_offsets):
        f.write(_ZEROS[: offset - position])
        f.write(packing.byte_view(models.tensors[spec.name]))
        position = offset + header.n_models * spec.nbytes
    f.write(_ZEROS[: header.layout.hashes_offset - position])
    table = hashes.result() if isinstance(hashes, Future) else hashes
    f.write(np.ascontiguousarray(table, dtype="<u8").data)


def encode(models: ModelSet, metadata: Mapping[str, str] | None = None) -> np.ndarray:
    """The complete file image of ``models`` in one uint8 array, for stores that take whole objects.

    One native pass copies every (model, tensor) row into place and hashes
    it while it is in cache; only the padding is zeroed separately.
    """
    _check_host()
    prefix, header = encode_header(models.architecture, len(models), dict(metadata or {}))
    arch, n, layout = header.architecture, header.n_models, header.layout
    image = np.empty(header.file_size, dtype=np.uint8)
    image[: len(prefix)] = np.frombuffer(prefix, dtype=np.uint8)
    rows = np.arange(n, dtype=np.uint64)
    row_bytes = np.array([s.nbytes for s in arch.tensors], dtype=np.uint64)
    starts = np.array(layout.tensor_offsets, dtype=np.uint64) + np.uint64(header.data_start)
    width = len(arch)
    by_tensor = np.empty(width * n, dtype=np.uint64)
    _native.copy_segments(
        [packing.byte_view(models.tensors[s.name]) for s in arch.tensors],
        np.repeat(np.arange(width, dtype=np.uint64), n),
        (row_bytes[:, None] * rows[None, :]).reshape(-1),
        [image],
        np.zeros(width * n, dtype=np.uint64),
        (starts[:, None] + row_bytes[:, None] * rows[None, :]).reshape(-1),
        np.repeat(row_bytes, n),
        by_tensor,
    )
    ends = [o + n * s.nbytes for o, s in zip(layout.tensor_offsets, arch.tensors)]
    for end, next_start in zip(ends, [*layout.tensor_offsets[1:], layout.hashes_offset]):
        image[header.data_start + end : header.data_start + next_start] = 0
    hashes = by_tensor.reshape(width, n).T
    image[header.data_start + layout.hashes_offset :] = np.ascontiguousarray(hashes, dtype="<u8").reshape(-1).view(np.uint8)
    return image


def read_modelset(
    source: Reader, header: Header, indices: Iterable[int] | None = None, *, verify: bool = True
) -> tuple[ModelSet, np.ndarray]:
    """Read all models, or only ``indices``, of an object whose header was read; return them and their hashes."""
    actual = source.size()
    if actual != header.file_size:
        problem = "truncated" if actual < header.file_size else "followed by trailing bytes"
        raise IntegrityError(f"file is {problem}: {actual} bytes, the header describes {header.file_size}")
    if indices is None:
        return _read_all(source, header, verify)
    return _read_selected(source, header, normalize_indices(indices, header.n_models), verify)


def _read_all(source: Reader, header: Header, verify: bool) -> tuple[ModelSet, np.ndarray]:
    arch, n, layout = header.architecture, header.n_models, header.layout
    tensors: dict[str, torch.Tensor] = {}
    position = 0
    for spec, offset in zip(arch.tensors, layout.tensor_offsets):
        _read_padding(source, header, position, offset, verify)
        tensors[spec.name] = t = packing.empty_stacked(n, spec)
        source.read_into(header.data_start + offset, memoryview(packing.byte_view(t)), spec.name)
        position = offset + n * spec.nbytes
    _read_padding(source, header, position, layout.hashes_offset, verify)
    stored = _read_hash_rows(source, header, 0, n)
    models = ModelSet._trusted(arch, tensors, n)
    if verify:
        _verify(packing.hash_stacked(tensors, arch, n), stored, np.arange(n))
    return models, stored


def _read_selected(source: Reader, header: Header, wanted: np.ndarray, verify: bool) -> tuple[ModelSet, np.ndarray]:
    arch, layout = header.architecture, header.layout
    unique, inverse = np.unique(wanted, return_inverse=True)
    runs = _runs(unique)
    tensors: dict[str, torch.Tensor] = {}
    for spec, offset in zip(arch.tensors, layout.tensor_offsets):
        tensors[spec.name] = t = packing.empty_stacked(len(unique), spec)
        rows = packing.byte_view(t)
        for first, start, count in runs:
            source.read_into(
                header.data_start + offset + start * spec.nbytes,
                memoryview(rows[first * spec.nbytes : (first + count) * spec.nbytes]),
                f"{spec.name} of models {start}..{start + count - 1}",
            )
    stored = np.concatenate([_read_hash_rows(source, header, start, count) for _, start, count in runs] or [
        np.empty((0, len(arch)), dtype=np.uint64)
    ])
    loaded = ModelSet._trusted(arch, tensors, len(unique))
    if verify:
        _verify(packing.hash_stacked(tensors, arch, len(unique)), stored, unique)
    if len(unique) == len(wanted) and np.array_equal(unique, wanted):
        return loaded, stored
    return loaded.select(inverse), stored[inverse]


def _runs(sorted_unique: np.ndarray) -> list[tuple[int, int, int]]:
    """Consecutive index runs as (position in the array, first index, length): one read per run."""
    if len(sorted_unique) == 0:
        return []
    breaks = np.flatnonzero(np.diff(sorted_unique) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(sorted_unique)]])
    return [(int(s), int(sorted_unique[s]), int(e - s)) for s, e in zip(starts, ends)]


def _read_hash_rows(source: Reader, header: Header, start: int, count: int) -> np.ndarray:
    width = len(header.architecture)
    table = np.empty((count, width), dtype="<u8")
    source.read_into(
        header.data_start + header.layout.hashes_offset + start * width * 8,
        memoryview(table.reshape(-1).view(np.uint8)),
        "the hash table",
    )
    return table.astype(np.uint64, copy=False)


def read_hash_table(source: Reader, header: Header) -> np.ndarray:
    """All stored per-(model, tensor) hashes, without reading any tensor bytes."""
    return _read_hash_rows(source, header, 0, header.n_models)


def _read_padding(source: Reader, header: Header, start: int, end: int, verify: bool) -> None:
    if not verify or end == start:
        return
    if source.read(header.data_start + start, end - start, "padding") != _ZEROS[: end - start]:
        raise IntegrityError(f"non-zero padding at data offset {start}: the file is corrupt")


def _verify(computed: np.ndarray, stored: np.ndarray, model_ids: np.ndarray) -> None:
    bad = np.argwhere(computed != stored)
    if len(bad):
        row, column = bad[0]
        raise IntegrityError(
            f"{len(bad)} tensor slice(s) fail their checksum, first: model {int(model_ids[row])} "
            f"tensor #{int(column)}; the file is corrupt"
        )


def _as_modelset(models: ModelSet | Sequence[nn.Module]) -> tuple[ModelSet, np.ndarray | Future[np.ndarray]]:
    """The ModelSet to write and its hashes: from the gather pass, or computing in the background."""
    if isinstance(models, nn.Module):
        raise TypeError("save expects a ModelSet or a list of modules; wrap a single module as [module]")
    if isinstance(models, ModelSet):
        modelset, hashes = models, None
    else:
        modelset, hashes = ModelSet._from_modules_hashed(models)
    if hashes is not None:
        return modelset, hashes
    # The kernel releases the GIL: hashing runs on another core while the tensors are written.
    future: Future[np.ndarray] = Future()

    def compute() -> None:
        try:
            future.set_result(modelset.hashes())
        except BaseException as exc:  # handed to the writer, which re-raises it
            future.set_exception(exc)

    threading.Thread(target=compute, name="mmpack-hash", daemon=True).start()
    return modelset, future


def save(
    models: ModelSet | Sequence[nn.Module],
    f: Target,
    *,
    metadata: Mapping[str, str] | None = None,
    fsync: bool = False,
) -> None:
    """save(models, f, *, metadata=None, fsync=False) -> None

    Write a model set (a :class:`ModelSet` or a list of same-architecture
    modules) to one file, in the format of ``docs/FORMAT.md``. A path is
    written under a temporary name and renamed into place, so a crash leaves
    the old file or the new one, never half of one; ``fsync=True`` also makes
    it survive a power cut. A file object is written sequentially from its
    current position (no seeking).

    Example::

        mmpack.save(models, "cells.mmpack")
        ms = mmpack.load("cells.mmpack")
    """
    _check_host()
    metadata = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("metadata must map strings to strings")
    modelset, hashes = _as_modelset(models)
    prefix, header = encode_header(modelset.architecture, len(modelset), metadata)

    def write(out: BinaryIO) -> None:
        write_body(out, prefix, header, modelset, hashes)

    if isinstance(f, (str, os.PathLike)):
        _io.publish_atomically(f, write, fsync=fsync)
    else:
        write(f)


def load(f: Target, indices: Iterable[int] | None = None, *, verify: bool = True) -> ModelSet:
    """load(f, indices=None, *, verify=True) -> ModelSet

    Read a model-set file (path or seekable binary file object). With
    ``indices``, only those models' bytes are read, in the order given. Every
    byte read is checked against the file's checksums unless ``verify=False``
    (for callers that verify elsewhere); corruption raises
    :class:`IntegrityError`, other malformed input :class:`FormatError`.

    Example::

        two = mmpack.load("cells.mmpack", indices=[3, 17])
    """
    with _io.opened(f, "rb") as stream:
        source = _io.FileReader(stream)
        header = read_header(source)
        return read_modelset(source, header, indices, verify=verify)[0]

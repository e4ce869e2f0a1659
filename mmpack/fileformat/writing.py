"""Writing model-set objects: streamed to a file, or built as one in-memory image."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from typing import BinaryIO

import numpy as np
from torch import nn

from mmpack import _io, _native, packing, rans
from mmpack.compression import CODEC as ZSTD
from mmpack.compression import DELTA_NONE, DELTA_XOR, Chunking, Compression, element_width, rows_per_chunk
from mmpack.compression import encode_rows as encode_chunks
from mmpack.compression import resolve as resolve_compression
from mmpack.fileformat.header import ZEROS, Header, Layout, check_host, encode_header
from mmpack.modelset import ModelSet
from mmpack.staging import is_host

U64 = np.uint64


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
        f.write(ZEROS[: offset - position])
        f.write(packing.byte_view(models.tensors[spec.name]))
        position = offset + header.n_models * spec.nbytes
    f.write(ZEROS[: header.layout.hashes_offset - position])
    table = hashes.result() if isinstance(hashes, Future) else hashes
    f.write(np.ascontiguousarray(table, dtype="<u8").data)


def encode(
    models: ModelSet,
    metadata: Mapping[str, str] | None = None,
    compression: Compression | None = None,
    hashes: np.ndarray | None = None,
) -> np.ndarray:
    """The complete stacked file image of ``models`` in one uint8 array, for stores that take whole objects.

    Uncompressed, one native pass copies every (model, tensor) row into
    place and hashes it while it is in cache; only the padding is zeroed
    separately. Compressed (format version 2), each stacked tensor is
    encoded straight from its memory; ``hashes`` (``[n_models, n_tensors]``)
    spares recomputing the table when the caller has it.
    """
    return encode_image(models, metadata, compression, hashes)[0]


def encode_image(
    models: ModelSet,
    metadata: Mapping[str, str] | None = None,
    compression: Compression | None = None,
    hashes: np.ndarray | None = None,
) -> tuple[np.ndarray, Header]:
    """:func:`encode`, also returning the image's header."""
    check_host()
    if compression is not None:
        table = hashes if hashes is not None else models.hashes()
        data = [packing.byte_view(models.tensors[s.name]) for s in models.architecture.tensors]
        return _compressed_image(models, [len(models)] * len(data), data, None, table, metadata, compression)
    prefix, header = encode_header(models.architecture, len(models), dict(metadata or {}))
    everyone = np.arange(len(models))
    image, by_tensor = _build_image(prefix, header, models, [everyone] * len(models.architecture), hashed=True)
    _put_table(image, header, by_tensor.reshape(len(models.architecture), len(models)).T)
    return image, header


def encode_rows(
    models: ModelSet,
    changed: np.ndarray,
    table: np.ndarray,
    metadata: Mapping[str, str] | None = None,
    compression: Compression | None = None,
    reference: ModelSet | None = None,
) -> tuple[np.ndarray, Header]:
    """The rows-layout image holding only the rows where ``changed[i, j]``, with the set's full hash table.

    ``table`` is ``[n_models, n_tensors]``, the hashes of every row of ``models``.
    With ``compression``, the rows are compressed (format version 2); with a
    ``reference`` as well, each row is stored XORed with the reference's
    row of the same (model, tensor): model ``k`` of ``reference`` stands for
    the ``k``-th model that has any changed tensor (``np.flatnonzero(changed.any(axis=1))``).
    """
    check_host()
    arch, n = models.architecture, len(models)
    stored = [np.flatnonzero(changed[:, j]) for j in range(len(arch))]
    if n >= 2**32:
        raise ValueError("the rows layout indexes models with 32-bit ids")
    if compression is not None:
        data = [packing.byte_view(models.tensors[s.name]).reshape(n, s.nbytes)[rows].reshape(-1)
                for s, rows in zip(arch.tensors, stored)]
        if reference is not None:
            holders = np.flatnonzero(changed.any(axis=1))
            for s, rows, rows_data in zip(arch.tensors, stored, data):
                reference_rows = packing.byte_view(reference.tensors[s.name]).reshape(len(holders), s.nbytes)
                np.bitwise_xor(rows_data, reference_rows[np.searchsorted(holders, rows)].reshape(-1), out=rows_data)
        return _compressed_image(models, [len(r) for r in stored], data, stored, table, metadata, compression,
                                 xor=reference is not None)
    if reference is not None:
        raise ValueError("an XOR reference needs compression")
    layout = Layout.of_rows(arch, n, [len(r) for r in stored])
    prefix, header = encode_header(arch, n, dict(metadata or {}), layout)
    image, _ = _build_image(prefix, header, models, stored, hashed=False)
    index = np.concatenate(stored or [np.empty(0, np.int64)]).astype("<u4")
    start = header.data_start + layout.row_index_offset
    image[start : start + layout.row_index_length] = index.view(np.uint8)
    _put_table(image, header, table)
    return image, header


def _compressed_image(
    models: ModelSet,
    rows: list[int],
    data: Sequence[np.ndarray],
    row_index: Sequence[np.ndarray] | None,
    table: np.ndarray,
    metadata: Mapping[str, str] | None,
    compression: Compression,
    *,
    xor: bool = False,
) -> tuple[np.ndarray, Header]:
    """A compressed image (version 2 for zstd, 3 for rans): each tensor's stored rows (``data[j]``,
    contiguous) encoded in chunks, then the row index (rows layout, when ``row_index`` is given)
    and the hash table."""
    arch = models.architecture
    delta = DELTA_XOR if xor else DELTA_NONE
    chunk_rows = [rows_per_chunk(spec.nbytes, compression.chunk_bytes) for spec in arch.tensors]
    pieces: list[list[np.ndarray]] = []
    chunking: Chunking | rans.RansChunking
    if compression.codec == ZSTD:
        lengths = []
        for spec, n_rows, rows_data, per_chunk in zip(arch.tensors, rows, data, chunk_rows):
            encoded, stored_lengths = encode_chunks(
                rows_data, n_rows, spec.nbytes, element_width(spec.dtype), per_chunk, compression.zstd_level
            )
            pieces.append(encoded)
            lengths.append(tuple(stored_lengths))
        widths = tuple(element_width(s.dtype) for s in arch.tensors)
        chunking = Chunking(delta, tuple(chunk_rows), tuple(lengths), widths)
    else:
        sections = [rans.encode_rows(rows_data, n_rows, spec.nbytes, spec.dtype, per_chunk)
                    for spec, n_rows, rows_data, per_chunk in zip(arch.tensors, rows, data, chunk_rows)]
        pieces = [[section.data] for section in sections]
        chunking = rans.RansChunking(
            delta, tuple(chunk_rows), tuple(s.table_length for s in sections), tuple(s.chunk_lengths for s in sections),
            tuple(rans.layout_code(spec.dtype) for spec in arch.tensors),
        )
    if row_index is None:
        layout = Layout.stacked(arch, len(models), chunking)
    else:
        layout = Layout.of_rows(arch, len(models), rows, chunking)
    prefix, header = encode_header(arch, len(models), dict(metadata or {}), layout)
    image = np.zeros(header.file_size, dtype=np.uint8)
    image[: len(prefix)] = np.frombuffer(prefix, dtype=np.uint8)
    for offset, encoded in zip(layout.tensor_offsets, pieces):
        position = header.data_start + offset
        for piece in encoded:
            image[position : position + len(piece)] = piece
            position += len(piece)
    if row_index is not None:
        index = np.concatenate(list(row_index) or [np.empty(0, np.int64)]).astype("<u4")
        start = header.data_start + layout.row_index_offset
        image[start : start + layout.row_index_length] = index.view(np.uint8)
    _put_table(image, header, table)
    return image, header


def _build_image(
    prefix: bytes, header: Header, models: ModelSet, rows: Sequence[np.ndarray], *, hashed: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Image with prefix, zero padding and the chosen rows of each tensor in place (one native copy)."""
    arch, layout = header.architecture, header.layout
    image = np.empty(header.file_size, dtype=np.uint8)
    image[: len(prefix)] = np.frombuffer(prefix, dtype=np.uint8)
    position = 0
    for offset, length in layout.sections():
        image[header.data_start + position : header.data_start + offset] = 0
        position = offset + length
    row_bytes = np.array([s.nbytes for s in arch.tensors], dtype=U64)
    src_index = np.concatenate([np.full(len(r), j, U64) for j, r in enumerate(rows)] or [np.empty(0, U64)])
    src_offsets = np.concatenate([r.astype(U64) * row_bytes[j] for j, r in enumerate(rows)] or [np.empty(0, U64)])
    dst_offsets = np.concatenate([
        U64(header.data_start + layout.tensor_offsets[j]) + np.arange(len(r), dtype=U64) * row_bytes[j]
        for j, r in enumerate(rows)
    ] or [np.empty(0, U64)])
    hashes = np.empty(len(src_index), U64) if hashed else None
    _native.copy_segments(
        [packing.byte_view(models.tensors[s.name]) for s in arch.tensors],
        src_index,
        src_offsets,
        [image],
        np.zeros(len(src_index), U64),
        dst_offsets,
        row_bytes[src_index.astype(np.intp)] if len(src_index) else np.empty(0, U64),
        hashes,
    )
    return image, hashes


def _put_table(image: np.ndarray, header: Header, table: np.ndarray) -> None:
    start = header.data_start + header.layout.hashes_offset
    image[start : start + header.layout.hashes_length] = (
        np.ascontiguousarray(table, dtype="<u8").reshape(-1).view(np.uint8)
    )


def image_pin(image: np.ndarray, header: Header) -> int:
    """The pin of a complete object image: XXH3-64 of its tail (row index and hash table)."""
    return _native.xxh3_64(image[header.data_start + header.layout.tail_offset :])


def table_pin(table: np.ndarray) -> int:
    """The pin of a stacked object, from its hash table alone (in that layout the tail is the table)."""
    return _native.xxh3_64(np.ascontiguousarray(table, dtype="<u8").reshape(-1).view(np.uint8))


def modelset_and_hashes(models: ModelSet | Sequence[nn.Module]) -> tuple[ModelSet, np.ndarray | Future[np.ndarray]]:
    """The ModelSet to write and its hashes: from the gather pass, or computing in the background."""
    if isinstance(models, nn.Module):
        raise TypeError("expected a ModelSet or a list of modules; wrap a single module as [module]")
    modelset = models if isinstance(models, ModelSet) else ModelSet.from_modules(models)
    if not is_host(modelset.device):  # staged to the host, each row hashed as its chunk arrives
        return modelset._to_host_hashed()
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
    f: str | os.PathLike[str] | BinaryIO,
    *,
    metadata: Mapping[str, str] | None = None,
    fsync: bool = False,
    compression: str | Compression | None = None,
) -> None:
    """save(models, f, *, metadata=None, fsync=False, compression=None) -> None

    Write a model set (a :class:`ModelSet` or a list of same-architecture
    modules) to one file, in the format of ``docs/FORMAT.md``. A path is
    written under a temporary name and renamed into place, so a crash leaves
    the old file or the new one, never half of one; ``fsync=True`` also makes
    it survive a power cut. A file object is written sequentially from its
    current position (no seeking). ``compression="zstd"`` (or a
    :class:`~mmpack.Compression`) stores the tensors losslessly compressed;
    :func:`load` detects it.

    Example::

        mmpack.save(models, "cells.mmpack")
        mmpack.save(models, "cells-small.mmpack", compression="zstd")
        ms = mmpack.load("cells.mmpack")
    """
    check_host()
    compression = resolve_compression(compression)
    metadata = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("metadata must map strings to strings")
    modelset, hashes = modelset_and_hashes(models)
    if compression is not None:
        table = hashes.result() if isinstance(hashes, Future) else hashes
        image = encode(modelset, metadata, compression, table)
        size = image.nbytes

        def write(out: BinaryIO) -> None:
            out.write(memoryview(image))
    else:
        prefix, header = encode_header(modelset.architecture, len(modelset), metadata)
        size = header.file_size

        def write(out: BinaryIO) -> None:
            write_body(out, prefix, header, modelset, hashes)

    if isinstance(f, (str, os.PathLike)):
        _io.publish_atomically(f, write, fsync=fsync, size=size)
    else:
        write(f)


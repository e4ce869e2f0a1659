"""Reading model-set objects: whole sets, selected models, hash tables, row indexes.

Every tensor byte is read through ``Reader.read_segments`` with its
(model, tensor) hash computed as it lands, and compared with the object's
hash table: the check costs no extra pass over memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from mmpack import _io, _native, compression, packing
from mmpack.errors import FormatError, IntegrityError
from mmpack.fileformat.header import ROWS, STACKED, ZEROS, Header, Reader, read_header
from mmpack.modelset import ModelSet, normalize_indices

U64 = np.uint64


def check_size(source: Reader, header: Header) -> None:
    """The object must end exactly where its header says."""
    actual = source.size()
    if actual != header.file_size:
        problem = "truncated" if actual < header.file_size else "followed by trailing bytes"
        raise IntegrityError(f"file is {problem}: {actual} bytes, the header describes {header.file_size}")


def check_padding(source: Reader, header: Header) -> None:
    """Every byte between sections must be zero (full reads check it)."""
    position = 0
    for offset, length in header.layout.sections():
        if offset > position:
            gap = source.read(header.data_start + position, offset - position, "padding")
            if gap != ZEROS[: len(gap)]:
                raise IntegrityError(f"non-zero padding at data offset {position}: the file is corrupt")
        position = offset + length


@dataclass
class RowRequest:
    """Rows to read from one object: row ``stored_rows[k]`` of tensor ``tensors[k]`` into row
    ``dst_rows[k]`` of destination ``tensors[k]``.

    ``xor``: XOR the decoded rows into the destination rows instead of
    overwriting them; how XOR-delta objects are applied to the reference
    rows already in place (the hashes are then those of the results).
    """

    source: Reader
    header: Header
    tensors: np.ndarray
    stored_rows: np.ndarray
    dst_rows: np.ndarray
    xor: bool = False

    def segments(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(object offsets, lengths, destination index, destination offsets) of every row."""
        h = self.header
        row_bytes = np.array([s.nbytes for s in h.architecture.tensors], dtype=U64)
        starts = np.array(h.layout.tensor_offsets, dtype=U64) + U64(h.data_start)
        t = self.tensors.astype(np.intp)
        lengths = row_bytes[t]
        return starts[t] + self.stored_rows.astype(U64) * lengths, lengths, t.astype(U64), self.dst_rows.astype(U64) * lengths


def read_rows_many(requests: Sequence[RowRequest], destinations: list[np.ndarray]) -> list[np.ndarray]:
    """Read the rows of several objects into stacked destinations (byte views, one per tensor);
    return each request's row hashes (XXH3-64, in the order given).

    When every object is memory-mapped, all rows of all objects move in one
    native call (one thread split, no per-object overhead); otherwise each
    object is read with ``read_segments``. Give each request's rows in file
    order (tensor by tensor, ascending rows): neighbours then merge into
    large reads and memory is walked sequentially.

    Compressed objects decode only the chunks holding the requested rows,
    chunk by chunk on the kernels' threads. Requests are applied in order,
    so an ``xor`` request placed after the request that copies its reference
    rows finds them in place.
    """
    if any(r.header.layout.chunking is not None or r.xor for r in requests):
        return [_read_one(r, destinations) for r in requests]
    parts = [r.segments() for r in requests]
    buffers = [r.source.buffer() for r in requests]
    if requests and all(b is not None for b in buffers):
        for request, buffer in zip(requests, buffers):
            if len(buffer) != request.header.file_size:
                raise IntegrityError(f"object is {len(buffer)} bytes, its header describes {request.header.file_size}")
        source_index = np.concatenate([np.full(len(p[0]), i, U64) for i, p in enumerate(parts)])
        offsets, lengths, dst_index, dst_offsets = (np.concatenate(c) for c in zip(*parts))
        order = None
        if len(requests) > 1:
            # Copy in destination order: each thread then fills one contiguous part of the fresh
            # result (sequential first-touch faults, no two threads faulting the same pages), and
            # the sources, already mapped and cached, take the scattered reads. Each request is
            # already in file order, so the stable sort only merges sorted runs. 20-update chain
            # of 5,000 FFNN-48 models: 21 -> 17 ms. (The key only orders the work; the hashes are put
            # back through the same permutation whatever it is.)
            order = np.argsort((dst_index << U64(40)) | dst_offsets, kind="stable")
            source_index, offsets, lengths, dst_index, dst_offsets = (
                a[order] for a in (source_index, offsets, lengths, dst_index, dst_offsets))
        hashes = np.empty(len(lengths), U64)
        _native.copy_segments(buffers, source_index, offsets, destinations, dst_index, dst_offsets, lengths, hashes)
        if order is not None:
            unsorted = np.empty_like(hashes)
            unsorted[order] = hashes
            hashes = unsorted
        return np.split(hashes, np.cumsum([len(p[0]) for p in parts])[:-1])

    def read(request: RowRequest, part: tuple[np.ndarray, ...]) -> np.ndarray:
        offsets, lengths, dst_index, dst_offsets = part
        hashes = np.empty(len(lengths), U64)
        request.source.read_segments(offsets, lengths, destinations, dst_index, dst_offsets, hashes)
        return hashes

    if len(requests) < 2 or not all(getattr(r.source, "remote", False) for r in requests):
        return [read(r, p) for r, p in zip(requests, parts)]
    # Remote objects are read in threads: each read waits mostly on the network, and the
    # requests write disjoint rows of the destinations.
    with ThreadPoolExecutor(min(len(requests), 16)) as pool:
        return list(pool.map(read, requests, parts))


def _read_one(request: RowRequest, destinations: list[np.ndarray]) -> np.ndarray:
    if request.header.layout.chunking is None:
        if request.xor:
            raise FormatError("only compressed objects hold XOR deltas")
        return read_rows_many([request], destinations)[0]
    return _read_compressed(request, destinations)


def _read_compressed(request: RowRequest, destinations: list[np.ndarray]) -> np.ndarray:
    """Decode the chunks that hold the requested rows and copy (or XOR) those rows into place."""
    header, source = request.header, request.source
    layout, arch = header.layout, header.architecture
    chunking = layout.chunking
    tensors = request.tensors.astype(np.int64)
    stored = request.stored_rows.astype(np.int64)
    hashes = np.empty(len(tensors), U64)
    if len(tensors) == 0:
        return hashes
    if np.any(stored >= np.array(layout.rows, np.int64)[tensors]) or np.any(stored < 0):
        raise FormatError("a requested row lies outside the object's stored rows")
    chunk = stored // np.array(chunking.chunk_rows, np.int64)[tensors]
    key = tensors * (int(chunk.max()) + 1) + chunk
    order = np.argsort(key, kind="stable")
    bounds = np.flatnonzero(np.diff(key[order])) + 1
    groups = np.split(order, bounds)
    mapped = source.buffer()
    if mapped is not None and len(mapped) != header.file_size:
        raise IntegrityError(f"object is {len(mapped)} bytes, its header describes {header.file_size}")
    row_bytes = [s.nbytes for s in arch.tensors]

    def decode(group: np.ndarray) -> None:
        j, c = int(tensors[group[0]]), int(chunk[group[0]])
        per_chunk, width = chunking.chunk_rows[j], chunking.widths[j]
        start, end = (int(x) for x in chunking.starts[j][c : c + 2])
        at = header.data_start + layout.tensor_offsets[j] + start
        payload = mapped[at : at + end - start] if mapped is not None else source.read(at, end - start, "a chunk")
        first = c * per_chunk
        count = min(first + per_chunk, layout.rows[j]) - first
        plane_lengths = chunking.lengths[j][c * width : (c + 1) * width]
        n = len(group)
        size = U64(row_bytes[j])
        out = np.empty(n, U64)
        rows, targets = stored[group], request.dst_rows[group]
        if not request.xor and n == count and rows[0] == first and _consecutive(rows) and _consecutive(targets):
            # The whole chunk lands on consecutive rows (full reads of stacked objects): decode
            # in place and hash the rows there, sparing a copy through a scratch buffer.
            at = int(targets[0]) * row_bytes[j]
            into = destinations[j][at : at + count * row_bytes[j]]
            compression.decode_chunk(payload, plane_lengths, width, into)
            _native.hash_rows(into, row_bytes[j], out)
            hashes[group] = out
            return
        raw = np.empty(count * row_bytes[j], np.uint8)
        compression.decode_chunk(payload, plane_lengths, width, raw)
        _native.copy_segments(
            [raw], np.zeros(n, U64), (stored[group] - first).astype(U64) * size, destinations,
            np.full(n, j, U64), request.dst_rows[group].astype(U64) * size, np.full(n, size, U64), out,
            xor=request.xor,
        )
        hashes[group] = out

    total = sum(len(g) * row_bytes[int(tensors[g[0]])] for g in groups)
    compression.parallel_map(decode, groups, total)
    return hashes


def _consecutive(values: np.ndarray) -> bool:
    return len(values) < 2 or bool(np.all(np.diff(values) == 1))


def read_rows(
    source: Reader,
    header: Header,
    tensors: np.ndarray,
    stored_rows: np.ndarray,
    destinations: list[np.ndarray],
    dst_rows: np.ndarray,
) -> np.ndarray:
    """Read row ``stored_rows[k]`` of tensor ``tensors[k]`` into row ``dst_rows[k]`` of
    ``destinations[tensors[k]]`` (byte views of stacked tensors); return each row's XXH3-64."""
    return read_rows_many([RowRequest(source, header, tensors, stored_rows, dst_rows)], destinations)[0]


def verify_rows(models: np.ndarray, tensors: np.ndarray, computed: np.ndarray, expected: np.ndarray, what: str) -> None:
    """Compare computed row hashes with the expected ones; raise naming the first bad row."""
    bad = np.flatnonzero(computed != expected)
    if len(bad):
        k = bad[0]
        raise IntegrityError(
            f"{len(bad)} tensor slice(s) of {what} fail their checksum, first: model {int(models[k])} "
            f"tensor #{int(tensors[k])}; the data is corrupt"
        )


def runs(sorted_unique: np.ndarray) -> list[tuple[int, int, int]]:
    """Consecutive index runs as (position in the array, first index, length)."""
    if len(sorted_unique) == 0:
        return []
    breaks = np.flatnonzero(np.diff(sorted_unique) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(sorted_unique)]])
    return [(int(s), int(sorted_unique[s]), int(e - s)) for s, e in zip(starts, ends)]


def read_hash_rows(source: Reader, header: Header, models: np.ndarray) -> np.ndarray:
    """The hash-table rows ``[len(models), n_tensors]`` of sorted unique ``models``."""
    width = len(header.architecture)
    table = np.empty((len(models), width), dtype="<u8")
    row_bytes = width * 8
    pieces = runs(models)
    if pieces:
        start = header.data_start + header.layout.hashes_offset
        source.read_segments(
            np.array([start + first * row_bytes for _, first, _ in pieces], U64),
            np.array([count * row_bytes for _, _, count in pieces], U64),
            [table.reshape(-1).view(np.uint8)],
            np.zeros(len(pieces), U64),
            np.array([at * row_bytes for at, _, _ in pieces], U64),
        )
    return table.astype(U64, copy=False)


def read_hash_table(source: Reader, header: Header) -> np.ndarray:
    """All stored per-(model, tensor) hashes ``[n_models, n_tensors]``, without reading any tensor bytes."""
    return read_hash_rows(source, header, np.arange(header.n_models))


def read_row_index(source: Reader, header: Header) -> list[np.ndarray]:
    """For a rows-layout object, the ascending model ids of the stored rows of each tensor."""
    if header.layout.kind != ROWS:
        raise FormatError("only rows-layout objects have a row index")
    raw = source.read(header.data_start + header.layout.row_index_offset, header.layout.row_index_length, "row index")
    return list(_parse_row_index(np.frombuffer(raw, dtype=np.uint8), header))


@dataclass(frozen=True)
class Tail:
    """An object's tail, read and checked: what the repository verifies rows against.

    ``digest`` is the XXH3-64 of the tail's bytes (the pin a manifest
    records), ``row_index`` the ascending model ids of each tensor's stored
    rows (rows layout; None for stacked objects), ``table`` the hash table
    ``[n_models, n_tensors]``.
    """

    digest: int
    row_index: tuple[np.ndarray, ...] | None
    table: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.table.nbytes + sum(ids.nbytes for ids in self.row_index or ())


def read_tail(source: Reader, header: Header) -> Tail:
    """Read an object's tail in one read (row index, padding, hash table) and check its layout."""
    layout = header.layout
    start = header.data_start + layout.tail_offset
    raw = source.read(start, header.file_size - start, "the row index and hash table")
    digest = _native.xxh3_64(raw)
    buffer = np.frombuffer(raw, dtype=np.uint8)
    table_at = layout.hashes_offset - layout.tail_offset
    index = None
    if layout.kind == ROWS:
        index = _parse_row_index(buffer[: layout.row_index_length], header)
        if np.any(buffer[layout.row_index_length : table_at]):
            raise IntegrityError("non-zero padding before the hash table: the file is corrupt")
    table = buffer[table_at:].view("<u8").astype(U64).reshape(header.n_models, len(header.architecture))
    return Tail(digest, index, table)


def _parse_row_index(raw: np.ndarray, header: Header) -> tuple[np.ndarray, ...]:
    ids = raw.view("<u4").astype(np.int64)
    split = np.split(ids, np.cumsum(header.layout.rows)[:-1])
    for j, tensor_ids in enumerate(split):
        if len(tensor_ids) and (tensor_ids[-1] >= header.n_models or np.any(np.diff(tensor_ids) <= 0)):
            raise FormatError(f"row index of tensor #{j} is not ascending model ids below {header.n_models}")
    return tuple(split)


def read_modelset(
    source: Reader, header: Header, indices: Iterable[int] | None = None, *, verify: bool = True
) -> tuple[ModelSet, np.ndarray]:
    """Read all models, or only ``indices``, of a stacked object; return them and their stored hashes."""
    if header.layout.kind != STACKED:
        raise FormatError(
            "this object holds only the changed rows of an Update version; recover it through its repository"
        )
    check_size(source, header)
    arch = header.architecture
    if indices is None:
        if verify:
            check_padding(source, header)
        wanted = unique = np.arange(header.n_models)
        inverse = None
    else:
        wanted = normalize_indices(indices, header.n_models)
        unique, inverse = np.unique(wanted, return_inverse=True)
    tensors = {s.name: packing.empty_stacked(len(unique), s) for s in arch.tensors}
    width = len(arch)
    positions = np.tile(np.arange(len(unique)), width)
    columns = np.repeat(np.arange(width), len(unique))
    computed = read_rows(
        source, header, columns, unique[positions], [packing.byte_view(tensors[s.name]) for s in arch.tensors], positions
    )
    stored = read_hash_rows(source, header, unique)
    if verify:
        verify_rows(unique[positions], columns, computed, stored[positions, columns], "the file")
    loaded = ModelSet._trusted(arch, tensors, len(unique))
    if inverse is None or np.array_equal(unique, wanted):
        return loaded, stored
    return loaded.select(inverse), stored[inverse]


def load(f: str | os.PathLike[str] | BinaryIO, indices: Iterable[int] | None = None, *, verify: bool = True) -> ModelSet:
    """load(f, indices=None, *, verify=True) -> ModelSet

    Read a model-set file (path or seekable binary file object). With
    ``indices``, only those models' bytes are read, in the order given. Every
    byte read is checked against the file's checksums unless ``verify=False``
    (for callers that verify elsewhere); corruption raises
    :class:`IntegrityError`, other malformed input :class:`FormatError`.

    Example::

        two = mmpack.load("cells.mmpack", indices=[3, 17])
    """
    with _io.opened(f, "rb") as stream, _io.FileReader(stream) as source:
        header = read_header(source)
        return read_modelset(source, header, indices, verify=verify)[0]


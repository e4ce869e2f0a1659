"""Reading model-set objects: whole sets, selected models, hash tables, row indexes.

Every tensor byte is read through ``Reader.read_segments`` with its
(model, tensor) hash computed as it lands, and compared with the object's
hash table: the check costs no extra pass over memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import torch

from mmpack import _io, _native, packing
from mmpack.errors import FormatError, IntegrityError
from mmpack.fileformat import compressed
from mmpack.fileformat.header import ROWS, STACKED, Header, Reader
from mmpack.modelset import ModelSet, normalize_indices

U64 = np.uint64


def check_size(source: Reader, header: Header) -> None:
    """The object must end exactly where its header says."""
    actual = source.size()
    if actual != header.file_size:
        problem = "truncated" if actual < header.file_size else "followed by trailing bytes"
        raise IntegrityError(f"file is {problem}: {actual} bytes, the header describes {header.file_size}")


def check_padding(source: Reader, header: Header) -> None:
    """Every byte between sections must be zero (full reads check it): all gaps in one read."""
    offsets, lengths, position = [], [], 0
    for offset, length in header.layout.sections():
        if offset > position:
            offsets.append(header.data_start + position)
            lengths.append(offset - position)
        position = offset + length
    if not offsets:
        return
    gaps = np.empty(sum(lengths), np.uint8)
    starts = np.cumsum([0, *lengths[:-1]]).astype(U64)
    source.read_segments(np.array(offsets, U64), np.array(lengths, U64), [gaps], np.zeros(len(offsets), U64), starts)
    if gaps.any():
        first = int(np.flatnonzero(gaps)[0])
        k = int(np.searchsorted(starts, first, side="right")) - 1
        at = offsets[k] - header.data_start + first - int(starts[k])
        raise IntegrityError(f"non-zero padding at data offset {at}: the file is corrupt")


@dataclass
class RowRequest:
    """Rows to read from one object: row ``stored_rows[k]`` of tensor ``tensors[k]`` into row
    ``dst_rows[k]`` of destination ``tensors[k]``.

    ``xor``: XOR the decoded rows into the destination rows instead of
    overwriting them; how XOR-delta objects are applied to the reference
    rows already in place (the hashes are then those of the results).
    ``counts``: entry k stands for ``counts[k]`` consecutive rows (stored
    rows from ``stored_rows[k]`` on, into destination rows from
    ``dst_rows[k]`` on); None means one row each. Runs keep the bookkeeping
    of a full read at a few numbers per tensor instead of per (model, tensor).
    """

    source: Reader
    header: Header
    tensors: np.ndarray
    stored_rows: np.ndarray
    dst_rows: np.ndarray
    xor: bool = False
    counts: np.ndarray | None = None

    def as_runs(self) -> RowRequest:
        """The same rows with ``counts`` set: neighbours consecutive in the object and in the
        destination merged into one run."""
        if self.counts is not None:
            return self
        t, stored, dst = (np.asarray(a, np.int64) for a in (self.tensors, self.stored_rows, self.dst_rows))
        if len(t) == 0:
            return replace(self, tensors=t, stored_rows=stored, dst_rows=dst, counts=np.zeros(0, U64))
        breaks = (t[1:] != t[:-1]) | (stored[1:] != stored[:-1] + 1) | (dst[1:] != dst[:-1] + 1)
        starts = np.flatnonzero(np.concatenate([[True], breaks]))
        counts = np.diff(np.append(starts, len(t))).astype(U64)
        return replace(self, tensors=t[starts], stored_rows=stored[starts], dst_rows=dst[starts], counts=counts)

    def n_rows(self) -> int:
        """Rows requested (hashes returned)."""
        return len(self.tensors) if self.counts is None else int(self.counts.sum())

    def segments(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(object offsets, row lengths, row counts, destination index, destination offsets) of every run."""
        per_tensor = self.header.per_tensor
        counts = np.ones(len(self.tensors), U64) if self.counts is None else self.counts.astype(U64)
        t = np.asarray(self.tensors).astype(np.intp)
        lengths = per_tensor.row_bytes[t].astype(U64)
        offsets = per_tensor.starts[t].astype(U64) + np.asarray(self.stored_rows).astype(U64) * lengths
        return offsets, lengths, counts, t.astype(U64), np.asarray(self.dst_rows).astype(U64) * lengths


def read_rows_many(requests: Sequence[RowRequest], destinations: list[np.ndarray]) -> list[np.ndarray]:
    """Read the rows of several objects into stacked destinations (byte views, one per tensor);
    return each request's row hashes (XXH3-64, one per row, in the order given).

    When every object is a local file, all rows of all objects move in one
    native call of positioned reads (one thread split, no per-object
    overhead); otherwise each object is read with ``read_segments``. Give
    each request's rows in file order (tensor by tensor, ascending rows):
    neighbours then merge into runs and large reads, and memory is walked
    sequentially. Rows of ``bool`` tensors must hold 0 or 1
    (:class:`IntegrityError` otherwise), whatever their hashes say.

    Compressed objects decode only the chunks holding the requested rows,
    chunk by chunk on the kernels' threads. Requests are applied in order,
    so an ``xor`` request placed after the request that copies its reference
    rows finds them in place.
    """
    requests = [r.as_runs() for r in requests]
    for request in requests:
        check_size(request.source, request.header)
    if any(r.header.layout.chunking is not None or r.xor for r in requests):
        hashes = [_read_one(r, destinations) for r in requests]
    elif requests and all(r.source.descriptor() is not None for r in requests):
        hashes = _read_files(requests, destinations)
    else:
        hashes = _read_by_readers(requests, destinations)
    _check_bools(requests, destinations)
    return hashes


def _read_files(requests: Sequence[RowRequest], destinations: list[np.ndarray]) -> list[np.ndarray]:
    """All runs of all requests in one native call of positioned reads."""
    fds: list[int] = []
    names: list[str] = []
    fd_position: dict[int, int] = {}
    parts, fd_index = [], []
    for request in requests:
        fd, base = request.source.descriptor()
        if fd not in fd_position:
            fd_position[fd] = len(fds)
            fds.append(fd)
            names.append(getattr(request.source, "name", "an object"))
        offsets, lengths, counts, dst_index, dst_offsets = request.segments()
        parts.append((offsets + U64(base), lengths, counts, dst_index, dst_offsets))
        fd_index.append(np.full(len(offsets), fd_position[fd], U64))
    fd_index_all = np.concatenate(fd_index)
    offsets, lengths, counts, dst_index, dst_offsets = (np.concatenate(c) for c in zip(*parts))
    total = int(counts.sum())
    order = None
    if len(requests) > 1:
        # Split the work in destination order: each kernel thread then fills one contiguous
        # part of the fresh result (no two threads faulting the same pages), and reads its
        # share in file order (the kernel sorts it), so neighbouring rows of one object still
        # merge into one read. Each request is already in file order, so the stable sort only
        # merges sorted runs. (The key only orders the work; the hashes are put back through
        # the same permutation whatever it is.)
        order = np.argsort((dst_index << U64(40)) | dst_offsets, kind="stable")
        fd_index_all, offsets, lengths, counts, dst_index, dst_offsets = (
            a[order] for a in (fd_index_all, offsets, lengths, counts, dst_index, dst_offsets))
    hashes = np.empty(total, U64)
    try:
        _io.read_file_rows(fds, fd_index_all, offsets, lengths, counts, destinations, dst_index, dst_offsets,
                           hashes, names=names)
    except OSError as exc:
        failed = getattr(exc, "file_index", None)
        if failed is None:
            raise
        # Raised again inside the failing object's context: as its reader's own reads would fail.
        with next(r.source for r in requests if r.source.descriptor()[0] == fds[failed]).direct_reads():
            raise
    if order is not None:
        # Row i of sorted run p belongs at the unsorted start of run order[p], plus i.
        original_counts = np.empty_like(counts)
        original_counts[order] = counts
        unsorted_starts = (np.cumsum(original_counts) - original_counts).astype(np.int64)[order]
        shift = unsorted_starts - (np.cumsum(counts) - counts).astype(np.int64)
        unsorted = np.empty_like(hashes)
        unsorted[np.arange(total, dtype=np.int64) + np.repeat(shift, counts.astype(np.int64))] = hashes
        hashes = unsorted
    if len(requests) == 1:
        return [hashes]
    return np.split(hashes, np.cumsum([r.n_rows() for r in requests])[:-1])


def _read_by_readers(requests: Sequence[RowRequest], destinations: list[np.ndarray]) -> list[np.ndarray]:
    def read(request: RowRequest) -> np.ndarray:
        offsets, lengths, counts, dst_index, dst_offsets = request.segments()
        hashes = np.empty(request.n_rows(), U64)
        request.source.read_segments(offsets, lengths, destinations, dst_index, dst_offsets, hashes, counts)
        return hashes

    if len(requests) < 2 or not all(getattr(r.source, "remote", False) for r in requests):
        return [read(r) for r in requests]
    # Remote objects are read in threads: each read waits mostly on the network, and the
    # requests write disjoint rows of the destinations.
    with ThreadPoolExecutor(min(len(requests), 16)) as pool:
        return list(pool.map(read, requests))


def _check_bools(requests: Sequence[RowRequest], destinations: list[np.ndarray]) -> None:
    """Every row written to a bool tensor holds only bytes 0 and 1 (torch gives other bytes no meaning)."""
    if not requests:
        return
    specs = requests[0].header.architecture.tensors
    for j in (j for j, s in enumerate(specs) if s.dtype == torch.bool and s.nbytes):
        size = specs[j].nbytes
        starts = np.concatenate([r.dst_rows[r.tensors == j] for r in requests]).astype(np.int64)
        counts = np.concatenate([r.counts[r.tensors == j] for r in requests]).astype(np.int64)
        if not len(starts):
            continue
        rows = destinations[j].reshape(-1, size)
        order = np.argsort(starts, kind="stable")
        starts, counts = starts[order], counts[order]
        if starts[0] == 0 and np.array_equal(starts[1:], np.cumsum(counts)[:-1]) and counts.sum() == len(rows):
            written = rows  # every row, as in full reads: no copy
        else:
            written = rows[np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())]
        if written.size and int(written.max()) > 1:
            raise IntegrityError(
                f"bool tensor {specs[j].name!r} holds a byte other than 0 and 1: FORMAT.md stores bool as 0 or 1; "
                "the data is corrupt"
            )


def _read_one(request: RowRequest, destinations: list[np.ndarray]) -> np.ndarray:
    if request.header.layout.chunking is None:
        if request.xor:
            raise FormatError("only compressed objects hold XOR deltas")
        return _read_by_readers([request], destinations)[0]
    return _read_compressed(request, destinations)


def _read_compressed(request: RowRequest, destinations: list[np.ndarray]) -> np.ndarray:
    """Decode the chunks that hold the requested rows and copy (or XOR) those rows into place."""
    assert request.counts is not None
    return compressed.read_rows(request.source, request.header, request.tensors, request.stored_rows, request.counts,
                                request.dst_rows, destinations, request.xor)


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


def _verify_columns(models: np.ndarray, computed: np.ndarray, stored: np.ndarray, what: str) -> None:
    """verify_rows for computed hashes ``[n_tensors, len(models)]`` against a stored table
    ``[len(models), n_tensors]``, without building per-(model, tensor) index arrays."""
    bad = np.flatnonzero(computed != stored.T)
    if len(bad):
        j, p = divmod(int(bad[0]), len(models))
        raise IntegrityError(
            f"{len(bad)} tensor slice(s) of {what} fail their checksum, first: model {int(models[p])} "
            f"tensor #{j}; the data is corrupt"
        )


def runs(sorted_unique: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Consecutive index runs of a sorted unique array: (position in the array, first index,
    length) of each, as arrays."""
    values = np.asarray(sorted_unique, np.int64)
    if len(values) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.flatnonzero(np.concatenate([[True], np.diff(values) != 1]))
    return starts, values[starts], np.diff(np.append(starts, len(values)))


def read_hash_rows(source: Reader, header: Header, models: np.ndarray) -> np.ndarray:
    """The hash-table rows ``[len(models), n_tensors]`` of sorted unique ``models``."""
    width = len(header.architecture)
    table = np.empty((len(models), width), dtype="<u8")
    row_bytes = width * 8
    positions, firsts, counts = (a.astype(U64) for a in runs(models))
    if len(counts) and row_bytes:
        start = U64(header.data_start + header.layout.hashes_offset)
        source.read_segments(
            start + firsts * U64(row_bytes), counts * U64(row_bytes), [table.reshape(-1).view(np.uint8)],
            np.zeros(len(counts), U64), positions * U64(row_bytes),
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
    check_stacked(source, header)
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
    stored = read_models_into(source, header, unique, tensors, verify=verify)
    loaded = ModelSet._trusted(arch, tensors, len(unique))
    if inverse is None or np.array_equal(unique, wanted):
        return loaded, stored
    return loaded.select(inverse), stored[inverse]


def check_stacked(source: Reader, header: Header) -> None:
    """A stacked object of the size its header states (what :func:`read_models_into` reads)."""
    if header.layout.kind != STACKED:
        raise FormatError(
            "this object holds only the changed rows of an Update version; recover it through its repository"
        )
    check_size(source, header)


def read_models_into(source: Reader, header: Header, models: np.ndarray, tensors: dict[str, torch.Tensor], *,
                     verify: bool = True) -> np.ndarray:
    """Read the sorted unique ``models`` of a stacked object (checked by :func:`check_stacked`) into
    contiguous host ``tensors`` (``[len(models), *shape]`` by name); return their stored hashes,
    which the rows were checked against unless ``verify=False``."""
    arch = header.architecture
    width = len(arch)
    # One run per tensor and run of consecutive models: a full read is `width` runs, whatever
    # the number of models.
    positions, firsts, counts = runs(models)
    request = RowRequest(
        source, header, np.repeat(np.arange(width), len(counts)), np.tile(firsts, width), np.tile(positions, width),
        counts=np.tile(counts, width).astype(U64),
    )
    destinations = [packing.byte_view(tensors[s.name]) for s in arch.tensors]
    computed = read_rows_many([request], destinations)[0].reshape(width, len(models))
    stored = read_hash_rows(source, header, models)
    if verify:
        _verify_columns(models, computed, stored, "the file")
    return stored


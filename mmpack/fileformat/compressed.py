"""Reading rows of compressed objects: decode only the chunks that hold them.

Both codecs share the plan: runs of requested rows are cut at chunk
boundaries, and every chunk that holds a requested row is decoded once. A
chunk whose rows all land, in order, on consecutive destination rows (full
reads of stacked objects) decodes straight into the destination and has its
rows hashed there; other chunks decode into scratch memory, from which the
rows are copied (or XORed) into place and hashed in one native call.

Version 2 (zstd byte planes) decodes chunk by chunk on a thread pool
(zstandard and the kernels release the GIL); version 3 (rANS fields) hands
every chunk of a read to the kernels in one call, which decode and hash them
on the kernels' threads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmpack import _native, compression, rans
from mmpack.errors import FormatError
from mmpack.fileformat.header import Header, Reader

U64 = np.uint64


@dataclass(frozen=True)
class Pieces:
    """Requested rows cut at chunk boundaries: piece k is stored rows [begin[k], end[k]) of
    chunk chunk[k] of tensor tensor[k], going to destination rows from target[k] on, with
    their hashes from hash_at[k] on. ``groups`` lists the pieces of each chunk (one array per
    chunk, in tensor and chunk order)."""

    tensor: np.ndarray
    chunk: np.ndarray
    begin: np.ndarray
    end: np.ndarray
    target: np.ndarray
    hash_at: np.ndarray
    groups: list[np.ndarray]


def plan(header: Header, tensors: np.ndarray, first: np.ndarray, counts: np.ndarray, dst: np.ndarray) -> Pieces:
    """Cut runs (``counts[k]`` rows of tensor ``tensors[k]`` from stored row ``first[k]``, to
    destination rows from ``dst[k]``) at the chunk boundaries of a compressed object."""
    layout = header.layout
    chunking = layout.chunking
    assert chunking is not None
    t, first, counts, dst = (np.asarray(a).astype(np.int64) for a in (tensors, first, counts, dst))
    if np.any(first < 0) or np.any(first + counts > np.array(layout.rows, np.int64)[t]):
        raise FormatError("a requested row lies outside the object's stored rows")
    per_chunk = np.array(chunking.chunk_rows, np.int64)[t]
    first_chunk, last_chunk = first // per_chunk, (first + counts - 1) // per_chunk
    n_pieces = np.where(counts > 0, last_chunk - first_chunk + 1, 0)
    run = np.repeat(np.arange(len(t)), n_pieces)
    chunk = first_chunk[run] + np.arange(len(run)) - np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)
    begin = np.maximum(first[run], chunk * per_chunk[run])
    end = np.minimum(first[run] + counts[run], (chunk + 1) * per_chunk[run])
    hash_at = (np.cumsum(counts) - counts)[run] + begin - first[run]
    target = dst[run] + begin - first[run]
    tensor = t[run]
    key = tensor * (int(chunk.max(initial=0)) + 1) + chunk
    order = np.argsort(key, kind="stable")
    groups = np.split(order, np.flatnonzero(np.diff(key[order])) + 1) if len(order) else []
    return Pieces(tensor, chunk, begin, end, target, hash_at, groups)


def read_rows(
    source: Reader, header: Header, tensors: np.ndarray, first: np.ndarray, counts: np.ndarray, dst: np.ndarray,
    destinations: list[np.ndarray], xor: bool,
) -> np.ndarray:
    """Decode the requested runs of a compressed object into ``destinations`` (byte views of
    stacked tensors), copying or (``xor``) XORing them into place; return each row's XXH3-64,
    rows numbered in run order."""
    hashes = np.empty(int(np.asarray(counts, np.int64).sum()), U64)
    if len(hashes) == 0:
        return hashes
    pieces = plan(header, tensors, first, counts, dst)
    if isinstance(header.layout.chunking, rans.RansChunking):
        _read_rans(source, header, pieces, destinations, xor, hashes)
    else:
        _read_zstd(source, header, pieces, destinations, xor, hashes)
    return hashes


def _whole_chunk(pieces: Pieces, group: np.ndarray, chunk_first: int, count: int, xor: bool) -> bool:
    k = group[0]
    return not xor and len(group) == 1 and pieces.begin[k] == chunk_first and pieces.end[k] - chunk_first == count


def _scatter_rows(
    pieces: Pieces, group: np.ndarray, scratch_at: int, chunk_first: int, size: int, j: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row of a group decoded to ``scratch`` at ``scratch_at``: (scratch offset, destination
    offset, tensor, hash index)."""
    n = (pieces.end[group] - pieces.begin[group]).astype(np.int64)
    within = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    rows_from = np.repeat(pieces.begin[group] - chunk_first, n) + within
    rows_to = np.repeat(pieces.target[group], n) + within
    return (scratch_at + rows_from * size, rows_to * size, np.full(len(within), j, np.int64),
            np.repeat(pieces.hash_at[group], n) + within)


def _copy_rows(scratch: np.ndarray, parts: list[tuple], size_of: np.ndarray, destinations: list[np.ndarray],
               xor: bool, hashes: np.ndarray) -> None:
    if not parts:
        return
    src, to, tensor, at = (np.concatenate(column) for column in zip(*parts))
    out = np.empty(len(src), U64)
    _native.copy_segments(
        [scratch], np.zeros(len(src), U64), src.astype(U64), destinations, tensor.astype(U64), to.astype(U64),
        size_of[tensor].astype(U64), out, xor=xor,
    )
    hashes[at] = out


def _read_rans(source: Reader, header: Header, pieces: Pieces, destinations: list[np.ndarray], xor: bool,
               hashes: np.ndarray) -> None:
    layout, arch = header.layout, header.architecture
    chunking = layout.chunking
    assert isinstance(chunking, rans.RansChunking)
    row_bytes = np.array([s.nbytes for s in arch.tensors], np.int64)
    # Chunk runs to read, per tensor: consecutive needed chunks are one read.
    needed: dict[int, list[int]] = {}
    for group in pieces.groups:
        needed.setdefault(int(pieces.tensor[group[0]]), []).append(int(pieces.chunk[group[0]]))
    tables, table_of, payloads, payload_of = [], {}, [], {}
    for j, chunks in needed.items():
        if row_bytes[j] == 0:
            continue
        base = header.data_start + layout.tensor_offsets[j]
        table_of[j] = len(tables)
        tables.append(source.read(base, chunking.tables[j], "a table block"))
        starts = chunking.starts[j]
        runs = np.split(np.array(chunks), np.flatnonzero(np.diff(chunks) != 1) + 1)
        for run in runs:
            begin, stop = int(starts[run[0]]), int(starts[run[-1] + 1])
            data = source.read(base + begin, stop - begin, "compressed chunks")
            for c in run:
                payload_of[(j, int(c))] = (len(payloads), int(starts[c]) - begin)
            payloads.append(data)
    jobs, parts = [], []
    scratch_bytes = 0
    for group in pieces.groups:
        j, c = int(pieces.tensor[group[0]]), int(pieces.chunk[group[0]])
        size = int(row_bytes[j])
        chunk_first = c * chunking.chunk_rows[j]
        count = min(chunk_first + chunking.chunk_rows[j], layout.rows[j]) - chunk_first
        if size == 0:  # zero-element rows: nothing is stored, every row hashes as empty bytes
            for k in group:
                hashes[pieces.hash_at[k] : pieces.hash_at[k] + pieces.end[k] - pieces.begin[k]] = _native.xxh3_64(b"")
            continue
        payload, offset = payload_of[(j, c)]
        length = chunking.lengths[j][c]
        if _whole_chunk(pieces, group, chunk_first, count, xor):
            k = group[0]
            jobs.append((table_of[j], payload, offset, length, 1 + j, int(pieces.target[k]) * size, count * size, size,
                         int(pieces.hash_at[k])))
        else:
            jobs.append((table_of[j], payload, offset, length, 0, scratch_bytes, count * size, 0, 0))
            parts.append((group, scratch_bytes, chunk_first, size, j))
            scratch_bytes += count * size
    scratch = np.empty(scratch_bytes, np.uint8)
    if jobs:
        layouts = [chunking.layouts[j] for j in table_of]
        rans.decode(tables, layouts, payloads, np.array(jobs, np.uint64), [scratch, *destinations], hashes)
    rows = [_scatter_rows(pieces, group, at, first, size, j) for group, at, first, size, j in parts]
    _copy_rows(scratch, rows, row_bytes, destinations, xor, hashes)


def _read_zstd(source: Reader, header: Header, pieces: Pieces, destinations: list[np.ndarray], xor: bool,
               hashes: np.ndarray) -> None:
    layout, arch = header.layout, header.architecture
    chunking = layout.chunking
    assert isinstance(chunking, compression.Chunking)
    row_bytes = [s.nbytes for s in arch.tensors]

    def decode(group: np.ndarray) -> None:
        j, c = int(pieces.tensor[group[0]]), int(pieces.chunk[group[0]])
        rows_per_chunk, width = chunking.chunk_rows[j], chunking.widths[j]
        start, stop = (int(x) for x in chunking.starts[j][c : c + 2])
        payload = source.read(header.data_start + layout.tensor_offsets[j] + start, stop - start, "a chunk")
        chunk_first = c * rows_per_chunk
        count = min(chunk_first + rows_per_chunk, layout.rows[j]) - chunk_first
        plane_lengths = chunking.lengths[j][c * width : (c + 1) * width]
        size = row_bytes[j]
        if _whole_chunk(pieces, group, chunk_first, count, xor):
            # The whole chunk lands on consecutive rows: decode in place and hash the rows
            # there, sparing a copy through a scratch buffer.
            k = group[0]
            at = int(pieces.target[k]) * size
            into = destinations[j][at : at + count * size]
            compression.decode_chunk(payload, plane_lengths, width, into)
            _native.hash_rows(into, size, hashes[pieces.hash_at[k] : pieces.hash_at[k] + count])
            return
        raw = np.empty(count * size, np.uint8)
        compression.decode_chunk(payload, plane_lengths, width, raw)
        _copy_rows(raw, [_scatter_rows(pieces, group, 0, chunk_first, size, j)], np.array(row_bytes, np.int64),
                   destinations, xor, hashes)

    total = sum(
        int((pieces.end[g] - pieces.begin[g]).sum()) * row_bytes[int(pieces.tensor[g[0]])] for g in pieces.groups
    )
    compression.parallel_map(decode, pieces.groups, total)

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
on the kernels' threads. A version 3 read of a few chunks (one model's rows)
is planned with Python integers, a larger one with arrays: the same jobs.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from mmpack import _native, compression, rans
from mmpack.errors import FormatError, InvalidArgumentError
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
    order: np.ndarray  # piece indices grouped by chunk (tensor, then chunk order)
    group_starts: np.ndarray  # where each chunk's pieces start in ``order``, then len(order)

    @property
    def groups(self) -> list[np.ndarray]:
        return np.split(self.order, self.group_starts[1:-1]) if len(self.order) else []


_BAD_RUN = "runs need a tensor index of the object, and row counts and destination rows from 0"
_OUTSIDE = "a requested row lies outside the object's stored rows"


def plan(header: Header, tensors: np.ndarray, first: np.ndarray, counts: np.ndarray, dst: np.ndarray) -> Pieces:
    """Cut runs (``counts[k]`` rows of tensor ``tensors[k]`` from stored row ``first[k]``, to
    destination rows from ``dst[k]``) at the chunk boundaries of a compressed object."""
    per = header.per_tensor
    assert per.chunk_rows is not None
    t, first, counts, dst = (np.asarray(a, np.int64) for a in (tensors, first, counts, dst))
    if len(t) and (min(t.min(), counts.min(), dst.min()) < 0 or t.max() >= len(per.rows)):
        raise InvalidArgumentError(_BAD_RUN)
    if (first < 0).any() or (first > per.rows[t] - counts).any():  # (first + counts may overflow)
        raise FormatError(_OUTSIDE)
    per_chunk = per.chunk_rows[t]
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
    ordered = key[order]
    starts = np.concatenate(([0], np.flatnonzero(ordered[1:] != ordered[:-1]) + 1, [len(order)])) if len(order) else [0]
    return Pieces(tensor, chunk, begin, end, target, hash_at, order, np.asarray(starts, np.int64))


def read_rows(
    source: Reader, header: Header, tensors: np.ndarray, first: np.ndarray, counts: np.ndarray, dst: np.ndarray,
    destinations: list[np.ndarray], xor: bool,
) -> np.ndarray:
    """Decode the requested runs of a compressed object into ``destinations`` (byte views of
    stacked tensors), copying or (``xor``) XORing them into place; return each row's XXH3-64,
    rows numbered in run order."""
    counts = np.asarray(counts, np.int64)
    if len(counts) and counts.min() < 0:
        raise InvalidArgumentError(_BAD_RUN)
    hashes = np.empty(int(counts.sum()), U64)
    if len(hashes) == 0:
        return hashes
    if isinstance(header.layout.chunking, rans.RansChunking) and _read_rans_few(
            source, header, tensors, first, counts, dst, destinations, xor, hashes):
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


# Staging per round: the scratch of chunks not decoded in place, plus the compressed bytes read
# ahead of decoding when the kernels cannot read the file themselves. The buffers a round uses
# are kept per thread and reused, so a read does not fault in fresh pages for them.
_ROUND_BYTES = 8 << 20
_KEEP_BYTES = 32 << 20  # larger buffers (one huge chunk) are not kept
_local = threading.local()


def _scratch(name: str, size: int) -> np.ndarray:
    """A buffer of ``size`` bytes for this thread, reused from an earlier read when it is large enough."""
    cache = _local.__dict__.setdefault("buffers", {})
    buffer = cache.get(name)
    if buffer is None or len(buffer) < size:
        buffer = np.empty(max(size, 64), np.uint8)
        if size <= _KEEP_BYTES:
            cache[name] = buffer
    return buffer[:size]


def _read_rans(source: Reader, header: Header, pieces: Pieces, destinations: list[np.ndarray], xor: bool,
               hashes: np.ndarray) -> None:
    """Version 3: every chunk's read, decode job and row copies planned as arrays (a full read of
    5,000 FFNN-48 models touches about 400 chunks), then decoded in rounds of _ROUND_BYTES."""
    chunking, per = header.layout.chunking, header.per_tensor
    assert isinstance(chunking, rans.RansChunking) and per.chunk_rows is not None
    first_piece = pieces.order[pieces.group_starts[:-1]]
    n_pieces = np.diff(pieces.group_starts)
    j, c = pieces.tensor[first_piece], pieces.chunk[first_piece]
    size = per.row_bytes[j]
    order = pieces.order
    empty = size == 0
    if empty.any():  # zero-element rows: nothing is stored, every row hashes as empty bytes
        for k in pieces.order[np.repeat(empty, n_pieces)]:
            hashes[pieces.hash_at[k] : pieces.hash_at[k] + pieces.end[k] - pieces.begin[k]] = _native.xxh3_64(b"")
        keep = ~empty
        first_piece, n_pieces, j, c, size = first_piece[keep], n_pieces[keep], j[keep], c[keep], size[keep]
        order = order[np.repeat(keep, np.diff(pieces.group_starts))]
    if not len(j):
        return
    per_chunk = per.chunk_rows[j]
    chunk_first = c * per_chunk
    count = np.minimum(chunk_first + per_chunk, per.rows[j]) - chunk_first
    flat = chunking.flat_base[j] + c
    position = chunking.flat_starts[flat]
    length = chunking.flat_starts[flat + 1] - position
    offset = per.starts[j] + position
    whole = (n_pieces == 1) & (pieces.begin[first_piece] == chunk_first)
    whole &= (pieces.end[first_piece] - chunk_first == count) & (not xor)
    new_tensor = np.concatenate(([True], j[1:] != j[:-1]))  # chunks come in tensor order
    tensors_used, table_index = j[new_tensor], np.cumsum(new_tensor) - 1
    tables, read = _table_blocks(source, header, tensors_used.tolist())
    layouts = [chunking.layouts[t] for t in tensors_used.tolist()]
    # Rounds: runs of consecutive chunks up to _ROUND_BYTES of staging (at least one each): the
    # stored bytes read ahead of decoding, unless the kernels read chunks from the file
    # themselves, and the scratch that chunks not decoded in place decode into.
    files = source.descriptor()
    ends = np.cumsum(np.where(whole, 0, count * size) + (0 if files else length))
    rounds, begin = [], 0
    while begin < len(j):
        limit = (ends[begin - 1] if begin else 0) + _ROUND_BYTES
        stop = len(j) if ends[-1] <= limit else max(begin + 1, int(np.searchsorted(ends, limit, "right")))
        rounds.append(slice(begin, stop))
        begin = stop
    piece_starts = np.cumsum(n_pieces) - n_pieces
    for r in rounds:
        pieces_of_round = order[piece_starts[r.start] : piece_starts[r.stop - 1] + n_pieces[r.stop - 1]]
        _decode_round(source, files, pieces, pieces_of_round, n_pieces[r], j[r], size[r], offset[r], length[r],
                      chunk_first[r], count[r], whole[r], table_index[r], tables, layouts, destinations, xor, hashes)
    per.table_blocks.update(read)  # only once chunks have decoded with them


def _table_blocks(source: Reader, header: Header, tensors: list[int]) -> tuple[list[np.ndarray], dict]:
    """The table blocks of ``tensors`` (one starts each tensor's section), and those of them that
    had to be read: they join the header's blocks once chunks decode with them (a block read
    wrong by a failing store is not kept)."""
    per = header.per_tensor
    assert per.tables is not None
    known = per.table_blocks
    if all(t in known for t in tensors):
        return [known[t] for t in tensors], {}
    missing = np.array([t for t in tensors if t not in known], np.int64)
    read = {}
    if len(missing):
        lengths = per.tables[missing]
        at = np.cumsum(lengths) - lengths
        blocks = np.empty(int(lengths.sum()), np.uint8)
        source.read_segments(per.starts[missing].astype(U64), lengths.astype(U64), [blocks],
                             np.zeros(len(missing), U64), at.astype(U64))
        read = {t: blocks[a : a + n] for t, a, n in zip(missing.tolist(), at.tolist(), lengths.tolist())}
    return [known[t] if t in known else read[t] for t in tensors], read


def _decode_round(source: Reader, files: tuple[int, int] | None, pieces: Pieces, round_pieces: np.ndarray,
                  n_pieces: np.ndarray, j: np.ndarray, size: np.ndarray, offset: np.ndarray, length: np.ndarray,
                  chunk_first: np.ndarray, count: np.ndarray, whole: np.ndarray, table_index: np.ndarray,
                  tables: list, layouts: list[int], destinations: list[np.ndarray], xor: bool,
                  hashes: np.ndarray) -> None:
    """Decode some chunks in one native call: read from the file by the threads that decode them
    when ``files`` (the source's descriptor and base position) is given, else read first."""
    payload = None
    if files is None:
        payload = _scratch("payload", int(length.sum()))
        at = np.cumsum(length) - length
        # A segment per chunk: the kernels split a read among their threads by segment, and join
        # neighbouring segments into one system call themselves.
        source.read_segments(offset.astype(U64), length.astype(U64), [payload], np.zeros(len(j), U64),
                             at.astype(U64))
    else:
        at = offset + files[1]
    group_at = np.cumsum(n_pieces) - n_pieces
    # A chunk not decoded in place decodes into scratch only as far as its last wanted row: a
    # chunk's streams are read from its start, and the rows it yields are checked against their
    # stored hashes, so the rest of it is not needed (one model of a set: about half a chunk).
    prefix_rows = np.maximum.reduceat(pieces.end[round_pieces], group_at) - chunk_first
    decoded_bytes = np.where(whole, 0, prefix_rows * size)
    scratch_at = np.cumsum(decoded_bytes) - decoded_bytes
    decoded = _scratch("decoded", int(decoded_bytes[-1] + scratch_at[-1]))
    first_piece = round_pieces[group_at]
    jobs = np.zeros((len(j), rans.JOB_COLUMNS), np.uint64)
    jobs[:, 0] = table_index
    jobs[:, 2] = at
    jobs[:, 3] = length
    jobs[:, 4] = np.where(whole, 1 + j, 0)
    jobs[:, 5] = np.where(whole, pieces.target[first_piece] * size, scratch_at)
    jobs[:, 6] = np.where(whole, count * size, decoded_bytes)
    jobs[:, 7] = np.where(whole, size, 0)
    jobs[:, 8] = np.where(whole, pieces.hash_at[first_piece], 0)
    jobs[:, 9] = count * size
    _decode_jobs(source, files, tables, layouts, jobs, payload, decoded, destinations, hashes)
    if whole.all():
        return
    # Rows of the other chunks, from the scratch into place (copied or XORed), hashed as they land.
    partial = ~whole
    per_piece = np.repeat(np.arange(len(j)), n_pieces)
    k = round_pieces[np.repeat(partial, n_pieces)]
    group = per_piece[np.repeat(partial, n_pieces)]
    n = (pieces.end[k] - pieces.begin[k]).astype(np.int64)
    within = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    row = np.repeat(pieces.begin[k] - chunk_first[group], n) + within
    rows_size = np.repeat(size[group], n)
    src = np.repeat(scratch_at[group], n) + row * rows_size
    to = (np.repeat(pieces.target[k], n) + within) * rows_size
    tensor = np.repeat(j[group], n)
    out = np.empty(len(src), U64)
    _native.copy_segments([decoded], np.zeros(len(src), U64), src.astype(U64), destinations, tensor.astype(U64),
                          to.astype(U64), rows_size.astype(U64), out, xor=xor)
    hashes[np.repeat(pieces.hash_at[k], n) + within] = out


def _decode_jobs(source: Reader, files: tuple[int, int] | None, tables: list, layouts: list[int], jobs: np.ndarray,
                 payload: np.ndarray | None, decoded: np.ndarray, destinations: list[np.ndarray],
                 hashes: np.ndarray) -> None:
    """Run decode jobs: payload index 0 is ``payload`` (chunks read already) or, with ``files``,
    the source's file; destination 0 is ``decoded``, destination 1 + j is tensor j's."""
    if files is None:
        rans.decode(tables, layouts, [payload], jobs, [decoded, *destinations], hashes)
    else:
        with source.direct_reads():
            rans.decode_files(tables, layouts, [files[0]], jobs, [decoded, *destinations], hashes,
                              [getattr(source, "name", "an object")])


# Reads of a few chunks and rows are planned with Python integers instead of arrays: for one
# model of a set (a chunk per tensor), numpy's microsecond or so a call was most of the read
# (one model of 5,000 battery FFNN-48 models: 120 us of planning around 64 us of decoding).
# Larger reads take the array plan, whose cost does not grow with their chunks.
_FEW_CHUNKS = 32
_FEW_ROWS = 256

# A piece of a chunk: its first and end stored rows, its first destination row and first hash index.
_Piece = tuple[int, int, int, int]


def _few_pieces(header: Header, row_bytes: list[int], tensors: np.ndarray, first: np.ndarray, counts: np.ndarray,
                dst: np.ndarray, hashes: np.ndarray) -> dict[tuple[int, int], list[_Piece]] | None:
    """The pieces of a read by (tensor, chunk), the hashes of its empty rows written; None when
    its runs hold more than _FEW_CHUNKS chunks or _FEW_ROWS rows. Bad runs raise as in ``plan``."""
    layout, chunking = header.layout, header.layout.chunking
    assert isinstance(chunking, rans.RansChunking)
    if len(hashes) > _FEW_ROWS or len(tensors) > _FEW_CHUNKS:
        return None
    runs = list(zip(*(np.asarray(x, np.int64).tolist() for x in (tensors, first, counts, dst))))
    # Checked as the array plan checks them: every run's indices, then every run's rows.
    if any(not 0 <= t < len(layout.rows) or n < 0 or d < 0 for t, _, n, d in runs):
        raise InvalidArgumentError(_BAD_RUN)
    if any(a < 0 or a + n > layout.rows[t] for t, a, n, _ in runs):
        raise FormatError(_OUTSIDE)
    chunks: dict[tuple[int, int], list[_Piece]] = {}
    hash_at = 0
    for t, a, n, d in runs:
        if n and not row_bytes[t]:  # zero-element rows: nothing is stored, every row hashes as empty bytes
            hashes[hash_at : hash_at + n] = _native.xxh3_64(b"")
        elif n:
            per_chunk = chunking.chunk_rows[t]
            first_chunk, last_chunk = a // per_chunk, (a + n - 1) // per_chunk
            if len(chunks) + last_chunk - first_chunk >= _FEW_CHUNKS:  # (chunks shared by runs counted twice)
                return None
            for c in range(first_chunk, last_chunk + 1):
                begin, end = max(a, c * per_chunk), min(a + n, (c + 1) * per_chunk)
                chunks.setdefault((t, c), []).append((begin, end, d + begin - a, hash_at + begin - a))
        hash_at += n
    return chunks


def _read_rans_few(source: Reader, header: Header, tensors: np.ndarray, first: np.ndarray, counts: np.ndarray,
                   dst: np.ndarray, destinations: list[np.ndarray], xor: bool, hashes: np.ndarray) -> bool:
    """``_read_rans`` for a read of a few chunks and rows (``_few_pieces``) that the array plan
    would make one round of, in one native call; False, and nothing read, for any other read."""
    row_bytes = header.per_tensor.row_bytes.tolist()
    chunks = _few_pieces(header, row_bytes, tensors, first, counts, dst, hashes)
    if chunks is None:
        return False
    if not chunks:
        return True  # empty rows only
    layout, chunking = header.layout, header.layout.chunking
    assert isinstance(chunking, rans.RansChunking)
    files = source.descriptor()
    base = 0 if files is None else files[1]  # where the object starts in its file
    tensors_used: list[int] = []
    jobs, copies, segments = [], [], []
    staged = scratch_at = round_bytes = 0
    for t, c in sorted(chunks):  # tensor by tensor, as the array plan: chunks of one table decode together
        pieces, size = chunks[t, c], row_bytes[t]
        if not tensors_used or tensors_used[-1] != t:
            tensors_used.append(t)
        chunk_first = c * chunking.chunk_rows[t]
        count = min(chunk_first + chunking.chunk_rows[t], layout.rows[t]) - chunk_first
        position, stop = int(chunking.starts[t][c]), int(chunking.starts[t][c + 1])
        offset = header.data_start + layout.tensor_offsets[t] + position
        # The chunk's place in the staged payload, or in the file the kernels read it from.
        job = [len(tensors_used) - 1, 0, staged if files is None else offset + base, stop - position]
        begin, end, target, hash_at = pieces[0]
        if not xor and len(pieces) == 1 and begin == chunk_first and end - chunk_first == count:
            job += [1 + t, target * size, count * size, size, hash_at]  # decoded in place, hashed there
        else:  # decoded into scratch as far as its last wanted row, then copied (or XORed) into place
            prefix = (max(p[1] for p in pieces) - chunk_first) * size
            job += [0, scratch_at, prefix, 0, 0]
            for begin, end, target, hash_at in pieces:
                copies += [(scratch_at + (begin - chunk_first + i) * size, t, (target + i) * size, size, hash_at + i)
                           for i in range(end - begin)]
            scratch_at += prefix
            round_bytes += count * size
        jobs.append(job + [count * size])
        if files is None:
            segments.append((offset, stop - position, staged))
            staged += stop - position
    if round_bytes + staged > _ROUND_BYTES:
        # More than the array plan's first round (which it measures by whole chunks): it splits
        # the read into rounds, so that a failing read has written the same rows either way.
        return False
    tables, read = _table_blocks(source, header, tensors_used)
    payload = None
    if files is None:
        payload = _scratch("payload", staged)
        offsets, lengths, into = (np.array(x, U64) for x in zip(*segments))
        source.read_segments(offsets, lengths, [payload], np.zeros(len(offsets), U64), into)
    decoded = _scratch("decoded", scratch_at)
    _decode_jobs(source, files, tables, [chunking.layouts[t] for t in tensors_used], np.array(jobs, U64), payload,
                 decoded, destinations, hashes)
    if copies:
        src, tensor, to, sizes, hash_index = (np.array(x, U64) for x in zip(*copies))
        out = np.empty(len(copies), U64)
        _native.copy_segments([decoded], np.zeros(len(copies), U64), src, destinations, tensor, to, sizes, out, xor=xor)
        hashes[hash_index.astype(np.int64)] = out
    header.per_tensor.table_blocks.update(read)  # only once chunks have decoded with them
    return True


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

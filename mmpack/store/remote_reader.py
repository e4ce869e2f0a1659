"""Range reads of one object in an :class:`~mmpack.store.FsspecStore`, and how wanted bytes become requests."""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import numpy as np

from mmpack import _io
from mmpack.errors import IntegrityError

U64 = np.uint64
READ_AHEAD = 64 * 1024  # the first read of an object fetches this much: preamble and header in one GET
MAX_GAP = 64 * 1024  # wanted ranges closer than this are fetched as one (at 1 Gb/s the gap costs 0.5 ms)
MAX_RANGE = 16 * 2**20  # larger ranges are split so their parts download in parallel


class RemoteReader:
    """Range reads of one object in an :class:`FsspecStore` (the ``Reader`` protocol).

    The first read fetches the object's first 64 KiB (preamble and header
    in one request, with the size on S3); ``read_segments`` merges nearby
    segments into few ranges and fetches them concurrently, then copies and
    hashes every segment in one native call. Objects are immutable, so what
    was fetched stays valid.

    Example::

        with store.open_reader("objects/3f2a.mmpack") as reader:
            header = mmpack.fileformat.read_header(reader)   # one GET: the first 64 KiB and the size
    """

    remote = True  # each read is a round trip: read_rows_many overlaps the reads of several objects

    def __init__(self, store: Any, path: str) -> None:
        self._store = store
        self._path = path
        self._size: int | None = None
        self._head: bytes | None = None
        self._lock = threading.Lock()

    def size(self) -> int:
        """Bytes of the object."""
        if self._size is None:
            self._load_head()
        if self._size is None:
            self._size = int(self._store._info(self._path)["size"])
        return self._size

    def descriptor(self) -> None:
        """Remote objects are no local files: readers fetch ranges."""
        return None

    def direct_reads(self) -> contextlib.AbstractContextManager[None]:
        """No descriptor, so no reads made outside the reader: nothing to translate."""
        return contextlib.nullcontext()

    def read(self, offset: int, size: int, what: str) -> bytes:
        """``size`` bytes at ``offset``."""
        out = bytearray(size)
        self.read_into(offset, memoryview(out), what)
        return bytes(out)

    def read_into(self, offset: int, target: memoryview, what: str) -> None:
        """Fill ``target`` with the bytes at ``offset``; a short object raises IntegrityError."""
        if target.format != "B" or target.ndim != 1:
            target = target.cast("B")
        end = offset + target.nbytes
        if target.nbytes == 0:
            return
        data = self._load_head()[offset:end] if end <= READ_AHEAD else self._store._read(self._path, offset, end)
        if len(data) != target.nbytes:
            raise IntegrityError(
                f"object ends inside {what}: needed {target.nbytes} bytes at offset {offset}, got {len(data)}"
            )
        target[:] = data

    def read_segments(
        self,
        offsets: np.ndarray,
        lengths: np.ndarray,
        dst: list[np.ndarray],
        dst_index: np.ndarray,
        dst_offsets: np.ndarray,
        hashes: np.ndarray | None = None,
        counts: np.ndarray | None = None,
    ) -> None:
        """Read segment k (``lengths[k]`` bytes at ``offsets[k]``; with ``counts``, ``counts[k]``
        rows of that length) into ``dst[dst_index[k]]`` at ``dst_offsets[k]``, hashing each
        segment (row) into ``hashes`` if given; a short object raises IntegrityError."""
        offsets = np.asarray(offsets, dtype=U64)
        lengths = np.asarray(lengths, dtype=U64)
        counts = np.ones(len(lengths), U64) if counts is None else np.asarray(counts, dtype=U64)
        if len(lengths) == 0:
            return
        spans = lengths * counts
        head = self._head
        if head is not None and int((offsets + spans).max()) <= len(head):
            sources, owner, starts = [np.frombuffer(head, np.uint8)], np.zeros(len(offsets), U64), np.zeros(1, U64)
        else:
            starts, ends, owner = plan_ranges(offsets, spans)
            blobs = self._store._read_ranges(self._path, starts.tolist(), ends.tolist())
            for s, e, blob in zip(starts.tolist(), ends.tolist(), blobs):
                if len(blob) != e - s:
                    raise IntegrityError(f"object is truncated: bytes {s}..{e} were asked for, {len(blob)} came")
            sources = [np.frombuffer(blob, np.uint8) for blob in blobs]
        _io.copy_runs(
            sources, owner, offsets - starts[owner.astype(np.intp)], lengths, counts, dst,
            np.asarray(dst_index, U64), np.asarray(dst_offsets, U64), hashes,
        )

    def _load_head(self) -> bytes:
        with self._lock:
            if self._head is None:
                self._head, size = self._store._read_head(self._path, READ_AHEAD)
                if size is not None:
                    self._size = size
            return self._head


def plan_ranges(
    offsets: np.ndarray, lengths: np.ndarray, max_gap: int = MAX_GAP, max_range: int = MAX_RANGE
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """plan_ranges(offsets, lengths) -> (starts, ends, owner)

    Merge segments into byte ranges to fetch: neighbours closer than
    ``max_gap`` share a range, and ranges stop growing past about
    ``max_range`` so that large reads split into parallel parts. ``owner[k]``
    is the range holding segment k. Vectorised: a full recovery plans
    tens of thousands of rows.

    Example::

        starts, ends, owner = plan_ranges(np.array([0, 100, 10**9]), np.array([10, 10, 10]))
        # starts [0, 10**9], ends [110, 10**9 + 10], owner [0, 0, 1]
    """
    offsets = np.asarray(offsets, dtype=U64)
    order = np.argsort(offsets, kind="stable")
    s = offsets[order].astype(np.int64)
    e = s + np.asarray(lengths, dtype=U64)[order].astype(np.int64)
    reach = np.maximum.accumulate(e)  # segments may overlap: a range ends at the furthest end so far
    part = (s - s[0]) // max_range
    # A split at a part boundary needs bytes to start there: an empty segment on the boundary
    # stays in the range before it, which it touches, instead of making an empty range.
    breaks = (s[1:] > reach[:-1] + max_gap) | ((part[1:] != part[:-1]) & (s[1:] >= reach[:-1]) & (e[1:] > s[1:]))
    firsts = np.concatenate([[0], np.flatnonzero(breaks) + 1])
    starts = s[firsts]
    ends = np.maximum.reduceat(e, firsts)
    owner = np.empty(len(s), dtype=U64)
    owner[order] = np.concatenate([[0], np.cumsum(breaks)]).astype(U64)
    return starts.astype(U64), ends.astype(U64), owner

"""Data objects of a repository: fresh keys, writes, and readers kept open.

Objects are immutable once published, so an open reader, its parsed header
and its verified tail (row index and hash table) are cached by key and never
go stale. Recovering a version touches the same objects again and again;
keeping them open spares a system call or three per object per recovery.

Two promises hold whatever the number of objects and threads:

* **A reader is never closed while a read uses it.** Every use holds a
  reference; the cache closes only readers nobody holds, and a reader
  evicted (or released by :meth:`ObjectStore.close`) while in use is closed
  by its last user. A recovery may therefore hold more objects open than
  the cache keeps idle.
* **What the manifest pins is what is read.** A reference's header checksum
  and size are compared on every open; its ``pin`` (the XXH3-64 of the
  object's tail: row index and hash table, docs/REPOSITORY.md) on the first
  read of the tail, and every hash-table row the repository verifies rows
  against comes from that checked tail, held in memory. An object exchanged
  for another (same shapes, other values) therefore fails every read path,
  partial ones included.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmpack._cache import LRU
from mmpack.errors import IntegrityError, RepositoryError
from mmpack.fileformat import Header, Reader, Tail, read_header, read_tail
from mmpack.records import ObjectRef
from mmpack.store.base import Data, Store, Writer

_CACHE_ENTRIES = 512
_TAIL_BYTES = 256 << 20  # hash tables and row indexes kept in memory, all objects together
_IDLE_READERS = 64


@dataclass(eq=False)
class _Open:
    """One open object: the reader, who holds it, and whether the cache has let it go."""

    stack: contextlib.ExitStack
    reader: Reader
    users: int = 0
    retired: bool = False  # out of the cache: closed by its last user


class ObjectStore:
    """The ``objects/`` folder of a store, seen as mmpack model-set objects."""

    PREFIX = "objects/"

    def __init__(self, store: Store) -> None:
        self.store = store
        self._headers: LRU[str, Header] = LRU(_CACHE_ENTRIES)
        self._tails: LRU[str, Tail] = LRU(_CACHE_ENTRIES, _TAIL_BYTES, lambda tail: tail.nbytes)
        self._documents: LRU[str, Any] = LRU(_CACHE_ENTRIES)
        self._open: OrderedDict[str, _Open] = OrderedDict()
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _close_all, self._open, self._lock)

    def close(self) -> None:
        """Close every reader kept open; readers in use close when their reads end. The store
        stays usable: readers reopen on demand."""
        _close_all(self._open, self._lock)

    def new_key(self) -> str:
        """A key no other writer will pick (80 random bits)."""
        return f"{self.PREFIX}{secrets.token_hex(10)}.mmpack"

    def put(self, key: str, data: Data | Writer) -> None:
        self.store.put(key, data)

    @contextlib.contextmanager
    def reader(self, ref: ObjectRef) -> Iterator[tuple[Reader, Header]]:
        """``ref`` open for range reads; its header is checked against the manifest's record of it.

        The reader stays open at least until the ``with`` block ends, whatever
        other threads open or close meanwhile.
        """
        entry = self._acquire(ref.key)
        try:
            yield entry.reader, self._header(ref, entry.reader)
        finally:
            self._release(entry)

    def _acquire(self, key: str) -> _Open:
        with self._lock:
            entry = self._open.get(key)
            if entry is not None:
                entry.users += 1
                self._open.move_to_end(key)
                return entry
        stack = contextlib.ExitStack()
        try:
            source = stack.enter_context(self.store.open_reader(key))
        except FileNotFoundError:
            stack.close()
            raise RepositoryError(f"data object {key} is missing from the store") from None
        except BaseException:
            stack.close()
            raise
        opened = _Open(stack, source, users=1)
        with self._lock:
            entry = self._open.get(key)
            if entry is not None:  # another thread opened it meanwhile: use theirs
                entry.users += 1
            else:
                entry = self._open[key] = opened
                self._trim()
        if entry is not opened:
            stack.close()
        return entry

    def _release(self, entry: _Open) -> None:
        with self._lock:
            entry.users -= 1
            close = entry.retired and entry.users == 0
            if not close:
                self._trim()
        if close:
            entry.stack.close()

    def _trim(self) -> None:
        """Close the least recently used idle readers beyond the cache's size (lock held)."""
        idle = [key for key, e in self._open.items() if e.users == 0]
        for key in idle[: max(0, len(idle) - _IDLE_READERS)]:
            self._open.pop(key).stack.close()

    def open_many(self, refs: list[ObjectRef]) -> None:
        """Open several objects and read their headers at once, in threads: on a remote store each
        costs a round trip, and they need not wait for each other."""
        with self._lock:
            missing = list({ref.key: ref for ref in refs if ref.key not in self._open}.values())
        if len(missing) > 1:
            with ThreadPoolExecutor(min(len(missing), 16)) as pool:
                list(pool.map(self.header, missing))

    def header(self, ref: ObjectRef) -> Header:
        with self.reader(ref) as (_, header):
            return header

    def tail(self, ref: ObjectRef, opened: tuple[Reader, Header] | None = None) -> Tail:
        """The object's row index (rows layout) and hash table, checked against ``ref.pin`` (when
        the manifest has one) and kept in memory; ``opened`` reuses a reader the caller holds."""
        found = self._tails.get(ref.key)
        if found is None:
            if opened is None:
                with self.reader(ref) as (source, header):
                    found = read_tail(source, header)
            else:
                found = read_tail(*opened)
        if ref.pin is not None and found.digest != ref.pin:
            raise IntegrityError(
                f"data object {ref.key} is not the object its manifest names (its content differs from "
                "the pinned one): the repository is damaged, or objects were exchanged"
            )
        return self._tails.put(ref.key, found)

    def row_index(self, ref: ObjectRef, opened: tuple[Reader, Header] | None = None) -> list[np.ndarray]:
        """Model ids of the stored rows of each tensor (rows-layout objects)."""
        index = self.tail(ref, opened).row_index
        if index is None:
            raise RepositoryError(f"data object {ref.key} holds every row: it has no row index")
        return list(index)

    def hash_rows(self, ref: ObjectRef, models: np.ndarray, opened: tuple[Reader, Header] | None = None) -> np.ndarray:
        """Stored hash-table rows of sorted unique ``models``, from the pinned tail."""
        return self.tail(ref, opened).table[models]

    def cached_document(self, key: str) -> Any:
        """What :meth:`cache_document` kept for ``key`` (a parsed non-model-set object), or None."""
        return self._documents.get(key)

    def cache_document(self, key: str, parsed: Any) -> None:
        """Keep the parsed form of an immutable object (provenance records...)."""
        self._documents.put(key, parsed)

    def _header(self, ref: ObjectRef, source: Reader) -> Header:
        header = self._headers.get(ref.key)
        if header is None:
            header = read_header(source)
            actual = source.size()
            if actual != header.file_size:  # before anything trusts the sizes the header declares
                problem = "truncated" if actual < header.file_size else "followed by trailing bytes"
                raise IntegrityError(f"data object {ref.key} is {problem}: {actual} bytes, its header describes "
                                     f"{header.file_size}")
            self._headers.put(ref.key, header)
        # Compared on every use: two manifests may name one key with different expectations.
        if header.header_hash != ref.checksum or header.file_size != ref.bytes:
            raise IntegrityError(
                f"data object {ref.key} does not match its manifest (header or size differs): "
                "the repository is damaged"
            )
        return header


def _close_all(open_readers: OrderedDict[str, _Open], lock: threading.Lock) -> None:
    with lock:
        entries = list(open_readers.values())
        open_readers.clear()
        idle = [e for e in entries if e.users == 0]
        for e in entries:
            e.retired = True
    for e in idle:
        e.stack.close()

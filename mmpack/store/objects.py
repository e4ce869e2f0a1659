"""Data objects of a repository: fresh keys, writes, and readers kept open.

Objects are immutable once published, so an open reader (a memory mapping,
for local files), its parsed header and row index are cached by key and never
go stale. Recovering a version touches the same objects again and again;
keeping them open spares a system call or three per object per recovery and
keeps their pages mapped.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from mmpack.errors import IntegrityError, RepositoryError
from mmpack.fileformat import Header, Reader, read_hash_rows, read_header, read_row_index
from mmpack.records import ObjectRef
from mmpack.store.base import Data, Store, Writer

_CACHE_ENTRIES = 512
_OPEN_READERS = 64


class ObjectStore:
    """The ``objects/`` folder of a store, seen as mmpack model-set objects."""

    PREFIX = "objects/"

    def __init__(self, store: Store) -> None:
        self.store = store
        self._headers: OrderedDict[str, Header] = OrderedDict()
        self._row_indexes: OrderedDict[str, list[np.ndarray]] = OrderedDict()
        self._documents: OrderedDict[str, Any] = OrderedDict()
        self._open: OrderedDict[str, tuple[contextlib.ExitStack, Reader]] = OrderedDict()
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _close_all, self._open)

    def close(self) -> None:
        """Close every reader kept open (the store stays usable; readers reopen on demand)."""
        with self._lock:
            _close_all(self._open)

    def new_key(self) -> str:
        """A key no other writer will pick (80 random bits)."""
        return f"{self.PREFIX}{secrets.token_hex(10)}.mmpack"

    def put(self, key: str, data: Data | Writer) -> None:
        self.store.put(key, data)

    @contextlib.contextmanager
    def reader(self, ref: ObjectRef) -> Iterator[tuple[Reader, Header]]:
        """``ref`` open for range reads; its header is checked against the manifest's record of it."""
        with self._lock:
            entry = self._open.get(ref.key)
            if entry is not None:
                self._open.move_to_end(ref.key)
        if entry is None:
            stack = contextlib.ExitStack()
            try:
                source = stack.enter_context(self.store.open_reader(ref.key))
                self._header(ref, source)
            except FileNotFoundError:
                stack.close()
                raise RepositoryError(f"data object {ref.key} is missing from the store") from None
            except BaseException:
                stack.close()
                raise
            entry = (stack, source)
            with self._lock:
                self._open[ref.key] = entry
                while len(self._open) > _OPEN_READERS:
                    _, (evicted, _) = self._open.popitem(last=False)
                    evicted.close()
        yield entry[1], self._header(ref, entry[1])

    def open_many(self, refs: list[ObjectRef]) -> None:
        """Open several objects and read their headers at once, in threads: on a remote store each
        costs a round trip, and they need not wait for each other."""
        with self._lock:
            missing = list({ref.key: ref for ref in refs if ref.key not in self._open}.values())
        if len(missing) > 1:
            with ThreadPoolExecutor(min(len(missing), _OPEN_READERS, 16)) as pool:
                list(pool.map(self.header, missing))

    def header(self, ref: ObjectRef) -> Header:
        with self.reader(ref) as (_, header):
            return header

    def row_index(self, ref: ObjectRef, opened: tuple[Reader, Header] | None = None) -> list[np.ndarray]:
        """Model ids of the stored rows of each tensor (rows-layout objects); ``opened`` reuses a
        reader the caller already holds."""
        cached = _get(self._row_indexes, ref.key)
        if cached is None:
            if opened is None:
                with self.reader(ref) as (source, header):
                    cached = read_row_index(source, header)
            else:
                cached = read_row_index(*opened)
            _put(self._row_indexes, ref.key, cached)
        return cached

    def cached_document(self, key: str) -> Any:
        """What :meth:`cache_document` kept for ``key`` (a parsed non-model-set object), or None."""
        return _get(self._documents, key)

    def cache_document(self, key: str, parsed: Any) -> None:
        """Keep the parsed form of an immutable object (provenance records...)."""
        _put(self._documents, key, parsed)

    def hash_rows(self, ref: ObjectRef, models: np.ndarray, opened: tuple[Reader, Header] | None = None) -> np.ndarray:
        """Stored hash-table rows of sorted unique ``models``."""
        if opened is not None:
            return read_hash_rows(*opened, models)
        with self.reader(ref) as (source, header):
            return read_hash_rows(source, header, models)

    def _header(self, ref: ObjectRef, source: Reader) -> Header:
        header = _get(self._headers, ref.key)
        if header is None:
            header = read_header(source)
            if header.header_hash != ref.checksum or header.file_size != ref.bytes:
                raise IntegrityError(
                    f"data object {ref.key} does not match its manifest (header or size differs): "
                    "the repository is damaged"
                )
            _put(self._headers, ref.key, header)
        return header


def _close_all(open_readers: OrderedDict[str, tuple[contextlib.ExitStack, Reader]]) -> None:
    while open_readers:
        _, (stack, _) = open_readers.popitem()
        stack.close()


def _get(cache: OrderedDict[str, Any], key: str) -> Any:
    value = cache.get(key)
    if value is not None:
        cache.move_to_end(key)
    return value


def _put(cache: OrderedDict[str, Any], key: str, value: Any) -> None:
    cache[key] = value
    while len(cache) > _CACHE_ENTRIES:
        cache.popitem(last=False)

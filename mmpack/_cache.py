"""One cache policy for everything mmpack keeps of immutable repository data.

Manifests, headers, hash tables, row indexes and parsed documents never
change once published, so a cache of them never goes stale; the only
questions are how much to keep and what happens when several threads share
one repository. :class:`LRU` answers both: least recently used entries go
first, bounded by a count and optionally by bytes, and every operation holds
a lock, so readers in many threads may share it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRU(Generic[K, V]):
    """LRU(max_entries, max_bytes=None, size=None)

    A thread-safe least-recently-used map. ``size(value)`` gives an entry's
    bytes when ``max_bytes`` bounds the total; an entry larger than the
    bound alone is not kept at all (the caller still gets its value).

    Example::

        tables = LRU(64, max_bytes=256 << 20, size=lambda table: table.nbytes)
        table = tables.get_or_compute(vid, lambda: read_table(vid))
    """

    def __init__(self, max_entries: int, max_bytes: int | None = None, size: Callable[[V], int] | None = None) -> None:
        if max_entries < 1 or (max_bytes is not None and (max_bytes < 0 or size is None)):
            raise ValueError("an LRU needs max_entries >= 1, and a size function with max_bytes")
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._size = size
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: K) -> bool:
        return key in self._entries

    def get(self, key: K) -> V | None:
        """The value kept for ``key`` (now the most recently used), or None."""
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                return None
            self._entries.move_to_end(key)
            return found[0]

    def put(self, key: K, value: V) -> V:
        """Keep ``value`` under ``key`` (replacing any) and return it."""
        nbytes = self._size(value) if self._size is not None and self._max_bytes is not None else 0
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if self._max_bytes is not None and nbytes > self._max_bytes:
                return value
            self._entries[key] = (value, nbytes)
            self._bytes += nbytes
            while len(self._entries) > self._max_entries or (
                self._max_bytes is not None and self._bytes > self._max_bytes
            ):
                _, (_, evicted) = self._entries.popitem(last=False)
                self._bytes -= evicted
        return value

    def get_or_compute(self, key: K, compute: Callable[[], V]) -> V:
        """The value for ``key``, computed (outside the lock) and kept if absent.

        Two threads missing the same key may both compute it; values are
        immutable facts about immutable data, so either result is right.
        """
        found = self.get(key)
        if found is not None:
            return found
        return self.put(key, compute())

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

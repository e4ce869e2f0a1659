"""What a failed save leaves behind: nothing it wrote, unless its version was published after all.

A save writes fresh data objects (keys of 80 random bits no other writer
picks), then publishes them in the catalog (one create-only write). When any step fails, the
objects it wrote are deleted again, so a full disk or a lost connection
leaves the store as it was. The one hard case is a publication whose
request failed although the store applied it: S3 lost the response, or a
local ``link(2)`` succeeded and a later step of the same call failed. The
catalog entry then exists and names the objects, which must stay. So before
deleting anything, the save reads the key it created back: its own bytes
there mean the version exists, and the save succeeds; an absent key (or
another writer's manifest) means it does not; a read that fails too means
nobody can tell yet, and the objects are kept for ``gc`` to judge once
the store answers again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from mmpack.objects import ObjectStore
from mmpack.store import Store
from mmpack.store.base import Data, Writer


class WriteLog:
    """An :class:`ObjectStore` as an approach's save sees it, recording every key it writes.

    A key is recorded *before* its write starts: a write that fails after
    the store applied it (a lost response) leaves an object too.

    Example::

        log = WriteLog(repo.objects)
        with log.undone_on_failure():
            stored = approach.save(log, request)
            publish(...)
    """

    def __init__(self, objects: ObjectStore) -> None:
        self._objects = objects
        self.keys: list[str] = []
        self.kept = False  # set when the publication's outcome is unknown: the objects may be named

    def put(self, key: str, data: Data | Writer) -> None:
        self.keys.append(key)
        self._objects.put(key, data)

    def keep(self) -> None:
        """Leave every written object in place whatever happens (the version may exist)."""
        self.kept = True

    @contextlib.contextmanager
    def undone_on_failure(self) -> Iterator[None]:
        """Run the block; if it raises, :meth:`discard` what was written, then let the error go on."""
        try:
            yield
        except BaseException as exc:
            self.discard(exc)
            raise

    def discard(self, failure: BaseException) -> None:
        """Delete what was written, unless :meth:`keep` was called; a delete that fails too is noted on
        ``failure`` (the objects are then unreferenced, and ``gc`` removes them)."""
        if self.kept:
            failure.add_note(
                f"the save's objects ({', '.join(self.keys) or 'none'}) were kept: the store could not tell "
                "whether the version's manifest was published; repo.gc() removes them if it was not"
            )
            return
        for key in self.keys:
            try:
                self._objects.store.delete(key)
            except Exception as exc:  # the store is failing: keep cleaning, report every key left
                failure.add_note(f"could not remove {key} written by the failed save ({exc}); repo.gc() will")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._objects, name)


def create_once(store: Store, key: str, content: bytes, written: WriteLog | None) -> bool:
    """``store.put_if_absent(key, content)``, where a failed request that the store applied anyway
    counts as created; when nobody can tell, the objects ``written`` are kept for ``gc``."""
    try:
        return store.put_if_absent(key, content)
    except BaseException:
        outcome = published(store, key, content)
        if outcome:
            return True
        if outcome is None and written is not None:
            written.keep()
        raise


def published(store: Store, key: str, content: bytes) -> bool | None:
    """Whether ``key`` holds ``content`` after a create-only write of it failed: True (the write took
    effect, only its answer was lost), False (absent, or another writer's), None (cannot tell now)."""
    try:
        return store.get(key) == content
    except FileNotFoundError:
        return False
    except Exception:
        return None


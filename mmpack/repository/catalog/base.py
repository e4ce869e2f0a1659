"""The catalog interface: every piece of a repository's metadata, behind one object.

A catalog answers which versions exist, what each record says, which
architectures they use, and (format 2) which tags point where and how they
moved; it publishes new versions, tag moves and prunes atomically. What
derives from records (chains, hash tables, owner maps, per-model history,
diffs) lives in :mod:`mmpack.repository.catalog.tables`, on top of this
interface, so both formats answer it the same way.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

from mmpack.architecture import Architecture
from mmpack.errors import RepositoryError, VersionNotFoundError
from mmpack.objects import ObjectStore
from mmpack.records import VersionRecord
from mmpack.repository.catalog.documents import check_version_id, is_version_id, version_number
from mmpack.repository.catalog.state import TagMove
from mmpack.repository.cleanup import WriteLog
from mmpack.store import Store

MARKER = "repository.json"
MARKER_FORMAT = "mmpack-repository"


class Catalog(ABC):
    """All metadata of one repository. Thread-safe: readers in many threads may share it."""

    format_version: ClassVar[int]

    def __init__(self, store: Store, objects: ObjectStore) -> None:
        self.store = store
        self.objects = objects
        self._lock = threading.RLock()

    # -- reading -----------------------------------------------------------------------------

    @abstractmethod
    def refresh(self) -> None:
        """Catch up with what other processes published since this catalog last looked."""

    @abstractmethod
    def ids(self) -> list[str]:
        """Ids of the live versions, oldest first (after a refresh)."""

    @abstractmethod
    def record(self, vid: str) -> VersionRecord:
        """The record of a well-formed version id; VersionNotFoundError if there is none (after
        looking once more, in case another process just published it)."""

    @abstractmethod
    def architecture(self, fingerprint: str) -> Architecture:
        """The architecture with this fingerprint; RepositoryError if the catalog has none."""

    def versions(self) -> list[VersionRecord]:
        return [self.record(vid) for vid in self.ids()]

    def tags(self) -> dict[str, str]:
        """Tag name -> version id."""
        return {}

    def tag_log(self) -> list[TagMove]:
        """Every move of every tag, oldest first."""
        return []

    def resolve(self, ref: object) -> str:
        """The version id a reference names: a version id as it is, or a tag's version."""
        if is_version_id(ref):
            return ref
        if isinstance(ref, str):
            found = self.tags().get(ref)
            if found is None:
                self.refresh()
                found = self.tags().get(ref)
            if found is not None:
                return found
            raise VersionNotFoundError(
                f"no version or tag {ref!r} in {self.store!r}: "
                f"version ids look like 'v1', 'v42', tags like 'production'"
            )
        return check_version_id(ref)

    def newest(self) -> VersionRecord | None:
        ids = self.ids()
        return self.record(ids[-1]) if ids else None

    # -- writing -----------------------------------------------------------------------------

    @abstractmethod
    def publish(self, build: Callable[[str, int], VersionRecord], architecture: Architecture,
                written: WriteLog | None = None) -> VersionRecord:
        """Publish the record ``build(vid, architecture_bytes)`` under the next free id, atomically.
        ``architecture`` is the version's: stored with it if the catalog lacks it, and
        ``architecture_bytes`` says how many bytes that took (0 if it was there). ``written``: the
        save's objects, kept if the publication's outcome cannot be known (cleanup.py)."""

    def move_tag(self, name: str, to: str | None, expected: str | None, message: str) -> TagMove:
        raise self._needs_format_2("tags")

    def commit_prune(self, deleted: list[str], replaced: list[VersionRecord], message: str, seen: int) -> None:
        raise self._needs_format_2("prune")

    @property
    def seq(self) -> int:
        """A number that grows with every change to the catalog (for prune's optimism)."""
        return len(self.ids())

    def _needs_format_2(self, what: str) -> RepositoryError:
        return RepositoryError(
            f"{what} need repository format 2; {self.store!r} is format {self.format_version}: "
            "upgrade it with `mmpack upgrade REPO` (or repo.upgrade()) once no other process writes to it"
        )


def sort_ids(ids) -> list[str]:
    return sorted(ids, key=version_number)

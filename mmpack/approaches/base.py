"""The interface every approach implements: how a version is stored, and how its pieces come back."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from mmpack.modelset import ModelSet

if TYPE_CHECKING:
    from mmpack.fileformat import Header, Reader
    from mmpack.records import Changes, ObjectRef, VersionRecord
    from mmpack.store import ObjectStore


@dataclass
class SaveRequest:
    """Everything an approach may use to store one version."""

    models: ModelSet
    hashes: np.ndarray | Future[np.ndarray]  # [n_models, n_tensors]; may still be computing
    base: VersionRecord | None
    base_hashes: Callable[[], np.ndarray]  # the base version's full hash table, read lazily
    provenance: Any = None

    def resolved_hashes(self) -> np.ndarray:
        return self.hashes.result() if isinstance(self.hashes, Future) else self.hashes


@dataclass
class Stored:
    """What an approach wrote: objects, the pairs it changed (None for a full set), and notes."""

    objects: list[ObjectRef]
    changes: Changes | None
    details: dict[str, Any] = field(default_factory=dict)


class Approach(ABC):
    """One way of storing a version (Baseline, Update, Provenance).

    Approaches whose objects hold the pieces they own (``stores_rows``) say
    where with :meth:`locate`, and the repository copies them; others rebuild
    their pieces (see :class:`~mmpack.approaches.provenance.ProvenanceApproach`).
    """

    name: ClassVar[str]
    stores_rows: ClassVar[bool] = True

    @abstractmethod
    def save(self, objects: ObjectStore, request: SaveRequest) -> Stored:
        """Write the version's objects; do not publish anything."""

    @abstractmethod
    def locate(
        self,
        objects: ObjectStore,
        record: VersionRecord,
        opened: tuple[Reader, Header],
        models: np.ndarray,
        tensors: np.ndarray,
    ) -> np.ndarray:
        """Where the version's data object (open as ``opened``) stores each (``models[k]``,
        ``tensors[k]``): the row of that tensor's section. Only pairs the version owns are asked
        for: every pair of a full version, the pairs in its change list otherwise."""

    @abstractmethod
    def check(self, objects: ObjectStore, record: VersionRecord) -> None:
        """Read the version's objects whole and check every checksum; raise on the first problem."""

    def hash_table(self, objects: ObjectStore, record: VersionRecord, base_table: Callable[[], np.ndarray]) -> np.ndarray:
        """The version's XXH3-64 of every (model, tensor); stored-row approaches keep it in their object."""
        return objects.hash_rows(record.objects[0], np.arange(record.n_models))

    def stores_table(self, record: VersionRecord) -> bool:
        """Whether the version's own object holds its whole hash table (so rows can be range-read)."""
        return True

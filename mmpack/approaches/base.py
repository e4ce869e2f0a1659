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
    """One way of storing a version (Baseline, Update, Provenance)."""

    name: ClassVar[str]

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

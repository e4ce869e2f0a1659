"""The interface every approach implements: how a version is stored, and how its pieces come back."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from mmpack.compression import Compression
from mmpack.errors import RepositoryError
from mmpack.modelset import ModelSet

if TYPE_CHECKING:
    from mmpack.approaches.advisor import CostModel, Estimate
    from mmpack.fileformat import Header, Reader, Tail
    from mmpack.records import Changes, ObjectRef, VersionRecord
    from mmpack.store import ObjectStore


@dataclass
class SaveRequest:
    """Everything an approach may use to store one version.

    ``compression``: how to compress the version's objects (None: raw).
    ``xor_reference``: for delta approaches, ``(version id, fetch)`` where
    ``fetch(models)`` returns that version's values of sorted ``models`` (a
    ModelSet); the repository offers the chain's full version, so XOR
    deltas stay one level deep (docs/DESIGN-NOTES.md).
    """

    models: ModelSet
    hashes: np.ndarray | Future[np.ndarray]  # [n_models, n_tensors]; may still be computing
    base: VersionRecord | None
    base_hashes: Callable[[], np.ndarray]  # the base version's full hash table, read lazily
    provenance: Any = None
    compression: Compression | None = None
    xor_reference: tuple[str, Callable[[np.ndarray], ModelSet]] | None = None

    def resolved_hashes(self) -> np.ndarray:
        return self.hashes.result() if isinstance(self.hashes, Future) else self.hashes

    def changed(self) -> np.ndarray:
        """``[n_models, n_tensors]`` bool: which pairs differ from the base (computed once)."""
        found = getattr(self, "_changed", None)
        if found is None:
            found = self._changed = self.resolved_hashes() != self.base_hashes()
        return found

    def compression_details(self) -> dict[str, Any]:
        """What the record's ``details`` say about compression."""
        return {} if self.compression is None else {"compression": self.compression.describe()}


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
    takes_provenance: ClassVar[bool] = False  # whether save() uses SaveRequest.provenance
    #: Versions hold only what changed since their base: the manifest has a change list and a base.
    delta: ClassVar[bool] = False
    #: What a version's one object is: "model-set" (an mmpack object, pinned by its manifest) or
    #: "document" (a JSON document whose whole content the manifest's checksum covers).
    object_kind: ClassVar[str] = "model-set"

    def estimate(self, request: SaveRequest, model: CostModel) -> Estimate | None:
        """What storing ``request`` this way would cost (bytes, seconds to recover), for
        ``approach="auto"``; None when this approach cannot store it (the default: an approach
        that cannot estimate is never chosen automatically)."""
        return None

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

    def check_object(self, record: VersionRecord, header: Header, tail: Tail) -> None:
        """Raise :class:`~mmpack.RepositoryError` unless the version's (opened, pinned) object holds
        what its manifest states: model count, architecture, layout, rows. Runs before a recovery
        allocates anything from the manifest's sizes."""
        if header.n_models != record.n_models:
            raise RepositoryError(f"{record.describe()} names an object of {header.n_models} models")
        fingerprint = header.architecture.fingerprint()
        if fingerprint != record.architecture:
            raise RepositoryError(f"{record.describe()} names an object of architecture {fingerprint}, "
                                  f"not {record.architecture}")
        xor = header.layout.chunking is not None and header.layout.chunking.delta != "none"
        if xor != ("xor_base" in record.details):
            raise RepositoryError(f"{record.describe()} and its object disagree about XOR deltas")

    @abstractmethod
    def check(self, objects: ObjectStore, record: VersionRecord) -> None:
        """Read the version's objects whole and check every checksum; raise on the first problem."""

    def hash_table(self, objects: ObjectStore, record: VersionRecord, base_table: Callable[[], np.ndarray]) -> np.ndarray:
        """The version's XXH3-64 of every (model, tensor); stored-row approaches keep it in their object."""
        return objects.hash_rows(record.objects[0], np.arange(record.n_models))

    def stores_table(self, record: VersionRecord) -> bool:
        """Whether the version's own object holds its whole hash table (so rows can be range-read)."""
        return True

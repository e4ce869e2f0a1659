"""The interface every approach implements: how a version is stored, and how its pieces come back."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from mmpack.approaches.request import SaveRequest, Stored
from mmpack.errors import RepositoryError
from mmpack.records import ObjectRef

__all__ = ["Approach", "SaveRequest", "Stored", "table_object"]

if TYPE_CHECKING:
    from mmpack.approaches.advisor import CostModel, Estimate
    from mmpack.fileformat import Header, Tail
    from mmpack.modelset import ModelSet
    from mmpack.objects import ObjectStore
    from mmpack.records import VersionRecord


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
    def locate(self, record: VersionRecord, models: np.ndarray, tensors: np.ndarray) -> np.ndarray:
        """Where the version's data object stores each (``models[k]``, ``tensors[k]``): the row of
        that tensor's section, from the record alone (recovery plans are made before any object
        is opened). Only pairs the version owns are asked for: every pair of a full version, the
        pairs in its change list otherwise."""

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

    def own_hashes(
        self, objects: ObjectStore, record: VersionRecord, tail: Tail | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(models, rows)``: the hash-table rows the version's own object states, ``rows[k]``
        being model ``models[k]``'s (ascending). ``tail`` is the object's checked tail (None for
        document objects). A full version states every model; the default reads the tail."""
        return np.arange(record.n_models), tail.table


def table_object(objects: ObjectStore, models: ModelSet, table: np.ndarray) -> ObjectRef:
    """Write a *table object* (docs/REPOSITORY.md): a model-set object in the rows layout that holds
    no rows, only the whole set's hash table; a delta version carries one now and then so that its
    table never takes more than a few deltas to derive."""
    from mmpack.fileformat import encode_rows, image_pin

    image, header = encode_rows(models, np.zeros(table.shape, dtype=bool), table)
    key = objects.new_key()
    objects.put(key, image)
    return ObjectRef(key, header.file_size, header.header_hash, image_pin(image, header))

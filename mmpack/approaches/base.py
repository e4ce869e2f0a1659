"""The interface every approach implements: how a version is stored, and how its pieces come back."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from mmpack.approaches.request import SaveRequest, Stored
from mmpack.errors import RepositoryError
from mmpack.modelset import ModelSet
from mmpack.records import ObjectRef, Shard

__all__ = ["FIRST_KEY", "Approach", "SaveRequest", "Stored", "rows_of", "shard_metadata", "shard_ranges", "shard_ref",
           "table_object"]

#: Header metadata of a shard that does not start at model 0: the set's id of its first model
#: (decimal), so that the header checksum the record keeps binds the shard to its range.
FIRST_KEY = "mmpack.first"

if TYPE_CHECKING:
    from mmpack.approaches.advisor import CostModel, Estimate
    from mmpack.fileformat import Header, Tail
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
    def locate(self, record: VersionRecord, models: np.ndarray, tensors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where the version's objects store each (``models[k]``, ``tensors[k]``): ``(objects,
        rows)``, the index in ``record.objects`` of the shard holding it and the row of that
        tensor's section there, from the record alone (recovery plans are made before any object
        is opened). Only pairs the version owns are asked for: every pair of a full version, the
        pairs in its change list otherwise."""

    def check_object(self, record: VersionRecord, shard: Shard, header: Header, tail: Tail) -> None:
        """Raise :class:`~mmpack.RepositoryError` unless one of the version's (opened, pinned)
        objects holds what its record states: model count, range, architecture, layout, rows.
        Runs before a recovery allocates anything from the record's sizes."""
        self.check_header(record, shard.count, header)
        if header.metadata.get(FIRST_KEY, "0") != str(shard.first):
            raise RepositoryError(f"{record.describe()} names as its shard of models {shard.first} to "
                                  f"{shard.stop - 1} an object that holds other models")

    def check_header(self, record: VersionRecord, n_models: int, header: Header) -> None:
        """The object's model count, architecture and XOR deltas against what the record states."""
        if header.n_models != n_models:
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

    def own_hashes(self, objects: ObjectStore, record: VersionRecord, shard: Shard,
                   tail: Tail | None) -> tuple[np.ndarray, np.ndarray]:
        """``(models, rows)``: the hash-table rows one of the version's objects states, ``rows[k]``
        being model ``models[k]``'s (ascending ids of the set). ``tail`` is the object's checked
        tail (None for document objects). A full version's shard states every model of its range;
        the default reads the tail."""
        return np.arange(shard.first, shard.stop), tail.table


def shard_ref(key: str, header: Header, pin: int, first: int, count: int, table: bool = False) -> ObjectRef:
    """The reference to a shard of models ``first`` to ``first + count - 1`` (a version of one object
    drops the range when it is recorded: ``records.one_object_form``)."""
    return ObjectRef(key, header.file_size, header.header_hash, pin, first, count, table)


def shard_metadata(first: int) -> dict[str, str]:
    """Header metadata binding a shard to its first model (none for shards starting at model 0)."""
    return {FIRST_KEY: str(first)} if first else {}


def table_object(objects: ObjectStore, models: ModelSet, table: np.ndarray, first: int = 0) -> ObjectRef:
    """Write a *table object* (docs/REPOSITORY.md): a model-set object in the rows layout that holds
    no rows, only the hash table of models ``first`` to ``first + len(models) - 1``; a delta version
    carries them now and then so that its table never takes more than a few deltas to derive."""
    from mmpack.fileformat import encode_rows, image_pin

    image, header = encode_rows(models, np.zeros(table.shape, dtype=bool), table, shard_metadata(first))
    key = objects.new_key()
    objects.put(key, image)
    return shard_ref(key, header, image_pin(image, header), first, len(models), table=True)


def rows_of(ms: ModelSet, a: int, b: int) -> ModelSet:
    """Models ``a`` to ``b - 1`` of a set, as views of its tensors (no copy)."""
    return ModelSet._trusted(ms.architecture, {n: t[a:b] for n, t in ms.tensors.items()}, b - a)


def shard_ranges(n_models: int, row_bytes: np.ndarray, shard_bytes: int | None) -> list[tuple[int, int]]:
    """Cut models ``0..n_models - 1`` into ranges of at most ``shard_bytes`` bytes of rows each
    (``row_bytes[i]``: model ``i``'s; a model larger than that gets a range of its own), in order.
    None: one range."""
    if shard_bytes is None or n_models == 0:
        return [(0, n_models)]
    sizes = np.broadcast_to(np.asarray(row_bytes, np.int64), (n_models,))
    before = np.cumsum(sizes) - sizes
    group = before // max(1, int(shard_bytes))
    starts = np.flatnonzero(np.concatenate([[True], np.diff(group) != 0]))
    return [(int(a), int(b)) for a, b in zip(starts, [*starts[1:], n_models])]

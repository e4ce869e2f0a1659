"""Plain records of versions and their objects, shared by the approaches and the repository."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any

import numpy as np

from mmpack.errors import RepositoryError


@dataclass(frozen=True)
class ObjectRef:
    """One data object of a version: its key, size, and the digests binding it to the manifest.

    ``checksum`` is the XXH3-64 of a model-set object's header, or of a
    document object's whole content. ``pin`` (model-set objects of manifests
    written since format version 2) is the XXH3-64 of the object's tail, its
    row index and hash table: with the header it fixes every byte a reader
    trusts, so an object cannot be exchanged for another of the same shape
    (docs/REPOSITORY.md). None for objects recorded before pins existed.

    ``first`` and ``count`` are the range of models of the set the object
    holds (a *shard* of its version, docs/REPOSITORY.md "Shards"): models
    ``first`` to ``first + count - 1``; ``count`` None means every model of
    the version (a version of one object, as every version was before
    shards). ``table``: a *table object*, the version's hash table for that
    range and no rows, rather than a data object.
    """

    key: str
    bytes: int
    checksum: int
    pin: int | None = None
    first: int = 0
    count: int | None = None
    table: bool = False

    def stop(self, n_models: int) -> int:
        """One past the last model of the range, in a version of ``n_models`` models."""
        return n_models if self.count is None else self.first + self.count


def one_object_form(objects: list[ObjectRef] | tuple[ObjectRef, ...], n_models: int) -> tuple[ObjectRef, ...]:
    """A version's references as they are recorded: without ranges when the version is one data
    object of the whole set (and a delta's one table object of it), as versions were before
    shards; as they are otherwise."""
    data = [o for o in objects if not o.table]
    tables = [o for o in objects if o.table]
    whole = all(o.first == 0 and o.stop(n_models) == n_models for o in objects)
    if len(data) == 1 and len(tables) <= 1 and whole and list(objects) == data + tables:
        return tuple(ObjectRef(o.key, o.bytes, o.checksum, o.pin, table=o.table) for o in objects)
    return tuple(objects)


@dataclass(frozen=True)
class Shard:
    """One object of a version with the range of models it holds: ``first`` to ``stop - 1``;
    ``index`` is its position in the record's ``objects``."""

    index: int
    ref: ObjectRef
    first: int
    stop: int

    @property
    def count(self) -> int:
        return self.stop - self.first


class Changes:
    """Which (model, tensor) pairs a delta version wrote: sorted model ids and a bool mask per model.

    Decoded from a manifest lazily, on first use: listing versions does not
    pay for change lists nobody reads.
    """

    def __init__(self, models: np.ndarray | None = None, masks: np.ndarray | None = None, *, encoded: Any = None,
                 n_models: int = 0, n_tensors: int = 0) -> None:
        self._models = models
        self._masks = masks
        self._encoded = (encoded, n_models, n_tensors) if encoded is not None else None

    @classmethod
    def from_mask(cls, changed: np.ndarray) -> Changes:
        """From a ``[n_models, n_tensors]`` bool matrix."""
        models = np.flatnonzero(changed.any(axis=1))
        return cls(models, changed[models])

    @classmethod
    def from_json(cls, data: Any, n_models: int, n_tensors: int) -> Changes:
        """Wrap a manifest's change list; it is checked when first used."""
        if not isinstance(data, dict) or not {"count", "models", "masks"} <= set(data):
            raise RepositoryError("malformed change list")
        return cls(encoded=data, n_models=n_models, n_tensors=n_tensors)

    @property
    def models(self) -> np.ndarray:
        """Ascending ids (int64) of the models with at least one changed tensor."""
        self._decode()
        return self._models

    @property
    def masks(self) -> np.ndarray:
        """``[len(models), n_tensors]`` bool: which tensors of each of those models changed."""
        self._decode()
        return self._masks

    def dense(self, n_models: int) -> np.ndarray:
        """The ``[n_models, n_tensors]`` bool matrix."""
        out = np.zeros((n_models, self.masks.shape[1]), dtype=bool)
        out[self.models] = self.masks
        return out

    @property
    def n_pairs(self) -> int:
        return int(self.masks.sum())

    def to_json(self) -> dict[str, Any]:
        return {
            "count": len(self.models),
            "models": base64.b64encode(self.models.astype("<u4").tobytes()).decode(),
            "masks": base64.b64encode(np.packbits(self.masks, axis=1).tobytes()).decode(),
        }

    def _decode(self) -> None:
        if self._encoded is None:
            return
        data, n_models, n_tensors = self._encoded
        try:
            count = data["count"]
            models = np.frombuffer(base64.b64decode(data["models"], validate=True), dtype="<u4").astype(np.int64)
            packed = np.frombuffer(base64.b64decode(data["masks"], validate=True), dtype=np.uint8)
            masks = np.unpackbits(packed.reshape(count, (n_tensors + 7) // 8), axis=1, count=n_tensors).astype(bool)
        except (KeyError, TypeError, ValueError) as exc:
            raise RepositoryError(f"malformed change list: {exc}") from None
        if len(models) != count or (count and (np.any(np.diff(models) <= 0) or models[-1] >= n_models)):
            raise RepositoryError("change list is not ascending model ids within the set")
        self._models, self._masks, self._encoded = models, masks, None


@dataclass(frozen=True)
class VersionRecord:
    """One version of a repository, as ``repo.versions()`` lists it.

    ``approach`` is how the version is stored; ``reason`` says why (e.g. a
    snapshot policy turning an update into a full version). ``stored_bytes``
    is what the version added to the store: data objects, manifest, and the
    architecture record if this version introduced it. ``details`` holds
    notes such as ``compression`` (``"zstd-3"``), ``xor_base`` (the version
    XOR deltas are taken against) and, for ``approach="auto"`` saves,
    ``policy`` and every approach's ``estimates``. ``changes`` lists the
    (model, tensor) pairs that differ from ``base``: what a delta version
    stores; for a full version saved against a base (catalog format 2), what
    changed; None for a full version without one.
    """

    id: str
    approach: str
    base: str | None
    n_models: int
    created: datetime
    message: str
    reason: str
    architecture: str
    objects: tuple[ObjectRef, ...]
    changes: Changes | None
    details: dict[str, Any] = field(default_factory=dict)
    architecture_bytes: int = 0
    manifest_bytes: int = 0
    delta: bool = False  # stored as what changed since ``base`` (its approach says; readers set it)

    @property
    def stored_bytes(self) -> int:
        """What the version added to the store: its objects, its catalog entry (or manifest) and
        the architecture record if it introduced one."""
        return sum(o.bytes for o in self.objects) + self.architecture_bytes + self.manifest_bytes

    @cached_property
    def shards(self) -> tuple[Shard, ...]:
        """The data objects (every object but table objects), ascending by range. A version of one
        object has one shard holding every model; a delta's shards hold the ranges where it
        changed models (none if it changed nothing, in a sharded record)."""
        return tuple(Shard(k, ref, ref.first, ref.stop(self.n_models))
                     for k, ref in enumerate(self.objects) if not ref.table)

    @cached_property
    def table_shards(self) -> tuple[Shard, ...]:
        """The table objects (a delta's whole hash table, range by range), ascending; often none."""
        return tuple(Shard(k, ref, ref.first, ref.stop(self.n_models))
                     for k, ref in enumerate(self.objects) if ref.table)

    def shards_in(self, first: int, stop: int, tables: bool = False) -> tuple[Shard, ...]:
        """The shards (or table shards) whose ranges meet models ``first`` to ``stop - 1``."""
        found = self.table_shards if tables else self.shards
        return tuple(s for s in found if s.first < stop and first < s.stop)

    @property
    def is_full(self) -> bool:
        """True when the version's own objects hold every model (no base needed to recover it)."""
        return not self.delta

    def describe(self) -> str:
        """One line for messages: ``"v7 (update on v6, 5000 models)"``."""
        base = f" on {self.base}" if self.base else ""
        return f"{self.id} ({self.approach}{base}, {self.n_models} models)"

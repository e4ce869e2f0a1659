"""What a save hands an approach, and what the approach hands back: plain data, below the approaches."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmpack.compression import Compression
from mmpack.modelset import ModelSet
from mmpack.records import Changes, ObjectRef, VersionRecord


@dataclass
class SaveRequest:
    """Everything an approach may use to store one version.

    ``compression``: how to compress the version's objects (None: raw).
    ``subset`` and ``table_object``: how a delta stores hash tables (see the
    fields). ``xor_reference``: for delta approaches, ``(version id, fetch)`` where
    ``fetch(models)`` returns that version's values of sorted ``models`` (ids
    of the set; a ModelSet); the repository offers the chain's full version,
    so XOR deltas stay one level deep (docs/DESIGN-NOTES.md).

    A request may hold a *slice* of the set: ``models`` are the set's models
    ``first`` to ``first + len(models) - 1`` (``sliced``), ``hashes`` and
    ``base_hashes()`` are theirs, and the objects written are shards of that
    range (docs/REPOSITORY.md, "Shards"), each holding at most
    ``shard_bytes`` bytes of rows (None: one object).
    """

    models: ModelSet
    hashes: np.ndarray | Future[np.ndarray]  # [n_models, n_tensors]; may still be computing
    base: VersionRecord | None
    base_hashes: Callable[[], np.ndarray]  # the base version's full hash table, read lazily
    provenance: Any = None
    compression: Compression | None = None
    xor_reference: tuple[str, Callable[[np.ndarray], ModelSet]] | None = None
    #: Delta objects hold only the changed models (catalog format 2); else the whole set's table.
    subset: bool = True
    #: A delta also stores the whole hash table in an object of its own (bounds table derivation).
    table_object: bool = False
    first: int = 0
    #: The request is one slice of a set written in slices (a slice a delta changed nothing in
    #: then needs no object at all).
    sliced: bool = False
    shard_bytes: int | None = None

    def resolved_hashes(self) -> np.ndarray:
        return self.hashes.result() if isinstance(self.hashes, Future) else self.hashes

    def changed(self) -> np.ndarray:
        """``[n_models, n_tensors]`` bool: which pairs differ from the base (computed once)."""
        found = getattr(self, "_changed", None)  # relative to the slice: row i is model first + i
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

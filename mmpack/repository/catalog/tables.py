"""What derives from the catalog's records: chains, each version's checked objects, hash tables,
owner maps, per-model history and diffs.

Everything here is immutable once computed (versions never change; a prune
that rewrites one replaces its record, and the caches are keyed by record),
so it is cached under one policy (:class:`mmpack._cache.LRU`) and shared by
every thread reading the repository.

Hash tables. A Baseline object holds its version's whole table; an Update
object of format 2 only the rows of the models it changed (its *own*
hashes). A version's table is its base's with those rows replaced, so a
chain is walked down to the nearest version whose whole table is stored: a
Baseline, or a delta that carries a *table object* (every
:data:`TABLE_EVERY` deltas, see ``needs_table_object``), which bounds the
walk however long the chain.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from mmpack._cache import LRU
from mmpack.approaches import APPROACHES
from mmpack.errors import RepositoryError, VersionNotFoundError
from mmpack.fileformat import ROWS, Header, Reader, Tail, check_padding
from mmpack.objects import ObjectStore
from mmpack.records import VersionRecord
from mmpack.repository.catalog.base import Catalog

TABLE_EVERY = 64  # deltas between versions whose whole hash table is stored
_CACHED = 8
_CACHED_BYTES = 64 << 20


class VersionObjects:
    """A version's objects, opened, pinned and checked against its record once per repository
    before any size the record states is trusted."""

    def __init__(self, objects: ObjectStore, remote: bool) -> None:
        self.objects = objects
        self.remote = remote
        self._checked: set[tuple[str, str, int]] = set()

    @contextlib.contextmanager
    def open(self, record: VersionRecord, index: int = 0) -> Iterator[tuple[Reader, Header]]:
        ref = record.objects[index]
        with self.objects.reader(ref) as opened:
            token = (record.id, ref.key, index)
            if token not in self._checked:
                tail = self.objects.tail(ref, opened)
                if index == 0:
                    APPROACHES[record.approach].check_object(record, opened[1], tail)
                else:
                    check_table_object(record, opened[1])
                if not self.remote:  # a few reads of at most 63 bytes; on object storage, requests
                    check_padding(*opened)
                self._checked.add(token)
            yield opened

    def tail(self, record: VersionRecord, index: int = 0) -> Tail:
        with self.open(record, index) as opened:
            return self.objects.tail(record.objects[index], opened)

    def own_hashes(self, record: VersionRecord) -> tuple[np.ndarray, np.ndarray]:
        """``(models, rows)``: the hash-table rows the version's own object states, for sorted
        ``models`` (every model for a full version, the changed ones for a delta)."""
        approach = APPROACHES[record.approach]
        if approach.object_kind == "document":
            return approach.own_hashes(self.objects, record, None)
        return approach.own_hashes(self.objects, record, self.tail(record))

    def whole_table(self, record: VersionRecord) -> np.ndarray | None:
        """The version's whole table if one of its objects stores it, else None."""
        if len(record.objects) > 1:
            return self.tail(record, 1).table
        models, rows = self.own_hashes(record)
        return rows if len(models) == record.n_models else None  # a delta that changed every model too


def check_table_object(record: VersionRecord, header: Header) -> None:
    """A table object holds no rows, only the hash table of all of ``record``'s models."""
    if header.layout.kind != ROWS or any(header.layout.rows) or header.n_models != record.n_models:
        raise RepositoryError(f"the table object of {record.describe()} is not a hash table of its models")
    if header.architecture.fingerprint() != record.architecture:
        raise RepositoryError(f"the table object of {record.describe()} is of another architecture")


@dataclass(frozen=True)
class Change:
    """One entry of ``repo.history(model)``: a version that changed the model, and what."""

    version: str
    created: datetime
    approach: str
    tensors: tuple[str, ...]
    message: str


@dataclass(frozen=True)
class Diff:
    """``repo.diff(a, b)``: the models whose tensors differ between two versions, and which.

    ``models`` are ascending ids; ``tensors[k]`` names the tensors of
    ``models[k]`` that differ; ``pairs`` is the number of (model, tensor)
    pairs in all.
    """

    a: str
    b: str
    models: np.ndarray
    tensors: tuple[tuple[str, ...], ...]

    @property
    def pairs(self) -> int:
        return sum(len(t) for t in self.tensors)

    def __len__(self) -> int:
        return len(self.models)


class Tables:
    """Chains, hash tables and owner maps of one catalog's versions."""

    def __init__(self, catalog: Catalog, objects: VersionObjects) -> None:
        self.catalog = catalog
        self.objects = objects
        self._tables: LRU[tuple[str, int], np.ndarray] = LRU(_CACHED, _CACHED_BYTES, lambda t: t.nbytes)
        self._owners: LRU[tuple[str, int], np.ndarray] = LRU(_CACHED, _CACHED_BYTES, lambda t: t.nbytes)

    def chain(self, vid: str) -> list[VersionRecord]:
        """``vid`` and its bases, newest first, down to the first version that holds the full set.

        Every link is checked: a base must exist, be older, and have the same
        number of models and architecture.
        """
        chain = [self.catalog.record(vid)]
        while not chain[-1].is_full:
            record = chain[-1]
            try:
                base = self.catalog.record(record.base)
            except VersionNotFoundError:
                raise RepositoryError(f"{record.describe()} is a delta on {record.base}, which is missing") from None
            if base.n_models != record.n_models or base.architecture != record.architecture:
                raise RepositoryError(
                    f"{record.describe()} is a delta on {base.describe()} of another shape "
                    f"(architecture {base.architecture}, not {record.architecture})"
                )
            chain.append(base)
        return chain

    def table(self, vid: str) -> np.ndarray:
        """The version's XXH3-64 of every (model, tensor), ``[n_models, n_tensors]``: from its own
        objects, or its base's table with its own rows replaced (a loop down the chain)."""
        derived: list[VersionRecord] = []
        record = self.catalog.record(vid)
        while (table := self._tables.get(_key(record))) is None:
            table = self.objects.whole_table(record)
            if table is not None:
                self._tables.put(_key(record), table)
                break
            derived.append(record)
            record = self.catalog.record(record.base)
        for record in reversed(derived):
            models, rows = self.objects.own_hashes(record)
            table = table.copy()
            table[models] = rows
            self._tables.put(_key(record), table)
        return table

    def remember(self, record: VersionRecord, table: np.ndarray) -> None:
        """The table of a version this process just saved (it has it already)."""
        self._tables.put(_key(record), table)

    def depth_without_table(self, vid: str) -> int:
        """Deltas from ``vid`` down to the nearest version whose whole table is stored (for
        deciding when a new delta carries a table object)."""
        depth = 0
        record = self.catalog.record(vid)
        while record.delta and len(record.objects) == 1:
            depth += 1
            record = self.catalog.record(record.base)
        return depth

    def owners(self, chain: list[VersionRecord], models: np.ndarray, n_tensors: int) -> np.ndarray:
        """For each (selected model, tensor): the index in ``chain`` of the newest version that wrote
        it; the map of a whole set is cached for the next recovery."""
        if len(models) == chain[0].n_models:
            return self._owners.get_or_compute(_key(chain[0]), lambda: owners(chain, models, n_tensors))
        return owners(chain, models, n_tensors)

    def history(self, model: int) -> list[Change]:
        """The versions that changed ``model``, oldest first, with the tensors each changed."""
        out = []
        for record in self.catalog.versions():
            if model >= record.n_models:
                continue
            names = self.catalog.architecture(record.architecture).names
            if record.changes is not None:
                at = np.searchsorted(record.changes.models, model)
                if at == len(record.changes.models) or record.changes.models[at] != model:
                    continue
                changed = tuple(n for n, hit in zip(names, record.changes.masks[at]) if hit)
            elif record.base is None:
                changed = names  # a set saved from scratch: every tensor is new
            else:  # a full version saved against a base, by format 1: only the hashes can tell
                base = self.table(record.base)[model]
                changed = tuple(n for n, a, b in zip(names, self.table(record.id)[model], base) if a != b)
                if not changed:
                    continue
            out.append(Change(record.id, record.created, record.approach, changed, record.message))
        return out

    def diff(self, a: str, b: str) -> Diff:
        """Which models and tensors differ between versions ``a`` and ``b``, from their hashes."""
        first, second = self.catalog.record(a), self.catalog.record(b)
        if first.architecture != second.architecture or first.n_models != second.n_models:
            raise RepositoryError(f"{first.describe()} and {second.describe()} are sets of different shapes")
        differs = self.table(a) != self.table(b)
        models = np.flatnonzero(differs.any(axis=1))
        names = self.catalog.architecture(first.architecture).names
        tensors = tuple(tuple(n for n, hit in zip(names, differs[m]) if hit) for m in models)
        return Diff(a, b, models, tensors)


def _key(record: VersionRecord) -> tuple[str, int]:
    # A prune may replace a version's record (same models, other storage): key by the record too.
    return record.id, id(record)


def owners(chain: list[VersionRecord], models: np.ndarray, n_tensors: int) -> np.ndarray:
    """For each (selected model, tensor): the index in ``chain`` of the newest version that wrote it.

    ``models`` must be sorted and unique. Only the selected models are looked
    up in each change list, so resolving one model costs little whatever the
    size of the set.
    """
    full = len(chain) - 1
    owner = np.full((len(models), n_tensors), full, dtype=np.int32)
    everyone = len(models) == chain[0].n_models  # sorted, unique and complete: row i is model i
    for position in range(full - 1, -1, -1):  # oldest delta first: newer ones overwrite
        changes = chain[position].changes
        if everyone:
            owner[changes.models] = np.where(changes.masks, position, owner[changes.models])
            continue
        at = np.searchsorted(changes.models, models)
        hit = at < len(changes.models)
        hit[hit] = changes.models[at[hit]] == models[hit]
        if hit.any():
            owner[hit] = np.where(changes.masks[at[hit]], position, owner[hit])
    return owner

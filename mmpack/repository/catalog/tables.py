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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from mmpack._cache import LRU
from mmpack.approaches import APPROACHES
from mmpack.approaches.base import FIRST_KEY
from mmpack.errors import InvalidArgumentError, RepositoryError, VersionNotFoundError
from mmpack.fileformat import ROWS, Header, Reader, Tail, check_padding
from mmpack.objects import ObjectStore
from mmpack.records import Shard, VersionRecord
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
        """Object ``index`` of the record (a data shard, or a table object), open and checked."""
        ref = record.objects[index]
        with self.objects.reader(ref) as opened:
            token = (record.id, ref.key, index)
            if token not in self._checked:
                tail = self.objects.tail(ref, opened)
                shard = _shard(record, index)
                if ref.table:
                    check_table_object(record, shard, opened[1])
                else:
                    APPROACHES[record.approach].check_object(record, shard, opened[1], tail)
                if not self.remote:  # a few reads of at most 63 bytes; on object storage, requests
                    check_padding(*opened)
                self._checked.add(token)
            yield opened

    def tail(self, record: VersionRecord, index: int = 0) -> Tail:
        with self.open(record, index) as opened:
            return self.objects.tail(record.objects[index], opened)

    def tails(self, record: VersionRecord, indices) -> None:
        """Open and check several objects of a version (in threads on a remote store, where each
        costs round trips that need not wait for each other)."""
        indices = list(indices)
        if self.remote and len(indices) > 1:
            with ThreadPoolExecutor(min(16, len(indices))) as pool:
                list(pool.map(lambda k: self.tail(record, k), indices))
        else:
            for k in indices:
                self.tail(record, k)

    def own_hashes(self, record: VersionRecord, first: int = 0,
                   stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(models, rows)``: the hash-table rows the version's own objects state, for sorted
        ``models`` (every model for a full version, the changed ones for a delta), of the shards
        that meet models ``first`` to ``stop - 1`` (default: all)."""
        approach = APPROACHES[record.approach]
        if approach.object_kind == "document":
            return approach.own_hashes(self.objects, record, record.shards[0], None)
        stop = record.n_models if stop is None else stop
        shards = record.shards_in(first, stop) if (first, stop) != (0, record.n_models) else record.shards
        self.tails(record, [s.index for s in shards])
        parts = [approach.own_hashes(self.objects, record, s, self.tail(record, s.index)) for s in shards]
        return _joined(parts, record)

    def own_hashes_of(self, record: VersionRecord, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(models, rows)`` that object ``index`` of the version states."""
        approach = APPROACHES[record.approach]
        tail = None if approach.object_kind == "document" else self.tail(record, index)
        return approach.own_hashes(self.objects, record, _shard(record, index), tail)

    def whole_table(self, record: VersionRecord, first: int = 0, stop: int | None = None) -> np.ndarray | None:
        """The version's table of models ``first`` to ``stop - 1`` if its own objects store all of
        it (a full version, a delta with table objects), else None."""
        stop = record.n_models if stop is None else stop
        if record.table_shards:
            shards = record.shards_in(first, stop, tables=True)
            self.tails(record, [s.index for s in shards])
            parts = [(np.arange(s.first, s.stop), self.tail(record, s.index).table) for s in shards]
        else:  # a full version, or a delta that changed every model of the range (format 1: all)
            parts = [self.own_hashes(record, first, stop)]
        models, rows = _joined(parts, record)
        at = np.searchsorted(models, [first, stop])
        if at[1] - at[0] != stop - first:
            return None  # a delta that changed every model, seen through a damaged record: derive it
        return rows[at[0] : at[1]]


def _shard(record: VersionRecord, index: int) -> Shard:
    ref = record.objects[index]
    return Shard(index, ref, ref.first, ref.stop(record.n_models))


def _joined(parts: list[tuple[np.ndarray, np.ndarray]], record: VersionRecord) -> tuple[np.ndarray, np.ndarray]:
    """Shards' ``(models, rows)`` as one pair (shards hold ascending, disjoint ranges)."""
    if len(parts) == 1:
        return parts[0]
    if not parts:  # a delta's range where it changed nothing
        return np.zeros(0, np.int64), np.zeros((0, record.changes.masks.shape[1]), np.uint64)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def check_table_object(record: VersionRecord, shard: Shard, header: Header) -> None:
    """A table object holds no rows, only the hash table of the models of its range."""
    if header.layout.kind != ROWS or any(header.layout.rows) or header.n_models != shard.count:
        raise RepositoryError(f"the table object of {record.describe()} is not a hash table of its models")
    if header.metadata.get(FIRST_KEY, "0") != str(shard.first):
        raise RepositoryError(f"the table object of {record.describe()} for models {shard.first} to "
                              f"{shard.stop - 1} holds the table of other models")
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
        """How many (model, tensor) pairs differ."""
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

    def table(self, vid: str, first: int = 0, stop: int | None = None) -> np.ndarray:
        """The version's XXH3-64 of every (model, tensor), ``[n_models, n_tensors]``: from its own
        objects, or its base's table with its own rows replaced (a loop down the chain). With
        ``first`` and ``stop``, only the rows of models ``first`` to ``stop - 1``, read from the
        shards that hold them (whole tables are cached, parts are not)."""
        record = self.catalog.record(vid)
        stop = record.n_models if stop is None else stop
        if not 0 <= first <= stop <= record.n_models:
            raise InvalidArgumentError(f"models {first} to {stop - 1} are not a range of {record.describe()}")
        whole = (first, stop) == (0, record.n_models)
        derived: list[VersionRecord] = []
        while True:
            cached = self._tables.get(_key(record))
            if cached is not None:
                table = cached if whole else cached[first:stop]
                break
            table = self.objects.whole_table(record, first, stop)
            if table is not None:
                if whole:
                    self._tables.put(_key(record), table)
                break
            derived.append(record)
            record = self.catalog.record(record.base)
        for record in reversed(derived):
            models, rows = self.objects.own_hashes(record, first, stop)
            table = table.copy()
            table[models - first] = rows
            if whole:
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
        while record.delta and not record.table_shards:
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

"""Versions written and read in slices: by one process from a stream, or by many workers at once.

A set larger than memory never exists whole. Its version is *opened* once
(:class:`VersionWriter`, made by ``Repository.open_version``), which fixes
everything the slices share: the approach, the base, compression, the shard
size. Its :class:`WriteHandle` pickles: every worker (a thread, a process, a
Dask task) writes the shards of its slice with :meth:`WriteHandle.write`
and returns a :class:`Receipt`; nothing it writes is visible yet. The
coordinator then commits the version from the receipts, in one atomic catalog
write, after checking that they come from this writer, cover every model
exactly once and name objects that exist. The call sequence and who makes
each call (the shape of ``torch.distributed.checkpoint``'s storage writer)::

    writer = repo.open_version(approach="update", base="v7")   # coordinator, once
    handle = writer.handle                                     # pickled to every worker
    receipt = handle.write(first, models)                      # each worker, per slice
    vid = writer.commit(receipts, message="cycle 8")           # coordinator, once

A worker that dies, or a task that runs twice, leaves shards no version
names: the commit refuses receipts that overlap (a duplicate) or leave
models out (a lost slice), so a version is complete or absent, and ``gc``
removes the orphans once older than its grace period (which must exceed the
time between a shard's write and the commit).

Reading works the same way: a :class:`ReadHandle` pickles, and each worker
recovers the models of its slice; :func:`recover_slices` streams a version
in slices through one process.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from mmpack._cache import LRU
from mmpack.approaches import APPROACHES, SaveRequest
from mmpack.approaches.update import empty_object
from mmpack.architecture import Architecture
from mmpack.compression import Compression
from mmpack.errors import ArchitectureMismatchError, InvalidArgumentError, MMPackError, RepositoryError
from mmpack.fileformat import modelset_and_hashes
from mmpack.modelset import ModelSet
from mmpack.objects import ObjectStore
from mmpack.records import Changes, ObjectRef, VersionRecord, one_object_form
from mmpack.repository import executor
from mmpack.repository.catalog import open_catalog
from mmpack.repository.catalog.documents import now
from mmpack.repository.catalog.tables import Tables, VersionObjects
from mmpack.repository.cleanup import WriteLog
from mmpack.repository.planner import plan_recovery
from mmpack.store import Store

STREAMED = ("baseline", "update")  # the approaches whose versions can be written in slices


@dataclass(frozen=True)
class Receipt:
    """What a worker wrote for one slice of an open version: plain data, picklable.

    ``first`` and ``count``: the slice's models (``first`` to ``first +
    count - 1``). ``objects``: its shards (data, then table objects), each
    with its range. ``changes``: the (model, tensor) pairs of the slice that
    differ from the base, ids of the set (None without a base). ``token``
    names the open version the receipt belongs to.
    """

    token: str
    first: int
    count: int
    objects: tuple[ObjectRef, ...]
    changes: Changes | None
    details: dict[str, Any]
    architecture: Architecture

    @property
    def stop(self) -> int:
        """One past the last model of the receipt's slice."""
        return self.first + self.count

    @property
    def bytes(self) -> int:
        """What the slice's objects hold, in bytes."""
        return sum(o.bytes for o in self.objects)


@dataclass
class _Opened:
    """A repository's catalog, objects and tables as one process opened them for a handle."""

    catalog: Any
    objects: ObjectStore
    tables: Tables


_OPENED: LRU[tuple[str, str], _Opened] = LRU(8)
_OPENING = threading.Lock()


def opened(store: Store, token: str) -> _Opened:
    """The repository in ``store``, opened once per process and handle (workers run many tasks)."""
    key = (token, repr(store))
    found = _OPENED.get(key)
    if found is None:
        with _OPENING:
            found = _OPENED.get(key)
            if found is None:
                objects = ObjectStore(store)
                catalog = open_catalog(store, objects, create=False)
                tables = Tables(catalog, VersionObjects(objects, store.remote))
                found = _OPENED.put(key, _Opened(catalog, objects, tables))
    return found


@dataclass(frozen=True)
class WriteHandle:
    """The picklable half of an open version: everything a worker needs to write slices of it.

    Example (on a worker)::

        receipt = handle.write(first, models)   # models: a ModelSet or a list of modules
    """

    store: Store
    token: str
    approach: str
    base: str | None
    n_models: int | None  # None: a Baseline without a base, whose size the slices decide
    compression: Compression | None
    shard_bytes: int
    table_object: bool = False
    xor_root: str | None = None
    architecture: Architecture | None = field(default=None, repr=False)  # known when there is a base

    def write(self, first: int, models: ModelSet | Sequence[nn.Module]) -> Receipt:
        """Write the shards of models ``first`` to ``first + len(models) - 1`` of the version; the
        receipt the coordinator commits. Nothing is visible until then; a write that fails
        removes what it wrote.

        Example::

            receipt = handle.write(50_000, slice_of_models)
        """
        if isinstance(first, bool) or not isinstance(first, (int, np.integer)) or first < 0:
            raise InvalidArgumentError(f"a slice starts at a model id (an integer from 0), not {first!r}")
        first = int(first)
        modelset, hashes = modelset_and_hashes(models)
        stop = first + len(modelset)
        if self.n_models is not None and stop > self.n_models:
            raise InvalidArgumentError(f"models {first} to {stop - 1} lie beyond the version's {self.n_models} models")
        if self.architecture is not None:
            difference = modelset.architecture.difference(self.architecture)
            if difference is not None:
                raise ArchitectureMismatchError(f"the slice at model {first} differs from the version: {difference}")
        repo = opened(self.store, self.token)
        base = repo.catalog.record(self.base) if self.base is not None else None
        base_hashes = (lambda: repo.tables.table(base.id, first, stop)) if base is not None else _no_base
        xor = None
        if self.xor_root is not None:
            xor = (self.xor_root, lambda wanted: executor.recover(repo.tables, self.xor_root, wanted))
        request = SaveRequest(modelset, hashes, base, base_hashes, None, self.compression, xor, subset=True,
                              table_object=self.table_object, first=first, sliced=True,
                              shard_bytes=self.shard_bytes)
        written = WriteLog(repo.objects)
        with written.undone_on_failure():
            stored = APPROACHES[self.approach].save(written, request)
            changes = stored.changes
            if changes is None and base is not None:  # a full version still says what changed
                local = Changes.from_mask(request.changed())
                changes = Changes(local.models + first, local.masks)
        return Receipt(self.token, first, len(modelset), tuple(stored.objects), changes, dict(stored.details),
                       modelset.architecture)


class VersionWriter:
    """A version open for writing in slices; committed once, from the receipts of its slices.

    Made by ``Repository.open_version``. ``handle`` pickles and goes to the
    workers; the writer itself stays with the coordinator.

    Example::

        writer = repo.open_version()
        receipts = [writer.handle.write(first, ms) for first, ms in slices]   # anywhere, any order
        vid = writer.commit(receipts, message="fleet of 10^6")
    """

    def __init__(self, tables: Tables, handle: WriteHandle, reason: str) -> None:
        self._tables = tables
        self.handle = handle
        self._reason = reason
        self._committed: str | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"VersionWriter({self.handle.approach}, base={self.handle.base}, token={self.handle.token})"

    def __reduce__(self):
        raise TypeError("a VersionWriter commits once, where it was opened: send its .handle to workers")

    def write(self, first: int, models: ModelSet | Sequence[nn.Module]) -> Receipt:
        """``self.handle.write(first, models)``, in this process."""
        return self.handle.write(first, models)

    def commit(self, receipts: Iterable[Receipt], message: str = "") -> str:
        """Publish the version the receipts make up, atomically; its id.

        The receipts must come from this writer and cover every model of the
        version exactly once (a receipt passed twice counts once; two receipts
        of one range, as a retried task gives, are refused: pass one). Every
        object they name is checked to exist as recorded. A writer commits at
        most once. If the commit fails, the receipts' objects are removed
        (unless the outcome cannot be told; ``gc`` then decides).

        Example::

            vid = writer.commit(client.gather(futures))
        """
        if not isinstance(message, str):
            raise TypeError("message must be a string")
        with self._lock:
            if self._committed is not None:
                raise RepositoryError(f"this version was committed already, as {self._committed}")
            received = _checked(self.handle, list(receipts), self._tables)
            record = self._publish(received, message)
            self._committed = record.id
            return record.id

    def _publish(self, receipts: list[Receipt], message: str) -> VersionRecord:
        handle, catalog = self.handle, self._tables.catalog
        n_models = receipts[-1].stop if receipts else 0
        architecture = receipts[0].architecture if receipts else handle.architecture
        if architecture is None:
            raise InvalidArgumentError("a version needs at least one slice")
        data = [o for r in receipts for o in r.objects if not o.table]
        tables = [o for r in receipts for o in r.objects if o.table]
        details: dict[str, Any] = {}
        for r in receipts:
            details.update(r.details)
        if not data and not tables:  # a delta that changed nothing: one empty object (no XOR deltas in it)
            data = [empty_object(self._tables.objects.objects, architecture, n_models)]
            details.pop("xor_base", None)
        objects = one_object_form(data + tables, n_models)
        changes = None
        if receipts and receipts[0].changes is not None:
            changes = Changes(np.concatenate([r.changes.models for r in receipts]),
                              np.concatenate([r.changes.masks for r in receipts]))
        written = WriteLog(self._tables.objects.objects)
        written.keys.extend(o.key for o in objects)
        with written.undone_on_failure():
            _check_objects(self._tables.objects.objects, objects)
            record = catalog.publish(
                lambda vid, architecture_bytes: VersionRecord(
                    id=vid, approach=handle.approach, base=handle.base, n_models=n_models, created=now(),
                    message=message, reason=self._reason, architecture=architecture.fingerprint(),
                    objects=objects, changes=changes, details=details, architecture_bytes=architecture_bytes,
                    delta=APPROACHES[handle.approach].delta,
                ),
                architecture, written,
            )
        return record


def _checked(handle: WriteHandle, receipts: list[Receipt], tables: Tables) -> list[Receipt]:
    """The receipts in model order, once they are this writer's and tile the version's models."""
    for r in receipts:
        if not isinstance(r, Receipt):
            raise InvalidArgumentError(f"commit takes the receipts that handle.write returned, not {type(r).__name__}")
        if r.token != handle.token:
            raise InvalidArgumentError(
                f"a receipt for models {r.first} to {r.stop - 1} belongs to another open version")
    unique = list({tuple(o.key for o in r.objects) + (r.first, r.count): r for r in receipts}.values())
    unique.sort(key=lambda r: (r.first, r.count))
    expected = handle.n_models
    position = 0
    for r in unique:
        if r.first < position:
            raise InvalidArgumentError(
                f"models {r.first} to {min(position, r.stop) - 1} were written twice (a retried task's receipt "
                "among the others?): commit one receipt per slice")
        if r.first > position:
            raise InvalidArgumentError(f"models {position} to {r.first - 1} have no receipt: a slice was not written")
        position = r.stop
    if expected is not None and position < expected:
        raise InvalidArgumentError(f"models {position} to {expected - 1} have no receipt: a slice was not written")
    if expected is not None and position > expected:
        raise InvalidArgumentError(f"the receipts reach model {position - 1}; the version has {expected} models")
    fingerprints = {r.architecture.fingerprint() for r in unique}
    if len(fingerprints) > 1:
        raise ArchitectureMismatchError("the slices of one version have different architectures")
    if unique and handle.base is not None:
        base = tables.catalog.record(handle.base)
        if unique[0].architecture.fingerprint() != base.architecture:
            raise ArchitectureMismatchError(f"the slices differ from base {base.id}'s architecture")
    return unique


def _check_objects(objects: ObjectStore, refs: Iterable[ObjectRef]) -> None:
    """Every object a commit names exists, with the size and header its receipt recorded."""
    refs = list(refs)
    objects.open_many(refs)
    for ref in refs:
        objects.header(ref)


def _no_base() -> np.ndarray:
    raise MMPackError("this save has no base version")


def open_version(tables: Tables, approach: str, base: VersionRecord | None, n_models: int | None,
                 compression: Compression | None, shard_bytes: int, reason: str) -> VersionWriter:
    """A writer of a new version (``approach`` as the snapshot policy decided; see the facade)."""
    from mmpack.repository.catalog.tables import TABLE_EVERY

    catalog = tables.catalog
    if catalog.format_version < 2:
        raise RepositoryError("versions written in slices need repository format 2 (`mmpack upgrade`)")
    if approach not in STREAMED:
        raise InvalidArgumentError(f"versions written in slices use {' or '.join(STREAMED)}, not {approach!r}")
    architecture = None
    if base is not None:
        architecture = catalog.architecture(base.architecture)
        if n_models is not None and n_models != base.n_models:
            raise ArchitectureMismatchError(f"{n_models} models cannot be stored on base {base.id} of {base.n_models}")
        n_models = base.n_models
    if n_models is not None and (isinstance(n_models, bool) or not isinstance(n_models, (int, np.integer))
                                 or not 0 <= n_models < 2**32):
        raise InvalidArgumentError(f"n_models must be a number of models, not {n_models!r}")
    delta = APPROACHES[approach].delta
    table_object = delta and tables.depth_without_table(base.id) + 1 >= TABLE_EVERY
    xor_root = tables.chain(base.id)[-1].id if delta and compression is not None and compression.xor else None
    handle = WriteHandle(catalog.store, secrets.token_hex(8), approach, base.id if base is not None else None,
                         None if n_models is None else int(n_models), compression, shard_bytes, table_object,
                         xor_root, architecture)
    # Slices written in this process use the coordinator's own catalog and caches.
    _OPENED.put((handle.token, repr(catalog.store)), _Opened(catalog, tables.objects.objects, tables))
    return VersionWriter(tables, handle, reason)


def save_stream(writer: VersionWriter, slices: Iterable[tuple[int, ModelSet | Sequence[nn.Module]]],
                message: str) -> str:
    """Write every ``(first, models)`` of ``slices`` through ``writer`` and commit; each slice is let
    go before the next is asked for, so the stream's memory is one slice. If a slice fails, what the
    earlier ones wrote is removed."""
    receipts: list[Receipt] = []
    iterator = iter(slices)
    try:
        while True:
            try:
                item = next(iterator)
            except StopIteration:
                break
            if not isinstance(item, tuple) or len(item) != 2:
                raise InvalidArgumentError(f"a stream yields (first_model, models) pairs, not {type(item).__name__}")
            first, models = item
            del item
            receipts.append(writer.write(first, models))
            del models
        return writer.commit(receipts, message)
    except BaseException:
        if writer._committed is None:
            discard(writer.handle, receipts)
        raise


def discard(handle: WriteHandle, receipts: Iterable[Receipt]) -> None:
    """Remove the objects of receipts that will never be committed (best effort: ``gc`` removes the rest)."""
    store = handle.store
    for receipt in receipts:
        for ref in receipt.objects:
            try:
                store.delete(ref.key)
            except (OSError, MMPackError):
                pass


# -- reading in slices ----------------------------------------------------------------------------


def slice_ranges(n_models: int, slice_models: int) -> list[tuple[int, int]]:
    return [(a, min(a + slice_models, n_models)) for a in range(0, n_models, slice_models)]


def recover_slices(tables: Tables, vid: str, slice_models: int, *, verify: bool = True,
                   options: executor.RebuildOptions | None = None) -> Iterator[tuple[int, ModelSet]]:
    """``(first, models)`` for consecutive slices of ``slice_models`` models of version ``vid``, each
    recovered (and verified) when the iteration asks for it: memory holds one slice."""
    options = options or executor.RebuildOptions()
    record = tables.catalog.record(vid)
    for first, stop in slice_ranges(record.n_models, slice_models):
        plan = plan_recovery(tables, vid, range(first, stop))
        yield first, executor.execute(tables, plan, verify=verify, options=options)


@dataclass(frozen=True)
class ReadHandle:
    """A version to recover in slices anywhere: it pickles, and each worker recovers its slice.

    Example (on a worker)::

        part = handle.recover(range(first, stop))
    """

    store: Store
    version: str
    n_models: int
    token: str

    def recover(self, indices: Iterable[int] | None = None, *, verify: bool = True) -> ModelSet:
        """The models ``indices`` of the version (all if None), bit-exact and verified."""
        repo = opened(self.store, self.token)
        return executor.recover(repo.tables, self.version, indices, verify=verify)

    def slices(self, slice_models: int) -> list[tuple[int, int]]:
        """``(first, stop)`` of consecutive slices of ``slice_models`` models covering the version."""
        return slice_ranges(self.n_models, check_slice_models(slice_models))


def check_slice_models(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidArgumentError(f"slice_models must be a whole number of models, at least 1, not {value!r}")
    return int(value)

"""Repository: a versioned store of model sets, as one object (a thin facade).

The work happens in the layers below, data flowing one way:
:mod:`~mmpack.repository.catalog` (all metadata), :mod:`~mmpack.repository.planner`
(what a recovery reads), :mod:`~mmpack.repository.executor` (reading and
verifying it), :mod:`~mmpack.repository.saving` and
:mod:`~mmpack.repository.maintenance` (verify, gc, prune).
"""

from __future__ import annotations

import math
import os
import secrets
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future
from datetime import datetime
from typing import Any

import numpy as np
import torch
from torch import nn

from mmpack.approaches import APPROACHES, DefaultPool
from mmpack.approaches.advisor import Policy, SmallestUnder, Throughputs, check_policy
from mmpack.architecture import Architecture
from mmpack.compression import Compression
from mmpack.compression import resolve as resolve_compression
from mmpack.errors import ArchitectureMismatchError, InvalidArgumentError, MMPackError, RepositoryError
from mmpack.modelset import ModelSet
from mmpack.objects import ObjectStore
from mmpack.provenance import TrainingFunction
from mmpack.records import VersionRecord
from mmpack.repository import background, maintenance, saving, slices
from mmpack.repository import catalog as catalogs
from mmpack.repository import executor as execution
from mmpack.repository.catalog import TagMove
from mmpack.repository.catalog.tables import Change, Diff, Tables, VersionObjects
from mmpack.repository.lazy import LazyModelSet
from mmpack.repository.maintenance import GcReport, PruneReport, VerifyReport
from mmpack.repository.planner import RecoveryPlan, plan_recovery
from mmpack.repository.saving import SnapshotPolicy
from mmpack.repository.slices import ReadHandle, Receipt, VersionWriter, WriteHandle
from mmpack.staging import is_host, resolve_device
from mmpack.store import Store, open_store

_REPOSITORY_DEFAULT = object()  # compression= not given: use the repository's


class Repository:
    """Repository(path_or_url, *, storage_options=None, fsync=True, snapshots=None, store=None,
    compression=None, policy=None, throughputs=None, create=True, max_pending_saves=2, shard_bytes=None)

    Versions of a model set, each immutable once saved, stored with the
    Baseline, Update or Provenance approach (or chosen per version by
    ``approach="auto"``). A local directory (created if missing; with
    ``create=False`` a location without a repository raises
    :class:`~mmpack.RepositoryNotFoundError` and nothing is written) is the embedded
    default; an fsspec URL (``"s3://bucket/prefix"``, with ``storage_options``
    for its file system; needs ``pip install "mmpack[s3]"`` for S3) keeps the
    repository in object storage, and any :class:`~mmpack.store.Store` can be
    passed instead. ``compression`` ("zstd" or a :class:`~mmpack.Compression`)
    is the default for every save; ``policy`` the default of
    ``approach="auto"`` saves (:class:`~mmpack.SmallestUnder` ``(math.inf)``:
    smallest storage), whose time estimates use ``throughputs`` (measured on
    this machine if None). ``max_pending_saves`` bounds the non-blocking saves
    (``save(..., blocking=False)``) queued at once, and so the host copies
    they hold; their staging buffers are kept for the next save until
    :meth:`close`. A version larger than ``shard_bytes`` (default 256 MiB of
    parameters) is stored as several objects, its *shards*, each holding a
    contiguous range of models; recovering some models reads only the shards
    that hold them.

    A version exists once the catalog publishes it, which happens after all
    its data is written, in one atomic write: a crash at any moment leaves
    only complete versions, and a save that fails removes what it wrote
    (see :meth:`save`). Several processes may create, open and save into one
    repository at once; many threads may share one ``Repository`` to read.
    Failures of the store reach callers as :class:`~mmpack.StorageError` (an
    ``OSError`` keeping its errno). Wherever a
    version id is taken, a tag (:meth:`tag`) may stand instead.

    New repositories are format 2 (docs/REPOSITORY.md): opening one and
    finding a version costs a few requests whatever the history. Format 1
    repositories (mmpack 0.1) are read and written as they are; tags and
    prune need :meth:`upgrade`.

    Example::

        repo = mmpack.Repository("cells.repo")
        v1 = repo.save(models)                                   # full set
        v2 = repo.save(models, approach="update", base=v1)       # changed tensors only
        repo.tag("production", v2)
        two = repo.recover("production", indices=[3, 17])        # reads only their bytes
        remote = mmpack.Repository("s3://fleet/cells", storage_options={"profile": "prod"})
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        storage_options: dict[str, Any] | None = None,
        fsync: bool = True,
        snapshots: SnapshotPolicy | None = None,
        store: Store | None = None,
        compression: str | Compression | None = None,
        policy: Policy | None = None,
        throughputs: Throughputs | None = None,
        create: bool = True,
        max_pending_saves: int = 2,
        shard_bytes: int | None = None,
    ) -> None:
        if (path is None) == (store is None):
            raise TypeError("pass a path or a store, not both")
        if store is not None and storage_options is not None:
            raise TypeError("storage_options configure the store a path or URL opens; a store is already configured")
        self.settings = saving.Settings(
            resolve_compression(compression),
            check_policy(policy) if policy is not None else SmallestUnder(math.inf),
            snapshots or SnapshotPolicy(),
            throughputs,
            saving.check_shard_bytes(shard_bytes) if shard_bytes is not None else saving.DEFAULT_SHARD_BYTES,
        )
        self.store = store if store is not None else open_store(path, storage_options, fsync=fsync)
        self.objects = ObjectStore(self.store)
        if isinstance(max_pending_saves, bool) or not isinstance(max_pending_saves, int) or max_pending_saves < 1:
            raise InvalidArgumentError(f"max_pending_saves must be a positive integer, not {max_pending_saves!r}")
        self._saver = background.Saver(max_pending_saves)
        self._staging = background.StagingPool(max_pending_saves)
        self._open(create)

    def _open(self, create: bool) -> None:
        self.catalog = catalogs.open_catalog(self.store, self.objects, create)
        self.tables = Tables(self.catalog, VersionObjects(self.objects, self.store.remote))

    def __repr__(self) -> str:
        return f"Repository({self.store!r})"

    @property
    def compression(self) -> Compression | None:
        """The default compression of saves."""
        return self.settings.compression

    @property
    def format_version(self) -> int:
        """The repository's format (docs/REPOSITORY.md): 1 (mmpack 0.1) or 2."""
        return self.catalog.format_version

    def close(self) -> None:
        """Wait for pending saves (``blocking=False``), then release open data objects (file handles)
        and staging buffers. The repository stays usable. Raises
        :class:`~mmpack.BackgroundSaveError` if a pending save failed and nobody asked its future."""
        failures = self._shutdown()
        if failures:
            raise background.unseen_failures_error(failures)

    def _shutdown(self) -> list:
        failures = self._saver.close()
        self._staging.clear()
        self.objects.close()
        return failures

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        """Leaving ``with``: :meth:`close` (pending saves finish first). If the block is already
        raising, failed saves nobody asked about are reported as a warning instead."""
        failures = self._shutdown()
        if not failures:
            return
        error = background.unseen_failures_error(failures)
        if exc_type is None:
            raise error
        warnings.warn(str(error), RuntimeWarning, stacklevel=2)

    # -- saving -------------------------------------------------------------

    def save(
        self,
        models: ModelSet | Sequence[nn.Module],
        approach: str = "baseline",
        base: str | Future[str] | None = None,
        provenance: object = None,
        message: str = "",
        *,
        compression: str | Compression | None | object = _REPOSITORY_DEFAULT,
        policy: Policy | None = None,
        blocking: bool = True,
    ) -> str | Future[str]:
        """repo.save(models, approach="baseline", base=None, message="", *, compression=..., policy=None,
        blocking=True) -> version id, or a Future of it

        Store a model set (a :class:`ModelSet` or a list of modules) as a new
        version and return its id (``"v1"``, ``"v2"``...). ``"baseline"``
        stores the full set; ``"update"`` stores only the tensors whose hashes
        differ from ``base`` (a version id or a tag; the base's hashes are
        read, never its parameters); ``"provenance"`` stores how the changed
        models were trained (``provenance=Provenance.of(...)``, an entry for
        every model that differs from ``base``) and their hashes. Without a
        base, or when the snapshot policy asks, the full set is stored instead.
        ``"auto"`` lets ``policy`` (default: the repository's) pick among the
        approaches that can store this version, from each one's estimate of
        bytes stored and time to recover. ``compression`` overrides the
        repository's default (None: raw). ``repo.versions()`` records which
        approach was used and why.

        A save that fails (a full disk, a lost connection; the error is a
        :class:`~mmpack.StorageError` when the store failed) removes the
        objects it wrote, so the store holds what it held before (format 1:
        except the few hundred bytes of an architecture record it
        introduced). A publication whose request failed although the store
        applied it is detected by reading it back, and the save then
        succeeds; if even that read fails, the objects are kept for :meth:`gc`.

        ``blocking=False`` returns with a :class:`concurrent.futures.Future` of
        the version id once a private host copy of the set is taken (a plain
        copy into buffers reused from earlier saves; modules are gathered as
        :meth:`ModelSet.from_modules` does; a set on an accelerator comes
        through pinned memory in chunks): changing the models in place
        afterwards never reaches the version. Hashing, deciding what changed,
        writing and publishing run on the repository's worker thread, one
        save after another in the order they were submitted; ``base`` may
        name a pending save by its future (a version id exists only once it
        is published). A failure surfaces on its future, and saves built on
        it fail with :class:`~mmpack.BaseSaveFailedError`. At most
        ``max_pending_saves`` (see the constructor) wait at once: the next one
        waits for the oldest before copying. A blocking save waits behind
        pending ones. :meth:`close`, and leaving a ``with`` block, wait for
        them all.

        Example::

            vid = repo.save(models, approach="update", base=vid)  # once per training cycle
            vid = repo.save(models, approach="auto", base=vid, policy=mmpack.SmallestUnder(seconds=0.5))
            fut = repo.save(ms, approach="update", base=fut, blocking=False)  # training goes on meanwhile
        """
        if approach not in APPROACHES and approach != "auto":
            raise MMPackError(f"unknown approach {approach!r}; choose 'auto' or one of {sorted(APPROACHES)}")
        if provenance is not None and approach != "auto" and not APPROACHES[approach].takes_provenance:
            raise MMPackError(f"approach {approach!r} takes no provenance")
        if not isinstance(message, str):
            raise TypeError("message must be a string")
        setting = self.settings.compression if compression is _REPOSITORY_DEFAULT else resolve_compression(compression)
        base_ref = self._base(base)

        def run(job: background.Job, base_id: str | None) -> str:
            return self._save_now(job.models, approach, base_id, provenance, message, setting, policy, job.hashes)

        if not blocking:
            return self._submit(models, run, base_ref)
        if isinstance(base_ref, background.Job) and self._saver.on_worker():
            raise InvalidArgumentError("a blocking save made on the save worker (in a future's callback) cannot wait "
                                       "for a save queued behind it; pass blocking=False")
        if isinstance(base_ref, background.Job) or self._saver.pending:
            # Behind the pending saves, in order; the caller waits, so its own tensors are what is saved.
            self._saver.reserve()
            return self._saver.submit(background.Job(run, base_ref, models=models)).result()
        return self._save_now(models, approach, base_ref, provenance, message, setting, policy, None)

    def _save_now(self, models, approach: str, base_id: str | None, provenance, message: str, compression, policy,
                  hashes: np.ndarray | None) -> str:
        base_record = self.catalog.record(base_id) if base_id is not None else None
        record = saving.save(
            self.tables, self.objects, self.settings, models, approach, base_record, provenance, message, compression,
            policy, lambda vid, wanted: self.recover(vid, wanted), hashes=hashes,
        )
        return record.id

    # -- sets larger than memory: slices, streams, parallel writers ---------------------------

    def open_version(
        self,
        approach: str = "baseline",
        base: str | None = None,
        *,
        n_models: int | None = None,
        compression: str | Compression | None | object = _REPOSITORY_DEFAULT,
        shard_bytes: int | None = None,
    ) -> VersionWriter:
        """repo.open_version(approach="baseline", base=None, *, n_models=None) -> VersionWriter

        Open a new version to be written in slices, by this process or by many
        workers: send ``writer.handle`` (it pickles) wherever a slice is, call
        ``handle.write(first, models)`` there (a :class:`Receipt` comes back),
        then ``writer.commit(receipts)`` here publishes the version atomically.
        ``approach`` is ``"baseline"`` or ``"update"`` (each worker then
        compares its slice with ``base``'s hash table and writes only its
        changed rows); the snapshot policy may turn an update into a full
        version. ``n_models`` fixes the size of a Baseline without a base
        (otherwise the slices decide it). Each slice's shards hold at most
        ``shard_bytes`` (default: the repository's) bytes of rows. Shards of a
        version never committed are removed by :meth:`gc`.

        Example::

            writer = repo.open_version(approach="update", base="production")
            futures = [client.submit(train_and_write, writer.handle, first) for first in starts]
            vid = writer.commit(client.gather(futures), message="cycle 12")
        """
        base_record = self.version(base) if base is not None else None
        chosen, reason = saving.choose(self.tables, self.settings.snapshots, approach, base_record)
        setting = self.settings.compression if compression is _REPOSITORY_DEFAULT else resolve_compression(compression)
        size = saving.check_shard_bytes(shard_bytes) if shard_bytes is not None else self.settings.shard_bytes
        return slices.open_version(self.tables, chosen, base_record, n_models, setting, size, reason)

    def save_stream(
        self,
        stream: Iterable[tuple[int, ModelSet | Sequence[nn.Module]]],
        approach: str = "baseline",
        base: str | None = None,
        message: str = "",
        *,
        n_models: int | None = None,
        compression: str | Compression | None | object = _REPOSITORY_DEFAULT,
        shard_bytes: int | None = None,
    ) -> str:
        """repo.save_stream(stream, approach="baseline", base=None, message="") -> version id

        Store a set that is never whole in memory, given as an iterable (a
        generator) of ``(first_model, models)`` slices: each slice is written
        as shards and let go before the next one is taken, so memory holds one
        slice plus a few bytes per shard. Slices may come in any order and
        must cover every model once. Otherwise as :meth:`save` (and
        :meth:`open_version`, which it uses).

        Example::

            def fleet():
                for first in range(0, 1_000_000, 50_000):
                    yield first, train_cells(first, 50_000)   # a ModelSet of 50,000 models
            vid = repo.save_stream(fleet(), message="the whole fleet")
        """
        writer = self.open_version(approach, base, n_models=n_models, compression=compression, shard_bytes=shard_bytes)
        return slices.save_stream(writer, stream, _message(message))

    def recover_stream(self, vid: str, slice_models: int | None = None, *,
                       verify: bool = True) -> Iterator[tuple[int, ModelSet]]:
        """repo.recover_stream(vid, slice_models=None) -> iterator of (first_model, ModelSet)

        Version ``vid`` in consecutive slices of ``slice_models`` models
        (default: as many as one shard holds), each read and verified when the
        iteration asks for it: memory holds one slice, whatever the set.

        Example::

            for first, part in repo.recover_stream("v9", slice_models=50_000):
                evaluate(first, part)
        """
        vid = self.catalog.resolve(vid)
        record = self.catalog.record(vid)
        if slice_models is None:
            per_model = max(1, self.catalog.architecture(record.architecture).nbytes_per_model)
            slice_models = max(1, self.settings.shard_bytes // per_model)
        return slices.recover_slices(self.tables, vid, slices.check_slice_models(slice_models), verify=verify)

    def read_handle(self, vid: str) -> ReadHandle:
        """repo.read_handle(vid) -> ReadHandle: version ``vid`` to recover anywhere; the handle pickles,
        and ``handle.recover(range(first, stop))`` on a worker reads only that slice's shards.

        Example::

            handle = repo.read_handle("production")
            parts = client.map(lambda r: handle.recover(range(*r)).nbytes, handle.slices(50_000))
        """
        vid = self.catalog.resolve(vid)
        record = self.catalog.record(vid)
        return ReadHandle(self.store, vid, record.n_models, secrets.token_hex(8))

    def recover_lazy(self, vid: str) -> LazyModelSet:
        """repo.recover_lazy(vid) -> LazyModelSet

        Version ``vid`` as a :class:`ModelSet` whose data stays in the
        repository until touched: ``select(indices)`` reads only those models,
        the first access to a tensor (``ms.tensors["fc1.weight"]``) reads that
        tensor of every model, and every piece read is verified against its
        hash as it lands; ``verify()`` checks the whole version in slices.
        Reads are positioned reads, so a file changed underneath gives an
        error, never a crash.

        Example::

            fleet = repo.recover_lazy("production")
            cells = fleet.select([17, 912_004])        # two models' bytes, verified
        """
        vid = self.catalog.resolve(vid)
        return LazyModelSet.of_version(self.tables, vid, self.settings.shard_bytes)
    def _base(self, base: object) -> str | background.Job | None:
        """What ``base=`` names: None, a version id (checked now), or a pending save's job."""
        if base is None:
            return None
        if isinstance(base, Future):
            if not self._saver.owns(base):
                raise InvalidArgumentError(
                    "base= is a future that this repository's save(blocking=False) did not return"
                )
            return self._saver.base(base)
        vid = self.catalog.resolve(base)
        self.catalog.record(vid)
        return vid

    def _submit(self, models, run, base: str | background.Job | None) -> Future[str]:
        """Stage ``models`` on this thread and queue the rest of the save (see :meth:`save`)."""
        self._saver.reserve()  # before staging: the copies of pending saves stay bounded
        try:
            staged = background.stage(models, self._staging)
            try:
                self._check_base(staged.models.architecture, len(staged.models), base)
            except BaseException:
                if staged.release is not None:
                    staged.release()
                raise
        except BaseException:
            self._saver.unreserve()
            raise
        job = background.Job(run, base, staged.models, staged.hashes, staged.release,
                             staged.models.architecture, len(staged.models))
        return self._saver.submit(job)

    def _check_base(self, architecture: Architecture, n_models: int, base: str | background.Job | None) -> None:
        if base is None:
            return
        if isinstance(base, str):
            record = self.catalog.record(base)
            theirs, count, name = self.catalog.architecture(record.architecture), record.n_models, f"base {base}"
        else:
            theirs, count, name = base.architecture, base.n_models, "the pending base save"
        difference = architecture.difference(theirs)
        if difference is not None:
            raise ArchitectureMismatchError(f"models differ from {name}: {difference}")
        if n_models != count:
            raise ArchitectureMismatchError(f"{n_models} models cannot be stored on {name} of {count} models")

    # -- reading ------------------------------------------------------------

    def recover(
        self,
        vid: str,
        indices: Iterable[int] | None = None,
        *,
        out: ModelSet | Mapping[str, torch.Tensor] | None = None,
        device: torch.device | str | None = None,
        strategy: str = "resolve",
        verify: bool = True,
        executor: Executor | None = None,
        training: Mapping[str, TrainingFunction] | None = None,
        allow_import: bool = False,
        chunk_bytes: int | None = None,
    ) -> ModelSet:
        """repo.recover(vid, indices=None, *, out=None, device=None) -> ModelSet

        The models of version ``vid`` (an id or a tag), bit-exact, every piece
        checked against the hash its object states. With ``indices``, only
        those models' bytes are read. Deltas are resolved from the catalog, so
        each piece is read once however long the chain of updates
        (``strategy="recursive"`` replays the chain as the paper does, for
        comparison).

        ``out`` (a :class:`ModelSet` or its stacked tensors, on the host or a
        device) receives the models in place and is returned: this is how a
        training loop resumes, or rolls a few models back. Nothing of the
        set's size is allocated; with ``indices``, only those rows of ``out``
        change. A shape, dtype, architecture or size that differs from the
        version's raises :class:`ArchitectureMismatchError` before any byte
        moves. ``device`` places a new set on that device. Both go through two
        staging buffers of ``chunk_bytes`` (default
        :data:`mmpack.staging.CHUNK_BYTES`; pinned memory for CUDA), a chunk of
        models recovered and checked at a time, so host memory stays within
        two chunks; a whole version into contiguous host tensors is read
        straight into them (a checksum failure then leaves their bytes
        undefined).

        Pieces stored as provenance are retrained: the training function
        comes from ``training`` (``{"pkg.mod:fn": fn}``) or, with
        ``allow_import=True``, is imported by the path the version records.
        Retraining runs on ``executor`` (any ``concurrent.futures.Executor``,
        e.g. a Dask client's ``get_executor()``; by default a local process
        pool, or this process for a few models) and is checked against the
        stored hashes: :class:`ProvenanceMismatchError` otherwise.

        Example::

            ms = repo.recover("v7", indices=[3, 17])
            ms = repo.recover("production", allow_import=True, executor=ProcessPoolExecutor(4))
            repo.recover("v7", out=fleet)                   # in place, e.g. a training loop's tensors
            repo.recover("v6", indices=[3, 17], out=fleet)  # roll two models back
            on_gpu = repo.recover("v7", device="cuda")
        """
        vid = self.catalog.resolve(vid)
        target = resolve_device(device)
        placed = out is not None or (target is not None and not is_host(target))
        if placed and strategy != "resolve":
            raise InvalidArgumentError("out= and device= recover with strategy='resolve'")
        pool = DefaultPool() if executor is None else None
        options = _options(executor or pool, training, allow_import)
        try:
            if placed:
                return execution.recover_placed(self.tables, vid, indices, out, target, verify=verify,
                                                options=options, chunk_bytes=chunk_bytes)
            if strategy == "recursive":
                full = execution.recover_recursive(self.tables, vid, verify=verify, options=options)
                return full if indices is None else full.select(indices)
            if strategy != "resolve":
                raise InvalidArgumentError(f"unknown recovery strategy {strategy!r}; use 'resolve' or 'recursive'")
            return execution.recover(self.tables, vid, indices, verify=verify, options=options)
        finally:
            if pool is not None:
                pool.shutdown()

    def plan(self, vid: str, indices: Iterable[int] | None = None) -> RecoveryPlan:
        """repo.plan(vid, indices=None) -> RecoveryPlan: what :meth:`recover` would read, from the
        catalog alone (no object is opened).

        Example::

            print(repo.plan("v7", [17]))   # RecoveryPlan(v7, 1 models: 7 pieces from v7 (2), v1 (5))
        """
        return plan_recovery(self.tables, self.catalog.resolve(vid), indices)

    def versions(self) -> list[VersionRecord]:
        """repo.versions() -> list of VersionRecord, oldest first.

        Each record has ``.id .approach .base .n_models .stored_bytes .created
        .message`` and ``.reason`` (why the approach was used).
        """
        return self.catalog.versions()

    def version(self, vid: str) -> VersionRecord:
        """The record of one version (an id or a tag); :class:`VersionNotFoundError` if there is none."""
        return self.catalog.record(self.catalog.resolve(vid))

    def storage_bytes(self, vid: str) -> int:
        """Bytes version ``vid`` added to the store: data objects, its catalog entry, architecture if new."""
        return self.version(vid).stored_bytes

    def architecture(self, fingerprint: str) -> Architecture:
        """The architecture with this fingerprint."""
        return self.catalog.architecture(fingerprint)

    def hashes(self, vid: str) -> np.ndarray:
        """Version ``vid``'s XXH3-64 of every (model, tensor), ``[n_models, n_tensors]``; no parameters are read."""
        return self.tables.table(self.catalog.resolve(vid))

    def chain(self, vid: str) -> list[VersionRecord]:
        """``vid`` and its bases, newest first, down to the full version it builds on."""
        return self.tables.chain(self.catalog.resolve(vid))

    # -- tags, history, diffs ----------------------------------------------------------------

    def tag(self, name: str, vid: str, expected: str | None = None, message: str = "") -> TagMove:
        """repo.tag(name, vid, expected=None, message="") -> TagMove

        Point tag ``name`` at version ``vid`` (created or moved), atomically;
        every move is kept in :meth:`tag_log`. With ``expected`` (a version
        id), the move is a compare-and-swap: it happens only if the tag is on
        ``expected`` now, else :class:`~mmpack.TagConflictError`. Versions
        themselves never change. Needs repository format 2.

        Example::

            repo.tag("production", "v42", expected="v41", message="promoted after the A/B test")
        """
        return self.catalog.move_tag(
            name, self.catalog.resolve(vid), _expected(self.catalog, expected), _message(message)
        )

    def untag(self, name: str, expected: str | None = None, message: str = "") -> TagMove:
        """Remove tag ``name`` (recorded in the tag log; with ``expected``, only if it is on that version).

        Example::

            repo.untag("canary")
        """
        return self.catalog.move_tag(name, None, _expected(self.catalog, expected), _message(message))

    def tags(self) -> dict[str, str]:
        """Tag name -> version id, as they are now.

        Example::

            repo.tags()   # {"production": "v42", "canary": "v43"}
        """
        return self.catalog.tags()

    def tag_log(self) -> list[TagMove]:
        """Every tag move, oldest first: ``.time .name .before .after .message`` (None: absent).

        Example::

            for move in repo.tag_log(): print(move.time, move.name, move.before, "->", move.after)
        """
        return self.catalog.tag_log()

    def history(self, model: int) -> list[Change]:
        """repo.history(model) -> list of Change, oldest first

        The versions that changed ``model``, each with the tensors it changed
        and when, answered from the catalog (no parameter bytes are read).

        Example::

            for change in repo.history(17): print(change.version, change.created, change.tensors)
        """
        if isinstance(model, bool) or not isinstance(model, (int, np.integer)) or model < 0:
            raise InvalidArgumentError(f"a model is a non-negative integer index, not {model!r}")
        return self.tables.history(int(model))

    def diff(self, a: str, b: str) -> Diff:
        """repo.diff(a, b) -> Diff: the models (``.models``) and tensors (``.tensors``) that differ
        between versions ``a`` and ``b``, from their hashes.

        Example::

            changed = repo.diff("v40", "production").models
        """
        return self.tables.diff(self.catalog.resolve(a), self.catalog.resolve(b))

    # -- maintenance ----------------------------------------------------------

    def verify(
        self,
        vid: str | None = None,
        *,
        executor: Executor | None = None,
        training: Mapping[str, TrainingFunction] | None = None,
        allow_import: bool = False,
    ) -> VerifyReport:
        """repo.verify(vid=None) -> VerifyReport

        Check every object's checksums and that every version (or only
        ``vid``) recovers bit-exactly. Problems are collected, not raised.
        Provenance versions are recovered only when retraining is allowed
        (``training=`` or ``allow_import=True``, as for :meth:`recover`);
        otherwise their records and datasets are checked and the report lists
        them as not retrained.

        Example::

            report = repo.verify()
            assert report.ok, str(report)
        """
        target = self.catalog.resolve(vid) if vid is not None else None
        pool = DefaultPool() if executor is None else None
        try:
            return maintenance.verify(self.tables, target, _options(executor or pool, training, allow_import),
                                      bool(training) or allow_import, self.settings.shard_bytes)
        finally:
            if pool is not None:
                pool.shutdown()

    def _behind_saves(self, action, blocking: bool):
        """Run ``action()`` now, or after the pending saves when there are some; with
        ``blocking=False``, queued behind them in any case and answered by a future."""
        if blocking and not self._saver.pending:
            return action()
        self._saver.reserve()
        future = self._saver.submit(background.Job(lambda job, base_id: action()))
        return future.result() if blocking else future

    def gc(self, *, grace_seconds: float = 3600.0, blocking: bool = True) -> GcReport | Future[GcReport]:
        """repo.gc(grace_seconds=3600, blocking=True) -> GcReport

        Remove what nothing reaches: data objects no live version names (left
        by interrupted saves, or by versions a prune deleted), temporaries, and
        catalog documents older than the last two checkpoints, once older than
        ``grace_seconds`` (a save still running in another process is never
        disturbed). ``grace_seconds`` must be finite and at least 0.

        A gc runs after this repository's pending saves (so their objects are
        never taken for leftovers); ``blocking=False`` queues it behind them
        and returns a future of the report.

        Example::

            repo.gc(grace_seconds=0)  # no other process is saving
        """
        return self._behind_saves(lambda: maintenance.gc(self.tables, grace_seconds), blocking)

    def prune(
        self,
        *,
        keep_last: int | None = None,
        newer_than: datetime | None = None,
        keep_tagged: bool = True,
        keep: Iterable[str] = (),
        dry_run: bool = False,
        message: str = "",
        executor: Executor | None = None,
        training: Mapping[str, TrainingFunction] | None = None,
        allow_import: bool = False,
        blocking: bool = True,
    ) -> PruneReport | Future[PruneReport]:
        """repo.prune(*, keep_last=None, newer_than=None, keep_tagged=True, keep=(), dry_run=False,
        blocking=True) -> PruneReport

        Keep the last ``keep_last`` versions, those created at or after
        ``newer_than``, the tagged ones (unless ``keep_tagged=False``) and
        those in ``keep`` (ids or tags); delete the rest from the catalog in
        one atomic commit. Kept versions stay recoverable bit-exactly: a kept
        delta whose chain would lose a version is first stored anew, as a delta
        on its nearest kept ancestor, or as a full version. A kept provenance
        version is rewritten only if retraining is allowed (``training=`` or
        ``allow_import=True``); otherwise the versions it needs are kept too.
        ``dry_run=True`` only reports. :meth:`gc` then frees the space. A prune
        killed at any moment leaves every version recoverable. Needs
        repository format 2. A prune runs after this repository's pending
        saves (``keep_last`` counts them); ``blocking=False`` queues it behind
        them and returns a future of the report.

        Example::

            print(repo.prune(keep_last=30, dry_run=True))
            repo.prune(newer_than=datetime.now(timezone.utc) - timedelta(days=365))
            repo.gc()
        """
        keep = list(keep)
        return self._behind_saves(
            lambda: self._prune_now(keep_last, newer_than, keep_tagged, keep, dry_run, message, executor, training,
                                    allow_import),
            blocking,
        )

    def _prune_now(self, keep_last, newer_than, keep_tagged, keep, dry_run, message, executor, training,
                   allow_import) -> PruneReport:
        self.catalog.refresh()
        kept = maintenance.select_kept(self.catalog.versions(), self.catalog.tags(), keep_last, newer_than,
                                       keep_tagged, [self.catalog.resolve(k) for k in keep])
        pool = DefaultPool() if executor is None else None
        try:
            return maintenance.prune(self.tables, self.objects, kept, dry_run=dry_run, message=_message(message),
                                     options=_options(executor or pool, training, allow_import),
                                     may_retrain=bool(training) or allow_import,
                                     shard_bytes=self.settings.shard_bytes)
        finally:
            if pool is not None:
                pool.shutdown()

    def upgrade(self) -> bool:
        """Turn a format 1 repository into format 2 in place (versions, ids and objects stay); False if
        it is format 2 already. Run it when no other process writes to the repository.

        Example::

            mmpack.Repository("cells.repo").upgrade()
        """
        changed = catalogs.upgrade(self.store, self.objects)
        if changed:
            self._open(create=False)
        return changed


def _options(pool, training, allow_import) -> execution.RebuildOptions:
    return execution.RebuildOptions(pool, training, allow_import)


def _expected(catalog, expected: str | None) -> str | None:
    return None if expected is None else catalog.resolve(expected)


def _message(message: object) -> str:
    if not isinstance(message, str):
        raise TypeError("message must be a string")
    return message


__all__ = ["GcReport", "LazyModelSet", "PruneReport", "ReadHandle", "Receipt", "Repository", "RepositoryError",
           "SnapshotPolicy", "VerifyReport", "VersionWriter", "WriteHandle"]

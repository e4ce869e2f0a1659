"""Repository: a versioned store of model sets."""

from __future__ import annotations

import errno
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from mmpack.approaches import APPROACHES, DefaultPool, SaveRequest
from mmpack.approaches.advisor import CostModel, Policy, SmallestUnder, Throughputs, check_policy as _check_policy
from mmpack import _json
from mmpack._cache import LRU
from mmpack.approaches.advisor import measured_throughputs
from mmpack.architecture import Architecture
from mmpack.compression import Compression
from mmpack.compression import resolve as resolve_compression
from mmpack.errors import (
    ArchitectureMismatchError,
    FormatError,
    InvalidArgumentError,
    MMPackError,
    RepositoryError,
    RepositoryNotFoundError,
    VersionNotFoundError,
)
from mmpack.fileformat import modelset_and_hashes
from mmpack.modelset import ModelSet
from mmpack.provenance import TrainingFunction
from mmpack.records import VersionRecord
from mmpack.repository import recovery
from mmpack.repository.cleanup import WriteLog, published
from mmpack.repository.manifest import (
    check_version_id,
    decode_manifest,
    encode_manifest,
    manifest_key,
    now,
    version_number,
)
from mmpack.store import ObjectStore, Store, open_store

_MARKER = "repository.json"
_MARKER_CONTENT = {"format": "mmpack-repository", "format_version": 1}
_HASH_TABLE_CACHE = 8
_TABLE_BYTES = 64 << 20
_MAX_ID_ATTEMPTS = 1000
_REPOSITORY_DEFAULT = object()  # compression= not given: use the repository's


@dataclass(frozen=True)
class SnapshotPolicy:
    """When an ``approach="update"`` save stores a full version instead of a delta.

    ``every``: after this many deltas in a row. ``max_chain_ratio``: once the
    deltas since the last full version add up to this fraction of a full
    version's bytes. Either bound (or both) may be set.

    The trade-off: a snapshot costs a full set of storage and makes the next
    chain start afresh. Recovery is already bounded without snapshots (each
    piece is read once), but its cost grows slowly with the chain: one more
    manifest per delta, and the pieces of the result scatter over more
    objects and smaller reads. ``max_chain_ratio=1.0`` caps the chain's extra
    storage at one full set.
    """

    every: int | None = None
    max_chain_ratio: float | None = None

    def __post_init__(self) -> None:
        if self.every is not None and self.every < 1:
            raise ValueError("SnapshotPolicy.every must be at least 1")
        if self.max_chain_ratio is not None and self.max_chain_ratio <= 0:
            raise ValueError("SnapshotPolicy.max_chain_ratio must be positive")


@dataclass
class VerifyReport:
    """What ``repo.verify()`` checked and every problem it found (empty when all is well)."""

    versions: list[str] = field(default_factory=list)
    objects: int = 0
    problems: list[str] = field(default_factory=list)
    not_retrained: list[str] = field(default_factory=list)  # provenance versions checked without retraining

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        head = f"checked {len(self.versions)} versions and {self.objects} objects"
        if self.not_retrained:
            head += f" ({', '.join(self.not_retrained)} not retrained: records and datasets checked only)"
        return head + (": all good" if self.ok else ":\n" + "\n".join(f"  - {p}" for p in self.problems))


@dataclass(frozen=True)
class GcReport:
    """What ``repo.gc()`` removed."""

    temporaries: int
    objects: int
    bytes: int


class Repository:
    """Repository(path_or_url, *, storage_options=None, fsync=True, snapshots=None, store=None,
    compression=None, policy=None, throughputs=None, create=True)

    Versions of a model set, each immutable once saved, stored with the
    Baseline, Update or Provenance approach (or chosen per version by
    ``approach="auto"``). A local directory (created if missing; with
    ``create=False`` a location without a repository raises
    :class:`~mmpack.RepositoryNotFoundError` and nothing is written) is the
    embedded default; an fsspec URL (``"s3://bucket/prefix"``, with
    ``storage_options`` for its file system; needs ``pip install
    "mmpack[s3]"`` for S3) keeps the repository in object storage, and any
    :class:`~mmpack.store.Store` can be passed instead. ``compression``
    ("zstd" or a :class:`~mmpack.Compression`) is the default for every
    save; ``policy`` the default of ``approach="auto"`` saves
    (:class:`~mmpack.SmallestUnder` ``(math.inf)``: smallest storage), whose
    time estimates use ``throughputs`` (measured on this machine if None).
    A version exists once its manifest is published, which happens after all
    its data is written, atomically: a crash at any moment leaves only
    complete versions, and a save that fails removes what it wrote (see
    :meth:`save`). Several processes may create, open and save into one
    repository at once. Failures of the store reach callers as
    :class:`~mmpack.StorageError` (an ``OSError`` keeping its errno).

    Example::

        repo = mmpack.Repository("cells.repo")
        v1 = repo.save(models)                                   # full set
        v2 = repo.save(models, approach="update", base=v1)       # changed tensors only
        two = repo.recover(v2, indices=[3, 17])                  # reads only their bytes
        remote = mmpack.Repository("s3://fleet/cells", storage_options={"profile": "prod"})
        existing = mmpack.Repository("cells.repo", create=False)  # never creates one
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
    ) -> None:
        if (path is None) == (store is None):
            raise TypeError("pass a path or a store, not both")
        if store is not None and storage_options is not None:
            raise TypeError("storage_options configure the store a path or URL opens; a store is already configured")
        self.compression = resolve_compression(compression)
        self.policy = _check_policy(policy) if policy is not None else SmallestUnder(math.inf)
        self._throughputs = throughputs
        self.store = store if store is not None else open_store(path, storage_options, fsync=fsync)
        self.objects = ObjectStore(self.store)
        self.snapshots = snapshots or SnapshotPolicy()
        self._records: dict[str, VersionRecord] = {}
        self._architectures: dict[str, Architecture] = {}
        self._tables: LRU[str, np.ndarray] = LRU(_HASH_TABLE_CACHE, _TABLE_BYTES, lambda t: t.nbytes)
        self._owner_maps: LRU[str, np.ndarray] = LRU(_HASH_TABLE_CACHE, _TABLE_BYTES, lambda t: t.nbytes)
        #: (version id, object key) pairs whose object was checked against the version's manifest.
        self.checked_objects: set[tuple[str, str]] = set()
        self._open_or_create(create)

    def __repr__(self) -> str:
        return f"Repository({self.store!r})"

    def close(self) -> None:
        """Release open data objects (memory mappings, file handles). The repository stays usable."""
        self.objects.close()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _open_or_create(self, create: bool) -> None:
        marker = json.dumps(_MARKER_CONTENT).encode()
        try:
            content = self.store.get(_MARKER)  # one request when the repository exists (remote stores)
        except FileNotFoundError:
            if not create:
                raise RepositoryNotFoundError(errno.ENOENT, f"no mmpack repository at {self.store!r}") from None
            content = self._create(marker)
            if content is None:
                return
        _check_marker(content, self.store)

    def _create(self, marker: bytes) -> bytes | None:
        """Create the repository unless another opener just did; the marker found (None: ours).

        The marker is the first thing any writer creates and nothing ever
        removes it, so a location that lists files but has no marker, read
        *after* the listing, is not a repository. Reading it only before the
        listing would count as foreign the marker that a concurrent opener
        published in between.
        """
        if self.store.list("") or self.store.list("versions/"):
            try:
                return self.store.get(_MARKER)
            except FileNotFoundError:
                raise RepositoryError(f"{self.store!r} holds files but is not an mmpack repository") from None
        if self.store.put_if_absent(_MARKER, marker):
            return None
        return self.store.get(_MARKER)

    # -- saving -------------------------------------------------------------

    def save(
        self,
        models: ModelSet | Sequence[nn.Module],
        approach: str = "baseline",
        base: str | None = None,
        provenance: object = None,
        message: str = "",
        *,
        compression: str | Compression | None | object = _REPOSITORY_DEFAULT,
        policy: Policy | None = None,
    ) -> str:
        """repo.save(models, approach="baseline", base=None, message="", *, compression=..., policy=None) -> version id

        Store a model set (a :class:`ModelSet` or a list of modules) as a new
        version and return its id (``"v1"``, ``"v2"``...). ``"baseline"``
        stores the full set; ``"update"`` stores only the tensors whose hashes
        differ from ``base`` (reading the base's hashes, never its
        parameters); ``"provenance"`` stores how the changed models were
        trained (``provenance=Provenance.of(...)``, an entry for every model
        that differs from ``base``) and their hashes. Without a base, or when
        the snapshot policy asks, the full set is stored instead. ``"auto"``
        lets ``policy`` (default: the repository's) pick among the approaches
        that can store this version, from each one's estimate of bytes stored
        and time to recover. ``compression`` overrides the repository's
        default (None: raw). ``repo.versions()`` records which approach was
        used and why.

        A save that fails (a full disk, a lost connection; the error is a
        :class:`~mmpack.StorageError` when the store failed) removes the
        objects it wrote, so the store holds what it held before, except the
        few hundred bytes of an architecture record it introduced (shared:
        a concurrent save of the same architecture may already rely on it).
        A manifest write whose request failed although the store applied it
        is detected by reading the manifest back, and the save then succeeds;
        if even that read fails, the objects are kept for :meth:`gc`.

        Example::

            vid = repo.save(models, approach="update", base=vid)  # once per training cycle
            vid = repo.save(models, approach="auto", base=vid, policy=mmpack.SmallestUnder(seconds=0.5))
        """
        if approach not in APPROACHES and approach != "auto":
            raise MMPackError(f"unknown approach {approach!r}; choose 'auto' or one of {sorted(APPROACHES)}")
        if provenance is not None and approach != "auto" and not APPROACHES[approach].takes_provenance:
            raise MMPackError(f"approach {approach!r} takes no provenance")
        if not isinstance(message, str):
            raise TypeError("message must be a string")
        setting = self.compression if compression is _REPOSITORY_DEFAULT else resolve_compression(compression)
        base_record = self.version(base) if base is not None else None
        modelset, hashes = modelset_and_hashes(models)
        if base_record is not None:
            self._check_compatible(modelset, base_record)
        request = SaveRequest(
            modelset,
            hashes,
            base_record,
            (lambda: self.hashes(base_record.id)) if base_record is not None else _no_base,
            provenance,
            setting,
            self._xor_reference(base_record) if setting is not None and setting.xor else None,
        )
        details: dict = {}
        if approach == "auto":
            approach, auto_reason, details = self._advise(request, policy)
        chosen, reason = self._choose(approach, base_record)
        if details:
            reason = auto_reason if chosen == approach else f"{auto_reason}; then {reason}"
        architecture_bytes = self._store_architecture(modelset.architecture)
        written = WriteLog(self.objects)
        with written.undone_on_failure():
            stored = APPROACHES[chosen].save(written, request)
        record = self._publish(
            lambda vid: VersionRecord(
                id=vid,
                approach=chosen,
                base=base_record.id if base_record is not None else None,
                n_models=len(modelset),
                created=now(),
                message=message,
                reason=reason,
                architecture=modelset.architecture.fingerprint(),
                objects=tuple(stored.objects),
                changes=stored.changes,
                details={**details, **stored.details},
                architecture_bytes=architecture_bytes,
            ),
            written,
        )
        self._remember_table(record.id, request.resolved_hashes())
        return record.id

    def _xor_reference(self, base: VersionRecord | None) -> tuple[str, object] | None:
        """The chain's full version, which XOR deltas are taken against, and how to fetch its rows."""
        if base is None:
            return None
        root = recovery.chain_of(self, base.id)[-1]
        return root.id, lambda models: self.recover(root.id, models)

    def _advise(self, request: SaveRequest, policy: Policy | None) -> tuple[str, str, dict]:
        """Pick an approach for ``approach="auto"``: every registered approach estimates what it
        would cost (None: it cannot store this version), then the policy picks."""
        policy = _check_policy(policy) if policy is not None else self.policy
        chain = recovery.chain_of(self, request.base.id) if request.base is not None else []
        model = CostModel(request, chain, self._throughputs or measured_throughputs())
        estimates = {name: approach.estimate(request, model) for name, approach in APPROACHES.items()}
        available = {name: e for name, e in estimates.items() if e is not None}
        if not available:
            raise MMPackError("no approach can store this version")
        chosen, why = policy.choose(available)
        described = "; ".join(
            f"{name} {e.stored_bytes / 1e6:.3f} MB, recover ~{e.recover_seconds:.3f} s" if e is not None
            else f"{name} unavailable" for name, e in estimates.items()
        )
        details = {
            "policy": policy.describe(),
            "estimates": {name: e.to_json() for name, e in available.items()},
        }
        return chosen, f"auto ({policy.describe()}): {why} [{described}]", details

    def _check_compatible(self, models: ModelSet, base: VersionRecord) -> None:
        difference = models.architecture.difference(self.architecture(base.architecture))
        if difference is not None:
            raise ArchitectureMismatchError(f"models differ from base {base.id}: {difference}")
        if len(models) != base.n_models:
            raise ArchitectureMismatchError(
                f"{len(models)} models cannot be stored on base {base.id} of {base.n_models} models"
            )

    def _choose(self, approach: str, base: VersionRecord | None) -> tuple[str, str]:
        if approach == "baseline":
            return approach, "requested"
        if base is None:
            return "baseline", f"{approach} without a base stores the full set"
        chain = recovery.chain_of(self, base.id)
        deltas = len(chain) - 1
        policy = self.snapshots
        if policy.every is not None and deltas + 1 > policy.every:
            return "baseline", f"snapshot: {deltas} updates since the last full version ({chain[-1].id})"
        if policy.max_chain_ratio is not None:
            full_bytes = sum(o.bytes for o in chain[-1].objects)
            delta_bytes = sum(o.bytes for r in chain[:-1] for o in r.objects)
            if delta_bytes >= policy.max_chain_ratio * full_bytes:
                return "baseline", (
                    f"snapshot: deltas since {chain[-1].id} hold {delta_bytes / full_bytes:.0%} of a full version"
                )
        return approach, "requested"

    def _store_architecture(self, architecture: Architecture) -> int:
        """Write the architecture record once per repository; the bytes written (0 if it existed)."""
        fingerprint = architecture.fingerprint()
        key = f"architectures/{fingerprint}.json"
        if fingerprint not in self._architectures and not self.store.exists(key):
            content = json.dumps(architecture.to_json(), sort_keys=True).encode()
            if self.store.put_if_absent(key, content):
                self._architectures[fingerprint] = architecture
                return len(content)
        difference = self.architecture(fingerprint).difference(architecture)
        if difference is not None:
            raise RepositoryError(f"architecture record {fingerprint} collides with another architecture")
        return 0

    def _publish(self, make_record, written: WriteLog) -> VersionRecord:
        """Publish a manifest under the next free id; concurrent writers each get their own. If none
        is published, the objects ``written`` are removed."""
        with written.undone_on_failure():
            for _ in range(_MAX_ID_ATTEMPTS):
                taken = [version_number(k[len("versions/") : -len(".json")]) for k in self._manifest_keys()]
                vid = f"v{max(taken, default=0) + 1}"
                record = make_record(vid)
                content = encode_manifest(record)
                if self._put_manifest(manifest_key(vid), content, written):
                    record = _with_manifest_bytes(record, len(content))
                    self._records[vid] = record
                    return record
            raise RepositoryError("could not allocate a version id: too many concurrent writers")

    def _put_manifest(self, key: str, content: bytes, written: WriteLog) -> bool:
        """Create ``key`` unless it exists; a failed request that the store applied anyway counts as
        created (cleanup.py: the version then exists, and its objects must stay)."""
        try:
            return self.store.put_if_absent(key, content)
        except BaseException:
            outcome = published(self.store, key, content)
            if outcome:
                return True
            if outcome is None:
                written.keep()
            raise

    # -- reading ------------------------------------------------------------

    def recover(
        self,
        vid: str,
        indices: Iterable[int] | None = None,
        *,
        strategy: str = "resolve",
        verify: bool = True,
        executor: Executor | None = None,
        training: Mapping[str, TrainingFunction] | None = None,
        allow_import: bool = False,
    ) -> ModelSet:
        """repo.recover(vid, indices=None) -> ModelSet

        The models of version ``vid``, bit-exact, every piece checked against
        the version's hashes. With ``indices``, only those models' bytes are
        read. Deltas are resolved from the manifests, so each piece is read
        once however long the chain of updates (``strategy="recursive"``
        replays the chain as the paper does, for comparison).

        Pieces stored as provenance are retrained: the training function
        comes from ``training`` (``{"pkg.mod:fn": fn}``) or, with
        ``allow_import=True``, is imported by the path the version records.
        Retraining runs on ``executor`` (any ``concurrent.futures.Executor``,
        e.g. a Dask client's ``get_executor()``; by default a local process
        pool, or this process for a few models) and is checked against the
        stored hashes: :class:`ProvenanceMismatchError` otherwise.

        Example::

            ms = repo.recover("v7", indices=[3, 17])
            ms = repo.recover("v9", allow_import=True, executor=ProcessPoolExecutor(4))
        """
        pool = DefaultPool() if executor is None else None
        options = recovery.RebuildOptions(executor or pool, training, allow_import)
        try:
            return recovery.recover(self, check_version_id(vid), indices, strategy=strategy, verify=verify, options=options)
        finally:
            if pool is not None:
                pool.shutdown()

    def versions(self) -> list[VersionRecord]:
        """repo.versions() -> list of VersionRecord, oldest first.

        Each record has ``.id .approach .base .n_models .stored_bytes .created
        .message`` and ``.reason`` (why the approach was used).
        """
        return [self.version(vid) for vid in self._version_ids()]

    def version(self, vid: str) -> VersionRecord:
        """The record of one version; :class:`VersionNotFoundError` if there is none."""
        check_version_id(vid)
        record = self._records.get(vid)
        if record is None:
            try:
                raw = self.store.get(manifest_key(vid))
            except FileNotFoundError:
                raise VersionNotFoundError(f"no version {vid!r} in {self.store!r}") from None
            record = decode_manifest(raw, vid, lambda fingerprint: len(self.architecture(fingerprint)))
            self._records[vid] = record
        return record

    def storage_bytes(self, vid: str) -> int:
        """Bytes version ``vid`` added to the store: data objects, manifest, architecture if new."""
        return self.version(vid).stored_bytes

    def architecture(self, fingerprint: str) -> Architecture:
        """The architecture record with this fingerprint."""
        found = self._architectures.get(fingerprint)
        if found is None:
            try:
                raw = self.store.get(f"architectures/{fingerprint}.json")
            except (FileNotFoundError, MMPackError):
                raise RepositoryError(f"architecture record {fingerprint!r} is missing") from None
            try:
                found = Architecture.from_json(_json.loads(raw))
            except (_json.Malformed, FormatError) as exc:
                raise RepositoryError(f"architecture record {fingerprint} is malformed: {exc}") from None
            if found.fingerprint() != fingerprint:
                raise RepositoryError(f"architecture record {fingerprint} does not match its fingerprint")
            self._architectures[fingerprint] = found
        return found

    def hashes(self, vid: str) -> np.ndarray:
        """Version ``vid``'s XXH3-64 of every (model, tensor), ``[n_models, n_tensors]``; no parameters are read.

        Tables come from the pinned tails of data objects; a version that stores
        none (provenance) derives its table from its base's, down the chain.
        """
        derived: list[VersionRecord] = []
        record = self.version(vid)
        while (table := self._tables.get(record.id)) is None:
            if APPROACHES[record.approach].stores_table(record):
                table = self._remember_table(record.id, recovery.checked_tail(self, record).table)
                break
            derived.append(record)
            record = self.version(record.base)  # a loop, not a recursion: chains may be long
        for record in reversed(derived):
            table = self._remember_table(
                record.id, APPROACHES[record.approach].hash_table(self.objects, record, lambda t=table: t)
            )
        return table

    def hash_rows(self, vid: str, models: np.ndarray) -> np.ndarray:
        """Rows of :meth:`hashes` for sorted unique ``models``."""
        table = self._tables.get(vid)
        if table is not None:
            return table[models]
        record = self.version(vid)
        if not APPROACHES[record.approach].stores_table(record):
            return self.hashes(vid)[models]
        return recovery.checked_tail(self, record).table[models]

    def owner_map(self, vid: str, chain: list[VersionRecord]) -> np.ndarray:
        """For every (model, tensor) of ``vid``, the position in ``chain`` (``vid`` and its bases) of
        the version that holds it; derived from manifests, immutable, kept for the next recovery."""
        return self._owner_maps.get_or_compute(
            vid, lambda: recovery.owners(chain, np.arange(chain[0].n_models), len(self.architecture(chain[0].architecture)))
        )

    def _remember_table(self, vid: str, table: np.ndarray) -> np.ndarray:
        return self._tables.put(vid, table)

    def _version_ids(self) -> list[str]:
        """Ids of the published versions, oldest first (manifests are not parsed)."""
        return sorted((k[len("versions/") : -len(".json")] for k in self._manifest_keys()), key=version_number)

    def _manifest_keys(self) -> list[str]:
        keys = self.store.list("versions/")
        return [k for k in keys if k.endswith(".json") and _is_version_id(k[len("versions/") : -len(".json")])]

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
        report = VerifyReport()
        if vid is not None:
            ids = [check_version_id(vid)]
        else:
            try:
                ids = self._version_ids()
            except Exception as exc:  # noqa: BLE001 - verify reports, it does not raise
                report.problems.append(f"cannot list the versions: {_described(exc)}")
                return report
        may_retrain = bool(training) or allow_import
        pool = DefaultPool() if executor is None else None
        options = recovery.RebuildOptions(executor or pool, training, allow_import)
        owners: dict[str, str] = {}  # object key -> the version that names it
        try:
            for version_id in ids:
                report.versions.append(version_id)
                try:
                    record = self.version(version_id)
                    shared = [(ref.key, owners[ref.key]) for ref in record.objects if ref.key in owners]
                    if shared:
                        raise RepositoryError(f"names object {shared[0][0]}, which belongs to {shared[0][1]}")
                    owners.update((ref.key, version_id) for ref in record.objects)
                    APPROACHES[record.approach].check(self.objects, record)
                    if not may_retrain and self._needs_retraining(record):
                        report.not_retrained.append(version_id)
                        continue
                    recovery.recover(self, version_id, None, verify=True, options=options)
                except Exception as exc:  # noqa: BLE001 - every problem is collected, none raised
                    report.problems.append(f"{version_id}: {_described(exc)}")
        finally:
            if pool is not None:
                pool.shutdown()
        report.objects = len(owners)
        return report

    def _needs_retraining(self, record: VersionRecord) -> bool:
        return any(not APPROACHES[r.approach].stores_rows for r in recovery.chain_of(self, record.id))

    def gc(self, *, grace_seconds: float = 3600.0) -> GcReport:
        """repo.gc(grace_seconds=3600) -> GcReport

        Remove what interrupted saves left behind: temporary files and data
        objects no manifest references, once older than ``grace_seconds``
        (a save still running in another process is never disturbed). Nothing
        is removed if any manifest cannot be read.

        ``grace_seconds`` must be a finite number of seconds, zero or more
        (:class:`~mmpack.InvalidArgumentError` otherwise: a NaN would compare
        as older than any cut-off and remove fresh files).

        Example::

            repo.gc(grace_seconds=0)  # no other process is saving
        """
        if isinstance(grace_seconds, bool) or not isinstance(grace_seconds, (int, float, np.integer, np.floating)):
            raise InvalidArgumentError(f"grace_seconds must be a number of seconds, not {type(grace_seconds).__name__}")
        if not math.isfinite(grace_seconds) or grace_seconds < 0:
            raise InvalidArgumentError(f"grace_seconds must be finite and at least 0, got {grace_seconds!r}")
        referenced = {ref.key for record in self.versions() for ref in record.objects}
        cleaned = self.store.clean_temporaries(grace_seconds)
        removed = size = 0
        cutoff = now().timestamp() - grace_seconds
        for key in self.store.list(ObjectStore.PREFIX):
            if key in referenced:
                continue
            try:
                if self.store.modified(key) > cutoff:
                    continue
                object_size = self.store.size(key)
            except FileNotFoundError:
                continue
            self.store.delete(key)
            removed += 1
            size += object_size
        return GcReport(cleaned.removed, removed, cleaned.bytes + size)


def _check_marker(content: bytes, store: Store) -> None:
    """The marker must be exactly ``{"format": "mmpack-repository", "format_version": 1}``
    (docs/REPOSITORY.md), read strictly."""
    try:
        found = _json.fields(_json.loads(content), ("format", "format_version"), what=_MARKER)
    except _json.Malformed as exc:
        raise RepositoryError(f"{store!r} is not an mmpack repository (bad {_MARKER}: {exc})") from None
    if found["format"] != _MARKER_CONTENT["format"]:
        raise RepositoryError(f"{store!r} is not an mmpack repository (bad {_MARKER})")
    if not _json.same(found["format_version"], _MARKER_CONTENT["format_version"]):
        raise RepositoryError(
            f"repository format version {found['format_version']!r} is not supported; this mmpack reads version "
            f"{_MARKER_CONTENT['format_version']} (a newer mmpack may read it)"
        )


def _described(exc: Exception) -> str:
    """An error in a report's words: its message, and its type when it is not one of mmpack's own."""
    if isinstance(exc, (MMPackError, OSError)):
        return str(exc)
    return f"unexpected {type(exc).__name__}: {exc}"


def _no_base() -> np.ndarray:
    raise MMPackError("this save has no base version")


def _is_version_id(name: str) -> bool:
    try:
        check_version_id(name)
    except VersionNotFoundError:
        return False
    return True


def _with_manifest_bytes(record: VersionRecord, size: int) -> VersionRecord:
    from dataclasses import replace

    return replace(record, manifest_bytes=size)

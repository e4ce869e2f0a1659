"""Repository: a versioned store of model sets."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from mmpack.approaches import APPROACHES, SaveRequest
from mmpack.architecture import Architecture
from mmpack.errors import ArchitectureMismatchError, MMPackError, RepositoryError, VersionNotFoundError
from mmpack.fileformat import ROWS, check_padding, check_size, modelset_and_hashes, read_modelset, read_rows, verify_rows
from mmpack.modelset import ModelSet
from mmpack.records import VersionRecord
from mmpack.repository import recovery
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
_MAX_ID_ATTEMPTS = 1000


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

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        head = f"checked {len(self.versions)} versions and {self.objects} objects"
        return head + (": all good" if self.ok else ":\n" + "\n".join(f"  - {p}" for p in self.problems))


@dataclass(frozen=True)
class GcReport:
    """What ``repo.gc()`` removed."""

    temporaries: int
    objects: int
    bytes: int


class Repository:
    """Repository(path_or_url, *, storage_options=None, fsync=True, snapshots=None, store=None)

    Versions of a model set, stored with the Baseline or Update approach,
    each immutable once saved. A local directory (created if missing) is the
    embedded default; an fsspec URL (``"s3://bucket/prefix"``, with
    ``storage_options`` for its file system; needs ``pip install
    "mmpack[s3]"`` for S3) keeps the repository in object storage, and any
    :class:`~mmpack.store.Store` can be passed instead. A version exists
    once its manifest is published, which happens after all its data is
    written, atomically: a crash at any moment leaves only complete
    versions. Several processes may save into one repository at once.

    Example::

        repo = mmpack.Repository("cells.repo")
        v1 = repo.save(models)                                   # full set
        v2 = repo.save(models, approach="update", base=v1)       # changed tensors only
        two = repo.recover(v2, indices=[3, 17])                  # reads only their bytes
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
    ) -> None:
        if (path is None) == (store is None):
            raise TypeError("pass a path or a store, not both")
        if store is not None and storage_options is not None:
            raise TypeError("storage_options configure the store a path or URL opens; a store is already configured")
        self.store = store if store is not None else open_store(path, storage_options, fsync=fsync)
        self.objects = ObjectStore(self.store)
        self.snapshots = snapshots or SnapshotPolicy()
        self._records: dict[str, VersionRecord] = {}
        self._architectures: dict[str, Architecture] = {}
        self._tables: OrderedDict[str, np.ndarray] = OrderedDict()
        self._owner_maps: OrderedDict[str, np.ndarray] = OrderedDict()
        self._open_or_create()

    def __repr__(self) -> str:
        return f"Repository({self.store!r})"

    def close(self) -> None:
        """Release open data objects (memory mappings, file handles). The repository stays usable."""
        self.objects.close()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _open_or_create(self) -> None:
        marker = json.dumps(_MARKER_CONTENT).encode()
        try:
            content = self.store.get(_MARKER)  # one request when the repository exists (remote stores)
        except FileNotFoundError:
            if self.store.list("") or self.store.list("versions/"):
                raise RepositoryError(f"{self.store!r} holds files but is not an mmpack repository") from None
            if self.store.put_if_absent(_MARKER, marker):
                return
            content = self.store.get(_MARKER)
        try:
            found = json.loads(content)
        except json.JSONDecodeError:
            found = None
        if not isinstance(found, dict) or found.get("format") != _MARKER_CONTENT["format"]:
            raise RepositoryError(f"{self.store!r} is not an mmpack repository (bad {_MARKER})")
        if found.get("format_version") != _MARKER_CONTENT["format_version"]:
            raise RepositoryError(f"repository format version {found.get('format_version')!r} is not supported")

    # -- saving -------------------------------------------------------------

    def save(
        self,
        models: ModelSet | Sequence[nn.Module],
        approach: str = "baseline",
        base: str | None = None,
        provenance: object = None,
        message: str = "",
    ) -> str:
        """repo.save(models, approach="baseline", base=None, message="") -> version id

        Store a model set (a :class:`ModelSet` or a list of modules) as a new
        version and return its id (``"v1"``, ``"v2"``...). ``"baseline"``
        stores the full set; ``"update"`` stores only the tensors whose hashes
        differ from ``base`` (reading the base's hashes, never its
        parameters), or the full set when there is no base or the snapshot
        policy asks for one. ``repo.versions()`` records which and why.

        Example::

            vid = repo.save(models, approach="update", base=vid)  # once per training cycle
        """
        if approach not in APPROACHES:
            raise MMPackError(f"unknown approach {approach!r}; choose one of {sorted(APPROACHES)}")
        if provenance is not None:
            raise MMPackError(f"approach {approach!r} takes no provenance")
        if not isinstance(message, str):
            raise TypeError("message must be a string")
        base_record = self.version(base) if base is not None else None
        modelset, hashes = modelset_and_hashes(models)
        if base_record is not None:
            self._check_compatible(modelset, base_record)
        chosen, reason = self._choose(approach, base_record)
        architecture_bytes = self._store_architecture(modelset.architecture)
        request = SaveRequest(
            modelset,
            hashes,
            base_record,
            (lambda: self.hashes(base_record.id)) if base_record is not None else _no_base,
            provenance,
        )
        stored = APPROACHES[chosen].save(self.objects, request)
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
                details=stored.details,
                architecture_bytes=architecture_bytes,
            )
        )
        self._remember_table(record.id, request.resolved_hashes())
        return record.id

    def _check_compatible(self, models: ModelSet, base: VersionRecord) -> None:
        difference = models.architecture.difference(self.architecture(base.architecture))
        if difference is not None:
            raise ArchitectureMismatchError(f"models differ from base {base.id}: {difference}")
        if len(models) != base.n_models:
            raise ArchitectureMismatchError(
                f"{len(models)} models cannot be stored on base {base.id} of {base.n_models} models"
            )

    def _choose(self, approach: str, base: VersionRecord | None) -> tuple[str, str]:
        if approach != "update":
            return approach, "requested"
        if base is None:
            return "baseline", "update without a base stores the full set"
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
        return "update", "requested"

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

    def _publish(self, make_record) -> VersionRecord:
        """Publish a manifest under the next free id; concurrent writers each get their own."""
        for _ in range(_MAX_ID_ATTEMPTS):
            taken = [version_number(k[len("versions/") : -len(".json")]) for k in self._manifest_keys()]
            vid = f"v{max(taken, default=0) + 1}"
            record = make_record(vid)
            content = encode_manifest(record)
            if self.store.put_if_absent(manifest_key(vid), content):
                record = _with_manifest_bytes(record, len(content))
                self._records[vid] = record
                return record
        raise RepositoryError("could not allocate a version id: too many concurrent writers")

    # -- reading ------------------------------------------------------------

    def recover(
        self, vid: str, indices: Iterable[int] | None = None, *, strategy: str = "resolve", verify: bool = True
    ) -> ModelSet:
        """repo.recover(vid, indices=None) -> ModelSet

        The models of version ``vid``, bit-exact, every piece checked against
        the version's hashes. With ``indices``, only those models' bytes are
        read. Deltas are resolved from the manifests, so each piece is read
        once however long the chain of updates (``strategy="recursive"``
        replays the chain as the paper does, for comparison).

        Example::

            ms = repo.recover("v7", indices=[3, 17])
        """
        return recovery.recover(self, check_version_id(vid), indices, strategy=strategy, verify=verify)

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
            found = Architecture.from_json(json.loads(raw))
            if found.fingerprint() != fingerprint:
                raise RepositoryError(f"architecture record {fingerprint} does not match its fingerprint")
            self._architectures[fingerprint] = found
        return found

    def hashes(self, vid: str) -> np.ndarray:
        """Version ``vid``'s XXH3-64 of every (model, tensor), ``[n_models, n_tensors]``; no parameters are read."""
        table = self._tables.get(vid)
        if table is None:
            record = self.version(vid)
            table = self.objects.hash_rows(record.objects[0], np.arange(record.n_models))
            self._remember_table(vid, table)
        else:
            self._tables.move_to_end(vid)
        return table

    def hash_rows(self, vid: str, models: np.ndarray, opened=None) -> np.ndarray:
        """Rows of :meth:`hashes` for sorted unique ``models`` (reads only those rows; ``opened``
        reuses the version's data object if the caller holds it open)."""
        table = self._tables.get(vid)
        if table is not None:
            return table[models]
        return self.objects.hash_rows(self.version(vid).objects[0], models, opened)

    def owner_map(self, vid: str, chain: list[VersionRecord]) -> np.ndarray:
        """For every (model, tensor) of ``vid``, the position in ``chain`` (``vid`` and its bases) of
        the version that holds it; derived from manifests, immutable, kept for the next recovery."""
        found = self._owner_maps.get(vid)
        if found is None:
            found = recovery.owners(chain, np.arange(chain[0].n_models), len(self.architecture(chain[0].architecture)))
            self._owner_maps[vid] = found
            while len(self._owner_maps) > _HASH_TABLE_CACHE:
                self._owner_maps.popitem(last=False)
        else:
            self._owner_maps.move_to_end(vid)
        return found

    def _remember_table(self, vid: str, table: np.ndarray) -> None:
        self._tables[vid] = table
        self._tables.move_to_end(vid)
        while len(self._tables) > _HASH_TABLE_CACHE:
            self._tables.popitem(last=False)

    def _version_ids(self) -> list[str]:
        """Ids of the published versions, oldest first (manifests are not parsed)."""
        return sorted((k[len("versions/") : -len(".json")] for k in self._manifest_keys()), key=version_number)

    def _manifest_keys(self) -> list[str]:
        keys = self.store.list("versions/")
        return [k for k in keys if k.endswith(".json") and _is_version_id(k[len("versions/") : -len(".json")])]

    # -- maintenance ----------------------------------------------------------

    def verify(self, vid: str | None = None) -> VerifyReport:
        """repo.verify(vid=None) -> VerifyReport

        Check every object's checksums and that every version (or only
        ``vid``) recovers bit-exactly. Problems are collected, not raised.

        Example::

            report = repo.verify()
            assert report.ok, str(report)
        """
        report = VerifyReport()
        ids = [check_version_id(vid)] if vid is not None else self._version_ids()
        checked: set[str] = set()
        for version_id in ids:
            report.versions.append(version_id)
            try:
                record = self.version(version_id)
                for ref in record.objects:
                    if ref.key not in checked:
                        checked.add(ref.key)
                        self._check_object(record, ref)
                recovery.recover(self, version_id, None, verify=True)
            except (MMPackError, OSError) as exc:
                report.problems.append(f"{version_id}: {exc}")
        report.objects = len(checked)
        return report

    def _check_object(self, record: VersionRecord, ref) -> None:
        """Read a whole object, checking its size, padding and every row's checksum."""
        with self.objects.reader(ref) as (source, header):
            check_size(source, header)
            check_padding(source, header)
            if header.layout.kind != ROWS:
                read_modelset(source, header, None, verify=True)
                return
            index = self.objects.row_index(ref)
            tensors = np.concatenate([np.full(len(ids), j) for j, ids in enumerate(index)] or [np.empty(0, int)])
            models = np.concatenate(index or [np.empty(0, int)])
            stored = np.concatenate([np.arange(len(ids)) for ids in index] or [np.empty(0, int)])
            scratch = [np.empty(max(count, 1) * s.nbytes, np.uint8) for count, s in zip(header.layout.rows, header.architecture.tensors)]
            computed = read_rows(source, header, tensors, stored, scratch, stored)
            table = self.objects.hash_rows(ref, np.arange(header.n_models))
            verify_rows(models, tensors, computed, table[models, tensors], f"object {ref.key}")
            if record.changes is not None and not np.array_equal(record.changes.dense(record.n_models),
                                                                  _dense(index, header.n_models)):
                raise RepositoryError(f"object {ref.key} holds other rows than the manifest of {record.id} lists")

    def gc(self, *, grace_seconds: float = 3600.0) -> GcReport:
        """repo.gc(grace_seconds=3600) -> GcReport

        Remove what interrupted saves left behind: temporary files and data
        objects no manifest references, once older than ``grace_seconds``
        (a save still running in another process is never disturbed). Nothing
        is removed if any manifest cannot be read.

        Example::

            repo.gc(grace_seconds=0)  # no other process is saving
        """
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


def _no_base() -> np.ndarray:
    raise MMPackError("this save has no base version")


def _is_version_id(name: str) -> bool:
    try:
        check_version_id(name)
    except VersionNotFoundError:
        return False
    return True


def _dense(index: list[np.ndarray], n_models: int) -> np.ndarray:
    out = np.zeros((n_models, len(index)), dtype=bool)
    for j, ids in enumerate(index):
        out[ids, j] = True
    return out


def _with_manifest_bytes(record: VersionRecord, size: int) -> VersionRecord:
    from dataclasses import replace

    return replace(record, manifest_bytes=size)

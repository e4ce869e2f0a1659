"""Looking after a repository: verify what it holds, prune old versions, collect garbage.

``verify`` reads everything and collects every problem; ``prune`` keeps the
versions a caller names and deletes the rest in one catalog commit, first
rewriting kept deltas whose chains would lose a version; ``gc`` removes
what nothing names any more (objects of deleted versions, leftovers of
interrupted saves and prunes, catalog documents older than the last two
checkpoints), once older than a grace period.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime

import numpy as np

from mmpack.approaches import APPROACHES, DefaultPool, SaveRequest
from mmpack.compression import Compression
from mmpack.errors import InvalidArgumentError, MMPackError, RepositoryError, VersionNotFoundError
from mmpack.modelset import ModelSet
from mmpack.objects import ObjectStore
from mmpack.records import VersionRecord, one_object_form
from mmpack.repository import executor
from mmpack.repository.catalog import Format2Catalog
from mmpack.repository.catalog.documents import now, version_number
from mmpack.repository.catalog.format2 import CHECKPOINTS, LOG, StaleCatalogError, _seq_of
from mmpack.repository.catalog.tables import Tables
from mmpack.repository.slices import recover_slices

_PRUNE_ATTEMPTS = 5


@dataclass
class VerifyReport:
    """What ``repo.verify()`` checked and every problem it found (empty when all is well)."""

    versions: list[str] = field(default_factory=list)
    objects: int = 0
    problems: list[str] = field(default_factory=list)
    not_retrained: list[str] = field(default_factory=list)  # provenance versions checked without retraining

    @property
    def ok(self) -> bool:
        """True when verification found no problem."""
        return not self.problems

    def __str__(self) -> str:
        head = f"checked {len(self.versions)} versions and {self.objects} objects"
        if self.not_retrained:
            head += f" ({', '.join(self.not_retrained)} not retrained: records and datasets checked only)"
        return head + (": all good" if self.ok else ":\n" + "\n".join(f"  - {p}" for p in self.problems))


@dataclass(frozen=True)
class GcReport:
    """What ``repo.gc()`` removed: temporaries, data objects, catalog documents, and their bytes."""

    temporaries: int
    objects: int
    bytes: int
    catalog: int = 0


@dataclass(frozen=True)
class PruneReport:
    """What ``repo.prune()`` did (or, with ``dry_run=True``, would do).

    ``deleted``: versions removed from the catalog. ``rewritten``: kept versions
    stored anew because their chain lost a version (as full versions, or as
    deltas on a kept version). ``kept``: every version kept, including those
    kept only because a kept provenance version needs them and retraining was
    not allowed (``dependencies``). ``freed_bytes``: bytes of the objects no
    kept version names any more (``gc`` removes them); ``written_bytes``: bytes
    of the rewritten versions' new objects (estimated as full sets by a dry run).
    """

    deleted: tuple[str, ...]
    rewritten: tuple[str, ...]
    kept: tuple[str, ...]
    dependencies: tuple[str, ...]
    freed_bytes: int
    written_bytes: int
    dry_run: bool

    def __str__(self) -> str:
        if self.dry_run:
            text = (f"would delete {len(self.deleted)} version(s), keep {len(self.kept)} and rewrite "
                    f"{len(self.rewritten)}; gc would then free {self.freed_bytes / 1e6:.2f} MB, the rewrites "
                    f"take about {self.written_bytes / 1e6:.2f} MB")
        else:
            text = (f"deleted {len(self.deleted)} version(s), kept {len(self.kept)}, rewrote {len(self.rewritten)}; "
                    f"gc frees {self.freed_bytes / 1e6:.2f} MB, the rewrites took {self.written_bytes / 1e6:.2f} MB")
        if self.dependencies:
            text += f"; kept {', '.join(self.dependencies)} for the provenance versions that need them"
        return text


def described(exc: BaseException) -> str:
    """An error in a report's words: its message, and its type when it is not one of mmpack's own."""
    if isinstance(exc, (MMPackError, OSError)):
        return str(exc)
    return f"unexpected {type(exc).__name__}: {exc}"


# -- verify -----------------------------------------------------------------------------------


def verify(tables: Tables, vid: str | None, options: executor.RebuildOptions, may_retrain: bool,
           slice_bytes: int = 256 << 20) -> VerifyReport:
    """Check every object's checksums and that every version (or only ``vid``) recovers bit-exactly,
    recovered in slices of about ``slice_bytes``; collect every problem, never raise."""
    catalog, objects = tables.catalog, tables.objects
    report = VerifyReport()
    try:
        ids = [vid] if vid is not None else catalog.ids()
    except Exception as exc:  # noqa: BLE001 - verify reports, it does not raise
        report.problems.append(f"cannot list the versions: {described(exc)}")
        return report
    owners: dict[str, str] = {}  # object key -> the version that names it
    for version_id in ids:
        report.versions.append(version_id)
        try:
            record = catalog.record(version_id)
            shared = [(ref.key, owners[ref.key]) for ref in record.objects if ref.key in owners]
            if shared:
                raise RepositoryError(f"names object {shared[0][0]}, which belongs to {shared[0][1]}")
            owners.update((ref.key, version_id) for ref in record.objects)
            APPROACHES[record.approach].check(objects.objects, record)
            if record.table_shards:  # the table objects state what the version's table is
                if not np.array_equal(objects.whole_table(record), _derived_table(tables, record)):
                    raise RepositoryError(f"the table object of {record.describe()} disagrees with its chain")
            if not may_retrain and any(not APPROACHES[r.approach].stores_rows for r in tables.chain(version_id)):
                report.not_retrained.append(version_id)
                continue
            size = _slice_models(tables, record, slice_bytes)
            for _ in recover_slices(tables, version_id, size, options=options):
                pass  # every piece checked as it lands; one slice in memory at a time
        except Exception as exc:  # noqa: BLE001 - every problem is collected, none raised
            report.problems.append(f"{version_id}: {described(exc)}")
    report.objects = len(owners)
    return report


def _slice_models(tables: Tables, record: VersionRecord, slice_bytes: int) -> int:
    per_model = max(1, tables.catalog.architecture(record.architecture).nbytes_per_model)
    return max(1, slice_bytes // per_model)


def _derived_table(tables: Tables, record: VersionRecord) -> np.ndarray:
    models, rows = tables.objects.own_hashes(record)
    table = tables.table(record.base).copy()
    table[models] = rows
    return table


# -- gc ---------------------------------------------------------------------------------------


def check_grace(grace_seconds: object) -> float:
    if isinstance(grace_seconds, bool) or not isinstance(grace_seconds, (int, float, np.integer, np.floating)):
        raise InvalidArgumentError(f"grace_seconds must be a number of seconds, not {type(grace_seconds).__name__}")
    if not math.isfinite(grace_seconds) or grace_seconds < 0:
        raise InvalidArgumentError(f"grace_seconds must be finite and at least 0, got {grace_seconds!r}")
    return float(grace_seconds)


def gc(tables: Tables, grace_seconds: float) -> GcReport:
    """Remove temporaries, objects no live version names, and (format 2) catalog documents older
    than the last two checkpoints, each once older than ``grace_seconds``. Nothing is removed if the
    catalog cannot be read whole."""
    grace = check_grace(grace_seconds)
    catalog = tables.catalog
    store = catalog.store
    referenced = {ref.key for record in catalog.versions() for ref in record.objects}
    cleaned = store.clean_temporaries(grace)
    cutoff = now().timestamp() - grace
    removed = size = 0
    for key in store.list(ObjectStore.PREFIX):
        if key in referenced:
            continue
        found = _old_enough(store, key, cutoff)
        if found is not None:
            store.delete(key)
            removed += 1
            size += found
    documents = 0
    if isinstance(catalog, Format2Catalog):
        documents, catalog_bytes = _compact_log(catalog, cutoff)
        size += catalog_bytes
    return GcReport(cleaned.removed, removed, cleaned.bytes + size, documents)


def _old_enough(store, key: str, cutoff: float) -> int | None:
    """The size of ``key`` if it was last written before ``cutoff`` (None if newer or gone)."""
    try:
        if store.modified(key) > cutoff:
            return None
        return store.size(key)
    except FileNotFoundError:
        return None


def _compact_log(catalog: Format2Catalog, cutoff: float) -> tuple[int, int]:
    """Remove commits and checkpoints the newest state no longer needs: everything before the
    checkpoint below the one the newest commit builds on (readers that are a little behind keep
    theirs). Checkpoint 0 stays while it is that one."""
    catalog.refresh()
    store = catalog.store
    checkpoints = sorted(s for s in (_seq_of(k, CHECKPOINTS) for k in store.list(CHECKPOINTS)) if s is not None)
    current = catalog.state.checkpoint
    older = [s for s in checkpoints if s < current]
    keep_from = older[-1] if older else current
    removed = size = 0
    for prefix in (CHECKPOINTS, LOG):
        for key in list(store.list(prefix)):
            seq = _seq_of(key, prefix)
            if seq is None or seq >= keep_from:
                continue
            found = _old_enough(store, key, cutoff)
            if found is not None:
                store.delete(key)
                removed += 1
                size += found
    return removed, size


# -- prune ------------------------------------------------------------------------------------


def select_kept(records: list[VersionRecord], tags: dict[str, str], keep_last: int | None,
                newer_than: datetime | None, keep_tagged: bool, keep: Iterable[str]) -> set[str]:
    """The versions a prune keeps: the last ``keep_last``, those created at or after
    ``newer_than``, tagged ones (``keep_tagged``) and those named in ``keep``."""
    if keep_last is not None and (type(keep_last) is not int or keep_last < 0):
        raise InvalidArgumentError(f"keep_last must be a whole number of versions, got {keep_last!r}")
    if newer_than is not None and (not isinstance(newer_than, datetime) or newer_than.tzinfo is None):
        raise InvalidArgumentError(
            "newer_than must be a timezone-aware datetime, e.g. datetime.now(timezone.utc) - timedelta(days=365)"
        )
    kept = set(keep)
    if keep_last:
        kept.update(r.id for r in records[-keep_last:])
    if newer_than is not None:
        kept.update(r.id for r in records if r.created >= newer_than)
    if keep_tagged:
        kept.update(tags.values())
    return kept


def prune(tables: Tables, objects: ObjectStore, kept_ids: set[str], *, dry_run: bool, message: str,
          options: executor.RebuildOptions, may_retrain: bool, shard_bytes: int | None = None) -> PruneReport:
    """Delete every live version not in ``kept_ids`` in one commit, after rewriting the kept versions
    that depend on deleted ones. Retried from the start if the catalog moves meanwhile."""
    catalog = tables.catalog
    if not isinstance(catalog, Format2Catalog):
        raise catalog._needs_format_2("prune")
    for _ in range(_PRUNE_ATTEMPTS):
        catalog.refresh()
        seen = catalog.seq
        plan = _plan_prune(tables, set(kept_ids), may_retrain)
        records, deleted, rewrite, dependencies = plan
        freed = _freed_bytes(records, deleted, rewrite)
        if dry_run:
            estimate = sum(sum(o.bytes for o in tables.chain(vid)[-1].objects) for vid in rewrite)
            return PruneReport(tuple(deleted), tuple(rewrite), _kept(records, deleted), tuple(dependencies), freed,
                               estimate, True)
        if not deleted:
            return PruneReport((), (), _kept(records, deleted), tuple(dependencies), 0, 0, False)
        written: list[str] = []
        try:
            replaced = _rewrite(tables, objects, records, set(deleted), rewrite, options, written, shard_bytes)
            catalog.commit_prune(deleted, replaced, message, seen)
        except StaleCatalogError:
            _remove(objects, written)
            continue
        except BaseException:
            _remove(objects, written)
            raise
        written_bytes = sum(o.bytes for r in replaced for o in r.objects)
        return PruneReport(tuple(deleted), tuple(rewrite), _kept(records, deleted), tuple(dependencies), freed,
                           written_bytes, False)
    raise RepositoryError("could not prune: other writers kept changing the catalog")


def _plan_prune(tables: Tables, kept: set[str], may_retrain: bool):
    catalog = tables.catalog
    records = {r.id: r for r in catalog.versions()}
    unknown = sorted(kept - set(records), key=version_number)
    if unknown:
        raise VersionNotFoundError(f"cannot keep {', '.join(unknown)}: no such live version")
    if not kept:
        raise InvalidArgumentError(
            "prune would delete every version: name what to keep (keep_last=, newer_than=, keep=)"
        )
    dependencies: list[str] = []
    # A kept version whose chain needs retraining cannot be rewritten without permission: then
    # the versions it depends on stay.
    changed = True
    while changed:
        changed = False
        for vid in sorted(kept, key=version_number):
            chain = tables.chain(vid)
            lost = [r for r in chain[1:] if r.id not in kept]
            if lost and not may_retrain and any(not APPROACHES[r.approach].stores_rows for r in chain):
                for r in lost:
                    kept.add(r.id)
                    dependencies.append(r.id)
                changed = True
    deleted = sorted(set(records) - kept, key=version_number)
    rewrite = [vid for vid in sorted(kept, key=version_number)
               if any(r.id not in kept for r in tables.chain(vid)[1:])]
    return records, deleted, rewrite, sorted(set(dependencies), key=version_number)


def _kept(records: dict[str, VersionRecord], deleted: list[str]) -> tuple[str, ...]:
    return tuple(vid for vid in records if vid not in set(deleted))


def _freed_bytes(records: dict[str, VersionRecord], deleted: list[str], rewrite: list[str]) -> int:
    gone = set(deleted) | set(rewrite)
    still = {ref.key for vid, r in records.items() if vid not in gone for ref in r.objects}
    return sum(ref.bytes for vid in gone for ref in records[vid].objects if ref.key not in still)


def _rewrite(tables: Tables, objects: ObjectStore, records: dict[str, VersionRecord], deleted: set[str],
             rewrite: list[str], options: executor.RebuildOptions, written: list[str],
             shard_bytes: int | None) -> list[VersionRecord]:
    """New records (and objects) for the kept versions in ``rewrite``, oldest first: each a delta on
    its nearest kept ancestor whose chain is whole, or a full version if it has none."""
    replaced: dict[str, VersionRecord] = {}
    roots: dict[str, ModelSet] = {}  # rewritten full versions, held for the XOR deltas taken on them
    pool = DefaultPool() if options.executor is None else None
    options = executor.RebuildOptions(options.executor or pool, options.training, options.allow_import)
    try:
        for vid in rewrite:
            record = records[vid]
            models = executor.recover(tables, vid, None, verify=True, options=options)
            table = tables.table(vid)
            ancestor = next((r for r in tables.chain(vid)[1:] if r.id not in deleted), None)
            compression = _compression_of(record)
            if ancestor is None:
                approach, base, base_table, xor = "baseline", None, None, None
            else:
                ancestor = replaced.get(ancestor.id, ancestor)
                base_table = tables.table(ancestor.id)
                root = _chain_root(tables, replaced, ancestor)
                approach, base = "update", ancestor
                held = roots.get(root.id)
                fetch = (lambda wanted, held=held: held.select(wanted)) if held is not None else (
                    lambda wanted, root=root.id: executor.recover(tables, root, wanted, options=options))
                xor = (root.id, fetch) if compression is not None and compression.xor else None
            request = SaveRequest(models, table, base, (lambda t=base_table: t), None, compression, xor,
                                  subset=True, table_object=False, shard_bytes=shard_bytes)
            stored = APPROACHES[approach].save(objects, request)
            written.extend(ref.key for ref in stored.objects)
            changes = stored.changes if approach != "baseline" else None
            replaced[vid] = replace(
                record, approach=approach, base=base.id if base is not None else None,
                objects=one_object_form(stored.objects, record.n_models),
                changes=changes,
                details={**{k: v for k, v in record.details.items() if k not in ("compression", "xor_base")},
                         **stored.details},
                reason=f"rewritten by prune (its chain lost versions); first {record.reason}",
                delta=APPROACHES[approach].delta,
            )
            if approach == "baseline":
                roots[vid] = models
    finally:
        if pool is not None:
            pool.shutdown()
    return list(replaced.values())


def _chain_root(tables: Tables, replaced: dict[str, VersionRecord], record: VersionRecord) -> VersionRecord:
    while record.delta:
        record = replaced.get(record.base) or tables.catalog.record(record.base)
    return record


def _compression_of(record: VersionRecord) -> Compression | None:
    described = record.details.get("compression")
    return Compression.described(described) if described else None


def _remove(objects: ObjectStore, keys: list[str]) -> None:
    for key in keys:
        try:
            objects.store.delete(key)
        except (OSError, MMPackError):
            pass  # left for gc

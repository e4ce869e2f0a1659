"""Saving a version: the approach (asked for, advised or forced by the snapshot policy), its objects,
then one atomic publication in the catalog.

A version exists once the catalog publishes its record, which happens after
its objects are complete; a save killed at any moment leaves only complete
versions (and objects nothing names, for ``gc``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch import nn

from mmpack.approaches import APPROACHES, SaveRequest
from mmpack.approaches.advisor import CostModel, Policy, Throughputs, check_policy, measured_throughputs
from mmpack.compression import Compression
from mmpack.errors import ArchitectureMismatchError, InvalidArgumentError, MMPackError
from mmpack.fileformat import modelset_and_hashes
from mmpack.modelset import ModelSet
from mmpack.objects import ObjectStore
from mmpack.records import Changes, VersionRecord, one_object_form
from mmpack.repository.catalog.documents import now
from mmpack.repository.catalog.tables import TABLE_EVERY, Tables
from mmpack.repository.cleanup import WriteLog


@dataclass(frozen=True)
class SnapshotPolicy:
    """When an ``approach="update"`` save stores a full version instead of a delta.

    ``every``: after this many deltas in a row. ``max_chain_ratio``: once the
    deltas since the last full version add up to this fraction of a full
    version's bytes. Either bound (or both) may be set.

    The trade-off: a snapshot costs a full set of storage and makes the next
    chain start afresh. Recovery is already bounded without snapshots (each
    piece is read once), but its cost grows slowly with the chain: the
    pieces of the result scatter over more objects and smaller reads.
    ``max_chain_ratio=1.0`` caps the chain's extra storage at one full set.

    Example::

        repo = mmpack.Repository("cells.repo", snapshots=mmpack.SnapshotPolicy(every=10))
    """

    every: int | None = None
    max_chain_ratio: float | None = None

    def __post_init__(self) -> None:
        if self.every is not None and self.every < 1:
            raise ValueError("SnapshotPolicy.every must be at least 1")
        if self.max_chain_ratio is not None and self.max_chain_ratio <= 0:
            raise ValueError("SnapshotPolicy.max_chain_ratio must be positive")


#: Bytes of rows a shard holds at most, unless the repository or the save says otherwise
#: (docs/DESIGN-NOTES.md, "Shards": how it was chosen).
DEFAULT_SHARD_BYTES = 256 << 20


def check_shard_bytes(value: object) -> int:
    """A shard size: a whole number of bytes, at least 1."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidArgumentError(f"shard_bytes must be a whole number of bytes, at least 1, not {value!r}")
    return int(value)


@dataclass(frozen=True)
class Settings:
    """A repository's defaults for saving."""

    compression: Compression | None
    policy: Policy
    snapshots: SnapshotPolicy
    throughputs: Throughputs | None
    shard_bytes: int = DEFAULT_SHARD_BYTES


def save(
    tables: Tables,
    objects: ObjectStore,
    settings: Settings,
    models: ModelSet | Sequence[nn.Module],
    approach: str,
    base: VersionRecord | None,
    provenance: object,
    message: str,
    compression: Compression | None,
    policy: Policy | None,
    recover_root,
    hashes: np.ndarray | None = None,
) -> VersionRecord:
    """Store ``models`` as a new version; its record. ``recover_root(vid, models)`` gives the
    full version's rows XOR deltas are taken against. ``hashes``: the set's, when the caller has
    them (a staged host set, see background.py)."""
    catalog = tables.catalog
    modelset, hashes = (models, hashes) if hashes is not None else modelset_and_hashes(models)
    if base is not None:
        check_compatible(catalog, modelset, base)
    format2 = catalog.format_version >= 2
    table_object = base is not None and format2 and tables.depth_without_table(base.id) + 1 >= TABLE_EVERY
    xor = None
    if compression is not None and compression.xor and base is not None:
        root = tables.chain(base.id)[-1]
        xor = (root.id, lambda wanted: recover_root(root.id, wanted))
    request = SaveRequest(
        modelset, hashes, base,
        (lambda: tables.table(base.id)) if base is not None else _no_base,
        provenance, compression, xor, subset=format2, table_object=table_object,
        shard_bytes=settings.shard_bytes if format2 else None,  # format 1 records name one object
    )
    details: dict = {}
    auto_reason = ""
    if approach == "auto":
        approach, auto_reason, details = advise(tables, settings, request, policy)
    chosen, reason = choose(tables, settings.snapshots, approach, base)
    if details:
        reason = auto_reason if chosen == approach else f"{auto_reason}; then {reason}"
    written = WriteLog(objects)
    with written.undone_on_failure():  # a failed save removes what it wrote (cleanup.py)
        record = _store_and_publish(catalog, written, request, chosen, base, reason, details, message, format2)
    tables.remember(record, request.resolved_hashes())
    return record


def _store_and_publish(catalog, written: WriteLog, request: SaveRequest, chosen: str, base: VersionRecord | None,
                       reason: str, details: dict, message: str, format2: bool) -> VersionRecord:
    modelset = request.models
    stored = APPROACHES[chosen].save(written, request)
    changes = stored.changes
    if changes is None and base is not None and format2:
        changes = Changes.from_mask(request.changed())  # a full version still says what changed
    return catalog.publish(
        lambda vid, architecture_bytes: VersionRecord(
            id=vid,
            approach=chosen,
            base=base.id if base is not None else None,
            n_models=len(modelset),
            created=now(),
            message=message,
            reason=reason,
            architecture=modelset.architecture.fingerprint(),
            objects=one_object_form(stored.objects, len(modelset)),
            changes=changes,
            details={**details, **stored.details},
            architecture_bytes=architecture_bytes,
            delta=APPROACHES[chosen].delta,
        ),
        modelset.architecture,
        written,
    )


def check_compatible(catalog, models: ModelSet, base: VersionRecord) -> None:
    difference = models.architecture.difference(catalog.architecture(base.architecture))
    if difference is not None:
        raise ArchitectureMismatchError(f"models differ from base {base.id}: {difference}")
    if len(models) != base.n_models:
        raise ArchitectureMismatchError(
            f"{len(models)} models cannot be stored on base {base.id} of {base.n_models} models"
        )


def advise(tables: Tables, settings: Settings, request: SaveRequest, policy: Policy | None) -> tuple[str, str, dict]:
    """Pick an approach for ``approach="auto"``: every registered approach estimates what it
    would cost (None: it cannot store this version), then the policy picks."""
    policy = check_policy(policy) if policy is not None else settings.policy
    chain = tables.chain(request.base.id) if request.base is not None else []
    model = CostModel(request, chain, settings.throughputs or measured_throughputs())
    estimates = {name: approach.estimate(request, model) for name, approach in APPROACHES.items()}
    available = {name: e for name, e in estimates.items() if e is not None}
    if not available:
        raise MMPackError("no approach can store this version")
    chosen, why = policy.choose(available)
    described = "; ".join(
        f"{name} {e.stored_bytes / 1e6:.3f} MB, recover ~{e.recover_seconds:.3f} s" if e is not None
        else f"{name} unavailable" for name, e in estimates.items()
    )
    details = {"policy": policy.describe(), "estimates": {name: e.to_json() for name, e in available.items()}}
    return chosen, f"auto ({policy.describe()}): {why} [{described}]", details


def choose(tables: Tables, policy: SnapshotPolicy, approach: str, base: VersionRecord | None) -> tuple[str, str]:
    """The approach actually used, and why: a delta without a base, or past the snapshot policy's
    bounds, stores the full set."""
    if approach == "baseline":
        return approach, "requested"
    if base is None:
        return "baseline", f"{approach} without a base stores the full set"
    if policy.every is None and policy.max_chain_ratio is None:
        return approach, "requested"
    chain = tables.chain(base.id)
    deltas = len(chain) - 1
    if policy.every is not None and deltas + 1 > policy.every:
        return "baseline", f"snapshot: {deltas} updates since the last full version ({chain[-1].id})"
    if policy.max_chain_ratio is not None:
        full_bytes = sum(o.bytes for o in chain[-1].objects)
        delta_bytes = sum(o.bytes for r in chain[:-1] for o in r.objects)
        if delta_bytes >= policy.max_chain_ratio * full_bytes:
            return (
                "baseline",
                f"snapshot: deltas since {chain[-1].id} hold {delta_bytes / full_bytes:.0%} of a full version",
            )
    return approach, "requested"


def _no_base() -> np.ndarray:
    raise MMPackError("this save has no base version")


def default_policy() -> Policy:
    from mmpack.approaches.advisor import SmallestUnder

    return SmallestUnder(math.inf)

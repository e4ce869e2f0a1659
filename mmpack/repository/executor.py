"""Carrying out recovery plans: open, check and read the objects a plan names, and verify every piece.

Each piece is verified against the hash its own object states (the object's
pinned tail), as it lands: recovering a version needs no whole hash table,
only the objects the pieces come from. Pieces rebuilt by retraining are
checked by their approach against its stored hashes.

Also here: the paper's recursive recovery (the full version, then every delta
of the chain applied in turn), kept as a reference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from mmpack import packing
from mmpack.approaches import APPROACHES, RebuildContext
from mmpack.architecture import Architecture
from mmpack.errors import IntegrityError
from mmpack.fileformat import RowRequest, read_rows_many, verify_rows
from mmpack.modelset import ModelSet
from mmpack.placement import place_models
from mmpack.provenance import TrainingFunction
from mmpack.records import VersionRecord
from mmpack.repository.catalog.tables import Tables
from mmpack.repository.planner import Read, RecoveryPlan, plan_recovery, reads_of, xor_base

U64 = np.uint64

# Objects one native read call holds open at once: a chain of any length is read in batches of
# this many, so a long history never runs into the process's limit on open files.
MAX_OPEN_OBJECTS = 256


@dataclass(frozen=True)
class RebuildOptions:
    """How pieces that must be retrained are retrained (see ``Repository.recover``)."""

    executor: Executor | None = None
    training: Mapping[str, TrainingFunction] | None = None
    allow_import: bool = False


def recover(tables: Tables, vid: str, indices=None, *, verify: bool = True,
            options: RebuildOptions = RebuildOptions()) -> ModelSet:
    """Plan and carry out the recovery of ``vid`` (or only ``indices``)."""
    return execute(tables, plan_recovery(tables, vid, indices), verify=verify, options=options)


def recover_placed(tables: Tables, vid: str, indices, out, device, *, verify: bool = True,
                   options: RebuildOptions = RebuildOptions(), chunk_bytes: int | None = None):
    """The recovery of ``vid`` into ``out`` or onto ``device`` (see ``Repository.recover``): a plan
    per chunk of models, each carried out into staging buffers (or straight into ``out``)."""
    chain = tables.chain(vid)
    tables.objects.tail(chain[-1])  # the full version's object fixes the set's size before any allocation
    architecture = tables.catalog.architecture(chain[0].architecture)
    return place_models(
        architecture, chain[0].n_models, indices, out, device,
        lambda models, into: execute(tables, plan_recovery(tables, vid, models), verify=verify, options=options,
                                     into=into),
        chunk_bytes=chunk_bytes, what=f"version {vid}",
    )


def execute(tables: Tables, plan: RecoveryPlan, *, verify: bool = True, options: RebuildOptions = RebuildOptions(),
            into: dict[str, torch.Tensor] | None = None) -> ModelSet:
    """The models ``plan`` recovers, bit-exact; every piece checked unless ``verify=False``.

    ``into``: contiguous host tensors ``[len(plan.models), *shape]`` by name to fill instead of
    fresh ones (the plan then keeps its models' order: ``plan.order`` is None)."""
    architecture, tensors = execute_tensors(tables, plan, verify=verify, options=options, into=into)
    result = ModelSet._trusted(architecture, tensors, len(plan.models))
    return result if plan.order is None else result.select(plan.order)


def execute_tensors(tables: Tables, plan: RecoveryPlan, *, verify: bool = True,
                    options: RebuildOptions = RebuildOptions(),
                    into: dict[str, torch.Tensor] | None = None) -> tuple[Architecture, dict[str, torch.Tensor]]:
    """The architecture and the stacked tensors ``plan`` recovers (only ``plan.tensors`` when it
    names some; into ``into`` when given), rows in the order of ``plan.models``."""
    catalog, objects = tables.catalog, tables.objects
    records = {r.version: catalog.record(r.version) for r in plan.reads}
    root = catalog.record(plan.root)
    architecture = catalog.architecture(root.architecture)
    # The objects the plan reads, and the root's shards that hold its models (the full version
    # fixes the set's size), state in headers they are pinned to how many models they hold: they
    # are checked against the records before anything is allocated from their sizes. On a remote
    # store, every object's header and tail travel at once (a round trip each otherwise).
    wanted = list({(r.version, r.object): r for r in plan.reads})
    wanted += [(root.id, s.index) for s in _holding(root, plan.models) if (root.id, s.index) not in wanted]
    if objects.remote and len(wanted) > 1:
        with ThreadPoolExecutor(min(16, len(wanted))) as pool:
            list(pool.map(lambda w: objects.tail(records.get(w[0]) or root, w[1]), wanted))
    else:
        for version, index in wanted:
            objects.tail(records.get(version) or root, index)
    models = plan.models
    if into is not None and plan.order is not None:
        raise ValueError("a plan that reorders its models cannot fill given tensors")
    if into is None:
        wanted_tensors = range(len(architecture)) if plan.tensors is None else plan.tensors.tolist()
        tensors, views = {}, {}
        for j in wanted_tensors:
            spec = architecture.tensors[j]
            tensors[spec.name], views[spec.name] = packing.empty_stacked_bytes(len(models), spec)
    else:
        tensors = into
        views = {name: packing.byte_view(tensor) for name, tensor in into.items()}
    destinations = [views[s.name] if s.name in views else np.empty(0, np.uint8) for s in architecture.tensors]
    if plan.rebuilds:
        context = RebuildContext(
            lambda base, wanted: recover(tables, base, wanted, verify=verify, options=options),
            objects.objects, options.training, options.allow_import, options.executor,
        )
        for rebuild in plan.rebuilds:
            _rebuild_pieces(context, catalog.record(rebuild.version), models, rebuild.rows, rebuild.columns,
                            architecture, tensors)
    # Batches in order: XOR reads come after the reads of the reference rows they apply to.
    for first in range(0, len(plan.reads), MAX_OPEN_OBJECTS):
        batch = plan.reads[first : first + MAX_OPEN_OBJECTS]
        with contextlib.ExitStack() as stack:
            requests = []
            for read in batch:
                opened = stack.enter_context(objects.open(records[read.version], read.object))
                requests.append(RowRequest(*opened, read.tensors, read.stored_rows, read.dst_rows, xor=read.xor))
            computed = read_rows_many(requests, destinations)
        if verify:
            for read, hashes in zip(batch, computed):
                verify_rows(read.models, read.tensors, hashes, _expected(tables, records[read.version], read),
                            f"version {plan.version} (pieces of {read.version})")
    return architecture, tensors


def _holding(record: VersionRecord, models: np.ndarray) -> list:
    """The version's shards that hold some of sorted ``models`` (the first shard if none do)."""
    shards = record.shards
    if len(shards) <= 1:
        return list(shards)
    low = np.searchsorted(models, [s.first for s in shards])
    high = np.searchsorted(models, [s.stop for s in shards])
    return [s for s, a, b in zip(shards, low, high) if b > a] or [shards[0]]


def _expected(tables: Tables, record: VersionRecord, read: Read) -> np.ndarray:
    """The hashes ``record``'s own object (the shard ``read`` reads) states for the pieces of ``read``."""
    ids, rows = tables.objects.own_hashes_of(record, read.object)
    at = np.searchsorted(ids, read.models)
    if len(at) and (at.max() >= len(ids) or np.any(ids[np.minimum(at, len(ids) - 1)] != read.models)):
        raise IntegrityError(f"the object of {record.describe()} states no hash for a piece it holds")
    return rows[at, read.tensors]


def _rebuild_pieces(context: RebuildContext, record: VersionRecord, models: np.ndarray, rows: np.ndarray,
                    columns: np.ndarray, architecture: Architecture, tensors: dict[str, torch.Tensor]) -> np.ndarray:
    """Retrain the models owning pieces ``(rows, columns)`` and put those pieces in place; their hashes
    (the approach has checked them against the ones it stored)."""
    needed = np.unique(rows)
    state = APPROACHES[record.approach].rebuild(context, record, models[needed])
    position = np.searchsorted(needed, rows)
    for j in np.unique(columns):
        name = architecture.tensors[j].name
        pick = columns == j
        tensors[name][torch.from_numpy(rows[pick])] = state.tensors[name][torch.from_numpy(position[pick])]
    return state.hashes()[position, columns]


def recover_recursive(tables: Tables, vid: str, *, verify: bool = True,
                      options: RebuildOptions = RebuildOptions()) -> ModelSet:
    """The paper's recovery: the full version, then every delta of the chain applied in turn (a loop,
    not a recursion: chains may be thousands of versions long). Each level is checked against that
    version's whole hash table."""
    catalog, objects = tables.catalog, tables.objects
    chain = tables.chain(vid)
    root = chain[-1]
    architecture = catalog.architecture(root.architecture)
    objects.tails(root, [s.index for s in root.shards])  # sizes checked before the allocation
    result = ModelSet._trusted(
        architecture, {s.name: packing.empty_stacked(root.n_models, s) for s in architecture.tensors}, root.n_models
    )
    for record in reversed(chain):
        if record is root:
            written = np.ones((record.n_models, len(architecture)), dtype=bool)
        else:
            written = record.changes.dense(record.n_models)
        columns, rows = np.nonzero(written.T)  # file order: tensor by tensor
        approach = APPROACHES[record.approach]
        if approach.stores_rows:
            destinations = [packing.byte_view(result.tensors[s.name]) for s in architecture.tensors]
            xor = record is not root and xor_base(record, chain) is not None
            # The deltas apply to the full version's values, not the base's: those are read first.
            references = reads_of(root, rows, columns, rows) if xor else []
            own = reads_of(record, rows, columns, rows, xor)
            with contextlib.ExitStack() as stack:
                requests = []
                for read in references + own:
                    opened = stack.enter_context(objects.open(root if read in references else record, read.object))
                    requests.append(RowRequest(*opened, read.tensors, read.stored_rows, read.dst_rows, xor=read.xor))
                hashes = read_rows_many(requests, destinations)[len(references):]
            rows, columns = (np.concatenate([getattr(r, f) for r in own] or [np.empty(0, np.int64)])
                             for f in ("dst_rows", "tensors"))
            computed = np.concatenate(hashes or [np.empty(0, np.uint64)])
        else:
            base = result  # the whole base set is at hand: retrain from it, as the paper does
            context = RebuildContext(
                lambda _, wanted, base=base: base.select(wanted), objects.objects, options.training,
                options.allow_import, options.executor,
            )
            result = ModelSet._trusted(architecture, {n: t.clone() for n, t in base.tensors.items()}, record.n_models)
            computed = _rebuild_pieces(context, record, np.arange(record.n_models), rows, columns, architecture,
                                       dict(result.tensors))
        if verify:
            verify_rows(rows, columns, computed, tables.table(record.id)[rows, columns], f"version {record.id}")
    return result

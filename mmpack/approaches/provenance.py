"""Provenance: store how updated models were trained, recover them by retraining (section 3.4).

A provenance version stores one small document: the training function (import
path and source hash), its configuration and environment, per updated model a
dataset reference and update kind, and the per-(model, tensor) hashes of the
updated models. Recovery rebuilds the base state of the needed models (any
approach), retrains them on their datasets, and checks every retrained tensor
against the stored hashes: weights that differ are never returned, and the
error names the models and the likely cause. Unlike the paper's code it
retrains only the models asked for, in parallel on any
``concurrent.futures.Executor``.
"""

from __future__ import annotations

import base64
import io
import json
import math
import multiprocessing
import os
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xxhash

from mmpack.approaches.advisor import CostModel, Estimate
from mmpack.approaches.base import Approach, SaveRequest, Stored, table_object
from mmpack.architecture import Architecture
from mmpack.errors import IntegrityError, MMPackError, ProvenanceError, ProvenanceMismatchError, RepositoryError
from mmpack.fileformat import Tail
from mmpack.modelset import ModelSet
from mmpack.objects import ObjectStore
from mmpack.provenance import Provenance, TrainingFunction, resolve_function, source_hash
from mmpack.records import Changes, ObjectRef, Shard, VersionRecord

_DOCUMENT = "mmpack-provenance"
# Below this many models, retraining runs in this process: starting worker
# processes (each imports torch) costs more than the training itself.
INLINE_MODELS = 64


@dataclass(frozen=True)
class RebuildContext:
    """What rebuilding pieces needs from the repository and the caller."""

    recover: Callable[[str, np.ndarray], ModelSet]  # (base version, sorted model ids) -> their state
    objects: ObjectStore
    training: Mapping[str, TrainingFunction] | None
    allow_import: bool
    executor: Executor | DefaultPool | None


class ProvenanceApproach(Approach):
    """Training provenance instead of parameters: tiny versions, recovery by verified retraining."""

    name = "provenance"
    stores_rows = False
    takes_provenance = True
    delta = True
    object_kind = "document"

    def estimate(self, request: SaveRequest, model: CostModel) -> Estimate | None:
        provenance = request.provenance
        if request.base is None or not isinstance(provenance, Provenance):
            return None
        recorded = len(provenance.updates)
        stored = len(json.dumps(provenance.to_json())) + 8 * recorded * len(request.models.architecture) * 4 // 3 + 512
        # Recovering retrains this version's models, and those of every provenance version below it.
        levels = 1 + sum(1 for r in model.chain if r.approach == self.name)
        retraining = (provenance.training_seconds or math.inf) * levels
        return Estimate(stored, model.recover_seconds(len(model.chain) + 1, model.chain_decoded_bytes()) + retraining)

    def save(self, objects: ObjectStore, request: SaveRequest) -> Stored:
        provenance = request.provenance
        if not isinstance(provenance, Provenance):
            raise ProvenanceError("approach 'provenance' needs provenance=Provenance.of(function, config, updates)")
        hashes = request.resolved_hashes()
        changed = hashes != request.base_hashes()
        recorded = provenance.models()
        if len(recorded) and recorded[-1] >= len(hashes):
            raise ProvenanceError(f"provenance names model {int(recorded[-1])}; the set has {len(hashes)} models")
        missing = np.setdiff1d(np.flatnonzero(changed.any(axis=1)), recorded)
        if len(missing):
            raise ProvenanceError(
                f"model {int(missing[0])} differs from base {request.base.id} but has no provenance entry "
                f"({len(missing)} such models): give every retrained model a (dataset, kind)"
            )
        document = {
            "format": _DOCUMENT,
            "format_version": 1,
            "provenance": provenance.to_json(),
            "hashes": base64.b64encode(np.ascontiguousarray(hashes[recorded], dtype="<u8").tobytes()).decode(),
        }
        content = json.dumps(document, separators=(",", ":")).encode()
        key = objects.new_key().replace(".mmpack", ".provenance.json")
        objects.put(key, content)
        changes = Changes.from_mask(changed)
        refs = [ObjectRef(key, len(content), xxhash.xxh3_64_intdigest(content))]
        if request.table_object:
            refs.append(table_object(objects, request.models, hashes))
        return Stored(refs, changes, {"retrained": len(recorded), "function": provenance.function})

    def locate(self, record: VersionRecord, models: np.ndarray, tensors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise RepositoryError("provenance versions store no rows; their pieces are rebuilt by retraining")

    def check(self, objects: ObjectStore, record: VersionRecord) -> None:
        provenance, _ = read_document(objects, record)
        owners = record.changes.models
        problems = [p for p in (provenance.updates[int(m)][0].problem() for m in owners) if p is not None]
        if problems:
            raise ProvenanceMismatchError(f"{len(problems)} dataset(s) of {record.id} unusable, first: {problems[0]}")

    def own_hashes(self, objects: ObjectStore, record: VersionRecord, shard: Shard,
                   tail: Tail | None) -> tuple[np.ndarray, np.ndarray]:
        provenance, stored = read_document(objects, record)
        return provenance.models(), stored

    def rebuild(self, context: RebuildContext, record: VersionRecord, models: np.ndarray) -> ModelSet:
        """The full state of ``models`` (sorted, unique, all with provenance entries) at this version."""
        provenance, stored = read_document(context.objects, record)
        recorded = provenance.models()
        position = np.searchsorted(recorded, models)
        if np.any(position >= len(recorded)) or np.any(recorded[np.minimum(position, len(recorded) - 1)] != models):
            raise RepositoryError(f"{record.id} changed models its provenance does not cover")
        # Permission first: without it nothing is retrained, so no dataset needs reading.
        function = resolve_function(provenance.function, context.training, context.allow_import)
        problems = [(int(m), provenance.updates[int(m)][0].problem()) for m in models]
        problems = [(m, p) for m, p in problems if p is not None]
        if problems:
            raise ProvenanceMismatchError(
                f"cannot retrain {len(problems)} model(s) of {record.id}, "
                f"first model {problems[0][0]}: {problems[0][1]}"
            )
        base = context.recover(record.base, models)
        retrained = _retrain(function, provenance, base, models, context)
        expected = stored[position]
        computed = retrained.hashes()
        bad = np.flatnonzero((computed != expected).any(axis=1))
        if len(bad):
            raise ProvenanceMismatchError(_mismatch_message(record, provenance, function, models[bad], retrained))
        return retrained


def read_document(objects: ObjectStore, record: VersionRecord) -> tuple[Provenance, np.ndarray]:
    """The provenance of ``record`` and the stored hashes ``[n_recorded, n_tensors]`` of its models."""
    ref = record.objects[0]
    cached = objects.cached_document(ref.key)
    if cached is not None:
        return cached
    try:
        content = objects.store.get(ref.key)
    except FileNotFoundError:
        raise RepositoryError(f"provenance object {ref.key} is missing from the store") from None
    if len(content) != ref.bytes or xxhash.xxh3_64_intdigest(content) != ref.checksum:
        raise IntegrityError(f"provenance object {ref.key} of {record.id} fails its checksum")
    try:
        document = json.loads(content)
        if not isinstance(document, dict) or set(document) != {"format", "format_version", "provenance", "hashes"}:
            raise ValueError("not a provenance document (its fields are format, format_version, provenance, hashes)")
        if document["format"] != _DOCUMENT or document["format_version"] != 1:
            raise ValueError(f"format {document['format']!r} {document['format_version']!r}")
        provenance = Provenance.from_json(document["provenance"])
        raw = np.frombuffer(base64.b64decode(document["hashes"], validate=True), dtype="<u8").astype(np.uint64)
    except (KeyError, TypeError, ValueError, MMPackError) as exc:
        raise RepositoryError(f"provenance object of {record.id} is malformed: {exc}") from None
    stored = _check_document(record, provenance, raw)
    objects.cache_document(ref.key, (provenance, stored))
    return provenance, stored


def _check_document(record: VersionRecord, provenance: Provenance, raw: np.ndarray) -> np.ndarray:
    """The stored hashes as ``[n_recorded, n_tensors]``, once the document agrees with its manifest:
    the models it records lie in the set and cover every model the manifest says changed, and it holds
    one hash per recorded model and tensor of the architecture."""
    if record.changes is None:
        raise RepositoryError(f"manifest of provenance version {record.id} lists no changed models")
    n_tensors = record.changes.masks.shape[1]  # the manifest's change list is decoded against the architecture
    recorded = provenance.models()
    if len(recorded) and recorded[-1] >= record.n_models:
        raise RepositoryError(
            f"provenance of {record.id} names model {int(recorded[-1])}; the version has {record.n_models} models"
        )
    uncovered = np.setdiff1d(record.changes.models, recorded)
    if len(uncovered):
        raise RepositoryError(
            f"{record.id} changed model {int(uncovered[0])} but its provenance has no entry for it "
            f"({len(uncovered)} such models)"
        )
    if raw.size != len(recorded) * n_tensors:
        raise RepositoryError(
            f"provenance of {record.id} holds {raw.size} hashes; {len(recorded)} models of {n_tensors} tensors "
            f"need {len(recorded) * n_tensors}"
        )
    return raw.reshape(len(recorded), n_tensors)


class DefaultPool:
    """The executor used when the caller names none: a spawned local process pool, started on first
    use and shared by every level of one recovery (starting workers that import torch costs seconds).
    Jobs of :data:`INLINE_MODELS` models or fewer run in this process instead."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None

    def pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            workers = os.cpu_count() or 1
            self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def _retrain(function: TrainingFunction, provenance: Provenance, base: ModelSet, models: np.ndarray,
             context: RebuildContext) -> ModelSet:
    """Retrain ``models`` (their base state in ``base``) in chunks on the executor, then reassemble."""
    executor = context.executor
    if isinstance(executor, DefaultPool):
        executor = executor.pool() if len(models) > INLINE_MODELS else None
    if executor is None:
        return _train_chunk(function, provenance, base.architecture.to_json(), dict(base.tensors), models)
    workers = getattr(executor, "_max_workers", None) or os.cpu_count() or 1
    chunks = np.array_split(np.arange(len(models)), min(len(models), workers))
    futures = [
        executor.submit(
            _train_chunk, function, provenance, base.architecture.to_json(),
            {n: t[torch.from_numpy(chunk)] for n, t in base.tensors.items()}, models[chunk],
        )
        for chunk in chunks
    ]
    parts = [f.result() for f in futures]
    tensors = {n: torch.cat([p.tensors[n] for p in parts]) for n in base.architecture.names}
    return ModelSet(base.architecture, tensors)


def _train_chunk(function: TrainingFunction, provenance: Provenance, architecture: dict[str, Any],
                 tensors: dict[str, torch.Tensor], models: np.ndarray) -> ModelSet:
    """One worker's share: read and check the datasets, train, return the models (picklable, top-level)."""
    arch = Architecture.from_json(architecture)
    base = ModelSet(arch, tensors)
    refs = [provenance.updates[int(m)] for m in models]
    datasets = [np.load(io.BytesIO(ref.read()), allow_pickle=False) for ref, _ in refs]
    kinds = [kind for _, kind in refs]
    result = function(base, datasets, kinds, dict(provenance.config), np.asarray(models))
    if not isinstance(result, ModelSet) or result.architecture.difference(arch) is not None or len(result) != len(base):
        raise ProvenanceError(
            f"training function {provenance.function} returned something other than the trained models"
        )
    return result


def _mismatch_message(record: VersionRecord, provenance: Provenance, function: TrainingFunction,
                      bad: np.ndarray, retrained: ModelSet) -> str:
    causes = []
    differences = provenance.environment_differences()
    if differences:
        causes.append("environment differs from the recorded one (" + "; ".join(differences) + ")")
    try:
        if source_hash(function) != provenance.source_hash:
            causes.append(f"training function source changed since the version was saved ({provenance.function})")
    except ProvenanceError as exc:
        causes.append(str(exc))
    if not causes:
        causes.append("training is not deterministic for these models (same environment, source and data)")
    shown = ", ".join(str(int(m)) for m in bad[:10]) + (" ..." if len(bad) > 10 else "")
    return (
        f"retraining {len(bad)} model(s) of {record.id} did not reproduce the saved weights "
        f"(models {shown}); likely cause: {'; '.join(causes)}"
    )

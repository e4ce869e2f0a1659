"""Update: only the changed tensors of changed models, found by per-(model, tensor) hashes (section 3.3).

Saving compares the new hashes with the base version's stored hash table and
never reads the base's parameters. The data objects use the rows layout: the
changed rows of each tensor, their model ids, and their hash-table rows; a
version of many changed models is cut into shards by bytes, each holding the
changed models of one range.
"""

from __future__ import annotations

import base64

import numpy as np

from mmpack import packing
from mmpack.approaches.advisor import CostModel, Estimate
from mmpack.approaches.base import Approach, SaveRequest, Stored, rows_of, shard_ranges, shard_ref, table_object
from mmpack.architecture import Architecture
from mmpack.errors import IntegrityError, RepositoryError
from mmpack.fileformat import (
    ROWS,
    Header,
    Tail,
    check_padding,
    encode_rows,
    image_pin,
    read_rows,
    verify_rows,
)
from mmpack.modelset import ModelSet
from mmpack.objects import ObjectStore
from mmpack.records import Changes, ObjectRef, Shard, VersionRecord

MODELS_KEY = "mmpack.models"  # header metadata of an object of changed models: their ids in the set


def encode_models(models: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(models, dtype="<u4").tobytes()).decode()


def decode_models(text: str | None) -> np.ndarray | None:
    """The model ids an object of changed models states (None if it states none, or garbage)."""
    try:
        if text is None:
            return None
        return np.frombuffer(base64.b64decode(text, validate=True), dtype="<u4").astype(np.int64)
    except ValueError:
        return None


class Update(Approach):
    """Deltas against a base version: little storage, recovery resolved across the chain."""

    name = "update"
    delta = True

    def save(self, objects: ObjectStore, request: SaveRequest) -> Stored:
        hashes = request.resolved_hashes()
        changed = request.changed()  # row i: model request.first + i
        local = Changes.from_mask(changed)
        changes = Changes(local.models + request.first, local.masks)
        details = dict(request.compression_details())
        reference = None
        if request.compression is not None and request.compression.xor and request.xor_reference is not None:
            # XOR against the chain's full version: every XOR piece then decodes from two reads.
            reference_id, fetch = request.xor_reference
            reference = fetch(changes.models)
            details["xor_base"] = reference_id
        if not request.subset:  # format 1: one object holding the whole set's table
            image, header = encode_rows(request.models, changed, hashes, None, request.compression, reference)
            refs = [_put(objects, image, header)]
        else:  # objects of the changed models alone: their tables grow with the change
            refs = []
            sizes = local.masks @ np.array([s.nbytes for s in request.models.architecture.tensors], np.int64)
            groups = shard_ranges(len(local.models), sizes, request.shard_bytes)
            if not len(local.models) and request.sliced:
                groups = []  # a slice without changes needs no shard
            for g, (a, b) in enumerate(groups):
                rows = local.models[a:b]
                low = 0 if g == 0 else int(rows[0])
                high = len(request.models) if g == len(groups) - 1 else int(local.models[groups[g + 1][0]])
                part = None if reference is None else reference.select(np.arange(a, b))
                # The object says which models of the set it holds: its header checksum binds them.
                image, header = encode_rows(request.models.select(rows), local.masks[a:b], hashes[rows],
                                            {MODELS_KEY: encode_models(changes.models[a:b])}, request.compression,
                                            part)
                ref = _put(objects, image, header)
                refs.append(shard_ref(ref.key, header, ref.pin, request.first + low, high - low))
        if request.table_object:  # cut as a full version of the range would be
            model_bytes = np.int64(request.models.architecture.nbytes_per_model)
            for a, b in shard_ranges(len(request.models), model_bytes, request.shard_bytes):
                part = request.models if (a, b) == (0, len(request.models)) else rows_of(request.models, a, b)
                refs.append(table_object(objects, part, hashes[a:b], request.first + a))
        return Stored(refs, changes, details)

    def estimate(self, request: SaveRequest, model: CostModel) -> Estimate | None:
        if request.base is None:
            return None
        changed = request.changed()
        raw = int(changed.sum(axis=0) @ model.row_bytes)
        stored = model.stored_bytes(raw) + model.table_bytes + 4 * int(changed.sum())
        # Recovery opens every object of the chain plus this one and decodes what is compressed;
        # XOR pieces are applied to reference rows the full version's chunks already yield.
        decoded = model.chain_decoded_bytes() + (raw if request.compression is not None else 0)
        return Estimate(stored, model.recover_seconds(len(model.chain) + 1, decoded))

    def locate(self, record: VersionRecord, models: np.ndarray, tensors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Each shard stores, per tensor, the rows of its range's changed models in ascending model
        # order: exactly the record's change list, so its ranks give the rows without reading the
        # objects' own row indexes (``repo.verify`` checks that both agree).
        changes = record.changes
        at = np.searchsorted(changes.models, models)
        listed = at < len(changes.models)
        listed[listed] = changes.models[at[listed]] == models[listed]
        if listed.all():
            listed = changes.masks[at, tensors]
        shards = record.shards
        firsts = np.array([s.first for s in shards], np.int64)
        stops = np.array([s.stop for s in shards], np.int64)
        holder = np.searchsorted(firsts, models, side="right") - 1
        if listed.all():
            listed = (holder >= 0) & (models < stops[np.maximum(holder, 0)])
        if not listed.all():
            k = int(np.flatnonzero(~listed)[0])
            raise IntegrityError(f"{record.id} did not write model {int(models[k])} tensor #{int(tensors[k])}")
        ranks = np.cumsum(changes.masks, axis=0) - 1
        rows = ranks[at, tensors]
        if len(shards) > 1:  # rows of the changed models before a shard's range lie in other shards
            begins = np.searchsorted(changes.models, firsts)
            before = np.vstack([np.zeros((1, changes.masks.shape[1]), np.int64), ranks + 1])[begins]
            rows = rows - before[holder, tensors]
        return np.array([s.index for s in shards], np.int64)[holder], rows

    def check_object(self, record: VersionRecord, shard: Shard, header: Header, tail: Tail) -> None:
        # Two shapes: the changed models of the shard's range alone (their own ids 0..count-1 in the
        # row index, the set's ids in the header), or, as format 1 wrote them, the whole set (model
        # ids in the row index, the whole table).
        if header.layout.kind != ROWS:
            raise RepositoryError(f"{record.describe()} names an object that holds a full set, not its changes")
        changes = record.changes
        low, high = np.searchsorted(changes.models, [shard.first, shard.stop])
        models, masks = changes.models[low:high], changes.masks[low:high]
        whole = (header.n_models == record.n_models and shard.count == record.n_models
                 and MODELS_KEY not in header.metadata)
        if not whole and header.n_models != len(models):
            raise RepositoryError(f"{record.describe()} names an object of {header.n_models} models")
        self.check_header(record, header.n_models, header)
        if not whole and not np.array_equal(decode_models(header.metadata.get(MODELS_KEY)), models):
            raise RepositoryError(f"the object of {record.describe()} holds other models than its change list names")
        for j, ids in enumerate(tail.row_index):
            expected = models[masks[:, j]] if whole else np.flatnonzero(masks[:, j])
            if not np.array_equal(ids, expected):
                raise RepositoryError(
                    f"the object of {record.describe()} holds other rows of tensor #{j} than its manifest lists"
                )

    def own_hashes(self, objects: ObjectStore, record: VersionRecord, shard: Shard,
                   tail: Tail | None) -> tuple[np.ndarray, np.ndarray]:
        if len(tail.table) == record.n_models and shard.count == record.n_models:  # the whole table (format 1)
            return np.arange(record.n_models), tail.table
        low, high = np.searchsorted(record.changes.models, [shard.first, shard.stop])
        return record.changes.models[low:high], tail.table

    def check(self, objects: ObjectStore, record: VersionRecord) -> None:
        for shard in record.shards:
            ref = shard.ref
            with objects.reader(ref) as (source, header):
                tail = objects.tail(ref, (source, header))
                self.check_object(record, shard, header, tail)
                check_padding(source, header)
                index = tail.row_index
                tensors = np.concatenate([np.full(len(ids), j) for j, ids in enumerate(index)])
                models = np.concatenate(index)
                rows = np.concatenate([np.arange(len(ids)) for ids in index])
                scratch = [np.empty(count * s.nbytes, np.uint8)
                           for count, s in zip(header.layout.rows, header.architecture.tensors)]
                computed = read_rows(source, header, tensors, rows, scratch, rows)
                if header.layout.chunking is None or header.layout.chunking.delta == "none":
                    # XOR deltas decode here, but hash to the table only with their references;
                    # recovering the version (verify does it next) checks those.
                    verify_rows(models, tensors, computed, tail.table[models, tensors], f"object {ref.key}")
        covered = sum(int(np.count_nonzero((record.changes.models >= s.first) & (record.changes.models < s.stop)))
                      for s in record.shards)
        if covered != len(record.changes.models):
            raise RepositoryError(f"{record.describe()} changed models that none of its shards holds")


def empty_object(objects: ObjectStore, architecture: Architecture, n_models: int) -> ObjectRef:
    """Write the object of a delta that changed nothing: no models, no rows (as one-object saves
    write it), for a version of ``n_models`` models."""
    empty = ModelSet._trusted(architecture, {s.name: packing.empty_stacked(0, s) for s in architecture.tensors}, 0)
    width = len(architecture)
    image, header = encode_rows(empty, np.zeros((0, width), bool), np.zeros((0, width), np.uint64),
                                {MODELS_KEY: encode_models(np.zeros(0, np.int64))})
    ref = _put(objects, image, header)
    return ObjectRef(ref.key, ref.bytes, ref.checksum, ref.pin, 0, n_models)


def _put(objects: ObjectStore, image: np.ndarray, header: Header) -> ObjectRef:
    key = objects.new_key()
    objects.put(key, image)
    return ObjectRef(key, header.file_size, header.header_hash, image_pin(image, header))

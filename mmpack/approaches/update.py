"""Update: only the changed tensors of changed models, found by per-(model, tensor) hashes (section 3.3).

Saving compares the new hashes with the base version's stored hash table and
never reads the base's parameters. The data object uses the rows layout:
the changed rows of each tensor, their model ids, and the full hash table of
the new version (what the next update diffs against).
"""

from __future__ import annotations

import base64
from dataclasses import replace

import numpy as np

from mmpack.approaches.advisor import CostModel, Estimate
from mmpack.approaches.base import Approach, SaveRequest, Stored, table_object
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
from mmpack.objects import ObjectStore
from mmpack.records import Changes, ObjectRef, VersionRecord

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
        changed = request.changed()
        changes = Changes.from_mask(changed)
        details = dict(request.compression_details())
        reference = None
        if request.compression is not None and request.compression.xor and request.xor_reference is not None:
            # XOR against the chain's full version: every XOR piece then decodes from two reads.
            reference_id, fetch = request.xor_reference
            reference = fetch(changes.models)
            details["xor_base"] = reference_id
        if request.subset:  # an object of the changed models alone: its table grows with the change
            # The object says which models of the set it holds: its header checksum binds them.
            image, header = encode_rows(request.models.select(changes.models), changes.masks, hashes[changes.models],
                                        {MODELS_KEY: encode_models(changes.models)}, request.compression, reference)
        else:
            image, header = encode_rows(request.models, changed, hashes, None, request.compression, reference)
        key = objects.new_key()
        objects.put(key, image)
        refs = [ObjectRef(key, header.file_size, header.header_hash, image_pin(image, header))]
        if request.table_object:
            refs.append(table_object(objects, request.models, hashes))
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

    def locate(self, record: VersionRecord, models: np.ndarray, tensors: np.ndarray) -> np.ndarray:
        # The object stores, per tensor, the rows of the changed models in ascending model
        # order: exactly the manifest's change list, so its ranks give the rows without
        # reading the object's own row index (``repo.verify`` checks that both agree).
        changes = record.changes
        at = np.searchsorted(changes.models, models)
        listed = at < len(changes.models)
        listed[listed] = changes.models[at[listed]] == models[listed]
        if listed.all():
            listed = changes.masks[at, tensors]
        if not listed.all():
            k = int(np.flatnonzero(~listed)[0])
            raise IntegrityError(f"{record.id} did not write model {int(models[k])} tensor #{int(tensors[k])}")
        ranks = np.cumsum(changes.masks, axis=0) - 1
        return ranks[at, tensors]

    def check_object(self, record: VersionRecord, header: Header, tail: Tail) -> None:
        # Two shapes: the changed models alone (their own ids 0..count-1 in the row index), or,
        # as format 1 wrote them, the whole set (model ids in the row index, the whole table).
        if header.layout.kind != ROWS:
            raise RepositoryError(f"{record.describe()} names an object that holds a full set, not its changes")
        changes = record.changes
        whole = header.n_models == record.n_models
        if not whole and header.n_models != len(changes.models):
            raise RepositoryError(f"{record.describe()} names an object of {header.n_models} models")
        super().check_object(replace(record, n_models=header.n_models), header, tail)
        if not whole and not np.array_equal(decode_models(header.metadata.get(MODELS_KEY)), changes.models):
            raise RepositoryError(f"the object of {record.describe()} holds other models than its change list names")
        for j, ids in enumerate(tail.row_index):
            expected = changes.models[changes.masks[:, j]] if whole else np.flatnonzero(changes.masks[:, j])
            if not np.array_equal(ids, expected):
                raise RepositoryError(
                    f"the object of {record.describe()} holds other rows of tensor #{j} than its manifest lists"
                )

    def own_hashes(
        self, objects: ObjectStore, record: VersionRecord, tail: Tail | None
    ) -> tuple[np.ndarray, np.ndarray]:
        if len(tail.table) == record.n_models:  # the whole set's table (format 1)
            return np.arange(record.n_models), tail.table
        return record.changes.models, tail.table

    def check(self, objects: ObjectStore, record: VersionRecord) -> None:
        ref = record.objects[0]
        with objects.reader(ref) as (source, header):
            tail = objects.tail(ref, (source, header))
            self.check_object(record, header, tail)
            check_padding(source, header)
            index = tail.row_index
            tensors = np.concatenate([np.full(len(ids), j) for j, ids in enumerate(index)])
            models = np.concatenate(index)
            rows = np.concatenate([np.arange(len(ids)) for ids in index])
            scratch = [
                np.empty(count * s.nbytes, np.uint8)
                for count, s in zip(header.layout.rows, header.architecture.tensors)
            ]
            computed = read_rows(source, header, tensors, rows, scratch, rows)
            if header.layout.chunking is None or header.layout.chunking.delta == "none":
                # XOR deltas decode here, but hash to the table only with their references;
                # recovering the version (verify does it next) checks those.
                verify_rows(models, tensors, computed, tail.table[models, tensors], f"object {ref.key}")

"""Baseline: every version holds the full set in stacked objects, one per shard (the paper's section 3.2)."""

from __future__ import annotations

from concurrent.futures import Future

import numpy as np

from mmpack.approaches.advisor import CostModel, Estimate
from mmpack.approaches.base import Approach, SaveRequest, Stored, rows_of, shard_metadata, shard_ranges, shard_ref
from mmpack.errors import RepositoryError
from mmpack.fileformat import (
    STACKED,
    Header,
    Tail,
    check_padding,
    encode_header,
    encode_image,
    image_pin,
    read_modelset,
    table_pin,
    write_body,
)
from mmpack.objects import ObjectStore
from mmpack.records import Shard, VersionRecord
from mmpack.store import SizedWriter


class Baseline(Approach):
    """Full snapshots: fastest recovery, most storage."""

    name = "baseline"

    def save(self, objects: ObjectStore, request: SaveRequest) -> Stored:
        ms = request.models
        refs = []
        ranges = shard_ranges(len(ms), np.int64(ms.architecture.nbytes_per_model), request.shard_bytes)
        for a, b in ranges:
            part = ms if (a, b) == (0, len(ms)) else rows_of(ms, a, b)
            first = request.first + a
            metadata = shard_metadata(first)
            key = objects.new_key()
            if request.compression is not None:
                table = request.resolved_hashes()[a:b]
                image, header = encode_image(part, metadata, request.compression, table)
                objects.put(key, image)
                pin = image_pin(image, header)
            else:
                prefix, header = encode_header(ms.architecture, b - a, metadata)
                hashes = request.hashes if len(ranges) == 1 else rows_when_done(request.hashes, a, b)
                objects.put(key, SizedWriter(header.file_size,
                                             lambda f, p=prefix, h=header, m=part, t=hashes: write_body(f, p, h, m, t)))
                pin = table_pin(request.resolved_hashes()[a:b])
            refs.append(shard_ref(key, header, pin, first, b - a))
        return Stored(refs, None, request.compression_details())

    def estimate(self, request: SaveRequest, model: CostModel) -> Estimate:
        # One object per shard; a full recovery decodes all of it when it is compressed.
        decoded = model.full_raw_bytes if request.compression is not None else 0
        shards = -(-model.full_raw_bytes // request.shard_bytes) if request.shard_bytes else 1
        return Estimate(model.stored_bytes(model.full_raw_bytes) + model.table_bytes,
                        model.recover_seconds(max(1, shards), decoded))

    def locate(self, record: VersionRecord, models: np.ndarray, tensors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # stacked layout: row i of every tensor of a shard is its model first + i
        shards = record.shards
        if len(shards) == 1:
            return np.full(len(models), shards[0].index, np.int64), models - shards[0].first
        firsts = np.array([s.first for s in shards], np.int64)
        at = np.searchsorted(firsts, models, side="right") - 1
        return np.array([s.index for s in shards], np.int64)[at], models - firsts[at]

    def check_object(self, record: VersionRecord, shard: Shard, header: Header, tail: Tail) -> None:
        if header.layout.kind != STACKED:
            raise RepositoryError(f"{record.describe()} names an object that holds only some rows")
        super().check_object(record, shard, header, tail)

    def check(self, objects: ObjectStore, record: VersionRecord) -> None:
        for shard in record.shards:
            with objects.reader(shard.ref) as (source, header):
                self.check_object(record, shard, header, objects.tail(shard.ref, (source, header)))
                check_padding(source, header)
                read_modelset(source, header, None, verify=True)


def rows_when_done(hashes: np.ndarray | Future, a: int, b: int) -> np.ndarray | Future:
    """Rows ``a`` to ``b - 1`` of a hash table that may still be computing (a future of them, then):
    a shard's writer needs its table only after its tensors, so hashing overlaps the writes."""
    if not isinstance(hashes, Future):
        return hashes[a:b]
    rows: Future = Future()

    def done(f: Future) -> None:
        error = f.exception()
        if error is not None:
            rows.set_exception(error)
        else:
            rows.set_result(f.result()[a:b])

    hashes.add_done_callback(done)
    return rows

"""Baseline: every version holds the full set in one stacked object (the paper's section 3.2)."""

from __future__ import annotations

import numpy as np

from mmpack.approaches.advisor import CostModel, Estimate
from mmpack.approaches.base import Approach, SaveRequest, Stored
from mmpack.fileformat import Header, Reader, check_padding, encode_header, encode_image, read_modelset, write_body
from mmpack.records import ObjectRef, VersionRecord
from mmpack.store import ObjectStore, SizedWriter


class Baseline(Approach):
    """Full snapshots: fastest recovery, most storage."""

    name = "baseline"

    def save(self, objects: ObjectStore, request: SaveRequest) -> Stored:
        ms = request.models
        key = objects.new_key()
        if request.compression is not None:
            image, header = encode_image(ms, None, request.compression, request.resolved_hashes())
            objects.put(key, image)
        else:
            prefix, header = encode_header(ms.architecture, len(ms), {})
            objects.put(key, SizedWriter(header.file_size, lambda f: write_body(f, prefix, header, ms, request.hashes)))
        return Stored([ObjectRef(key, header.file_size, header.header_hash)], None, request.compression_details())

    def estimate(self, request: SaveRequest, model: CostModel) -> Estimate:
        # One object; a full recovery decodes all of it when it is compressed.
        decoded = model.full_raw_bytes if request.compression is not None else 0
        return Estimate(model.stored_bytes(model.full_raw_bytes) + model.table_bytes, model.recover_seconds(1, decoded))

    def locate(
        self,
        objects: ObjectStore,
        record: VersionRecord,
        opened: tuple[Reader, Header],
        models: np.ndarray,
        tensors: np.ndarray,
    ) -> np.ndarray:
        return models  # stacked layout: row i of every tensor is model i

    def check(self, objects: ObjectStore, record: VersionRecord) -> None:
        with objects.reader(record.objects[0]) as (source, header):
            check_padding(source, header)
            read_modelset(source, header, None, verify=True)

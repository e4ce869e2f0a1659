"""Baseline: every version holds the full set in one stacked object (the paper's section 3.2)."""

from __future__ import annotations

import numpy as np

from mmpack.approaches.advisor import CostModel, Estimate
from mmpack.approaches.base import Approach, SaveRequest, Stored
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
from mmpack.records import ObjectRef, VersionRecord
from mmpack.store import SizedWriter


class Baseline(Approach):
    """Full snapshots: fastest recovery, most storage."""

    name = "baseline"

    def save(self, objects: ObjectStore, request: SaveRequest) -> Stored:
        ms = request.models
        key = objects.new_key()
        if request.compression is not None:
            image, header = encode_image(ms, None, request.compression, request.resolved_hashes())
            objects.put(key, image)
            pin = image_pin(image, header)
        else:
            prefix, header = encode_header(ms.architecture, len(ms), {})
            objects.put(key, SizedWriter(header.file_size, lambda f: write_body(f, prefix, header, ms, request.hashes)))
            pin = table_pin(request.resolved_hashes())
        return Stored([ObjectRef(key, header.file_size, header.header_hash, pin)], None, request.compression_details())

    def estimate(self, request: SaveRequest, model: CostModel) -> Estimate:
        # One object; a full recovery decodes all of it when it is compressed.
        decoded = model.full_raw_bytes if request.compression is not None else 0
        return Estimate(model.stored_bytes(model.full_raw_bytes) + model.table_bytes, model.recover_seconds(1, decoded))

    def locate(self, record: VersionRecord, models: np.ndarray, tensors: np.ndarray) -> np.ndarray:
        return models  # stacked layout: row i of every tensor is model i

    def check_object(self, record: VersionRecord, header: Header, tail: Tail) -> None:
        if header.layout.kind != STACKED:
            raise RepositoryError(f"{record.describe()} names an object that holds only some rows")
        super().check_object(record, header, tail)

    def check(self, objects: ObjectStore, record: VersionRecord) -> None:
        ref = record.objects[0]
        with objects.reader(ref) as (source, header):
            self.check_object(record, header, objects.tail(ref, (source, header)))
            check_padding(source, header)
            read_modelset(source, header, None, verify=True)

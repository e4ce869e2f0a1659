"""Baseline: every version holds the full set in one stacked object (the paper's section 3.2)."""

from __future__ import annotations

import numpy as np

from mmpack.approaches.base import Approach, SaveRequest, Stored
from mmpack.fileformat import Header, Reader, encode_header, write_body
from mmpack.records import ObjectRef, VersionRecord
from mmpack.store import ObjectStore, SizedWriter


class Baseline(Approach):
    """Full snapshots: fastest recovery, most storage."""

    name = "baseline"

    def save(self, objects: ObjectStore, request: SaveRequest) -> Stored:
        ms = request.models
        prefix, header = encode_header(ms.architecture, len(ms), {})
        key = objects.new_key()
        objects.put(key, SizedWriter(header.file_size, lambda f: write_body(f, prefix, header, ms, request.hashes)))
        return Stored([ObjectRef(key, header.file_size, header.header_hash)], None)

    def locate(
        self,
        objects: ObjectStore,
        record: VersionRecord,
        opened: tuple[Reader, Header],
        models: np.ndarray,
        tensors: np.ndarray,
    ) -> np.ndarray:
        return models  # stacked layout: row i of every tensor is model i

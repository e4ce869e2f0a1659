"""Hostile model-set files: well-formed ones that are cheap to write and costly to read, and forged ones.

``make_all(directory)`` writes every case and returns, per name, the file,
the read to run (``indices`` or None) and what the read must give: "ok"
(verified data) or "typed" (an ``MMPackError``). tests/test_hostile_memory.py
reads each in a child with a capped address space; bench/hostile_memory.py
reports the peak memory of each read.
"""

from __future__ import annotations

import io
import json
import os
import struct
from dataclasses import dataclass

import numpy as np
import torch

import mmpack
from mmpack import _native
from mmpack.architecture import MAX_TENSORS, Architecture, TensorSpec
from mmpack.fileformat import encode_header


@dataclass(frozen=True)
class Case:
    path: str
    indices: list[int] | None
    expect: str  # "ok" or "typed"


def _write_stacked(path: str, specs: list[TensorSpec], n_models: int, fill: int = 0) -> None:
    """A valid stacked file whose rows all hold byte ``fill``, written without building a ModelSet."""
    arch = Architecture(tuple(specs), None)
    prefix, header = encode_header(arch, n_models, {})
    columns = []
    with open(path, "wb") as f:
        f.write(prefix)
        position = 0
        for spec, offset in zip(arch.tensors, header.layout.tensor_offsets):
            f.write(bytes(offset - position))
            rows = np.full(n_models * spec.nbytes, fill, np.uint8)
            f.write(rows.tobytes())
            hashes = np.empty(n_models, np.uint64)
            _native.hash_rows(rows, spec.nbytes, hashes)
            columns.append(hashes)
            position = offset + len(rows)
        f.write(bytes(header.layout.hashes_offset - position))
        table = np.stack(columns, axis=1) if columns else np.empty((n_models, 0), np.uint64)
        f.write(np.ascontiguousarray(table, "<u8").tobytes())


def _resign(blob: bytes, edit) -> bytes:
    """``blob`` with its header JSON edited and its checksum (and padding) made consistent again."""
    version = struct.unpack_from("<I", blob, 8)[0]
    length = struct.unpack_from("<Q", blob, 16)[0]
    document = json.loads(blob[32 : 32 + length])
    edit(document)
    body = json.dumps(document, separators=(",", ":")).encode()
    data_start = -(-(32 + length) // 64) * 64
    prefix = struct.pack("<8sIIQQ", b"\x89MMPACK\n", version, 0, len(body), _native.xxh3_64(body)) + body
    return prefix + bytes(-len(prefix) % 64) + blob[data_start:]


def _small(compression=None) -> bytes:
    from mmpack.workloads import ffnn48, make_models

    buffer = io.BytesIO()
    mmpack.save(mmpack.ModelSet.from_modules(make_models(ffnn48, 4)), buffer, compression=compression)
    return buffer.getvalue()


def make_all(directory: str) -> dict[str, Case]:
    os.makedirs(directory, exist_ok=True)
    cases: dict[str, Case] = {}

    def path(name: str) -> str:
        return os.path.join(directory, f"{name}.mmpack")

    empty = [TensorSpec(f"t{j}", "buffer", torch.float32, (0,)) for j in range(4)]
    _write_stacked(path("zero-size-tall"), empty, 1_000_000)  # 32 MB, all of it hash table
    cases["zero-size tensors, 1M models"] = Case(path("zero-size-tall"), None, "ok")
    cases["zero-size tensors, 1M models, 2 picked"] = Case(path("zero-size-tall"), [999_999, 0], "ok")
    tiny = [TensorSpec(f"b{j}", "buffer", torch.bool if j == 0 else torch.uint8, (1,)) for j in range(8)]
    _write_stacked(path("one-byte-rows"), tiny, 400_000, fill=1)  # 3.2 MB of rows, 25.6 MB of hashes
    cases["one-byte tensors, 400k models"] = Case(path("one-byte-rows"), None, "ok")
    wide = [TensorSpec(f"t{j}", "buffer", torch.float32, (0,)) for j in range(MAX_TENSORS)]
    _write_stacked(path("zero-size-wide"), wide, 2)
    cases[f"{MAX_TENSORS:,} zero-size tensors (the limit)"] = Case(path("zero-size-wide"), None, "ok")
    one = _write_and_read(path("too-many-tensors"), wide[:1], 1)
    extra = [{"name": f"x{j}", "kind": "buffer", "dtype": "float32", "shape": [0]} for j in range(MAX_TENSORS)]
    with open(path("too-many-tensors"), "wb") as f:
        f.write(_resign(one, lambda d: d["architecture"]["tensors"].extend(extra)))
    cases[f"{MAX_TENSORS + 1:,} tensors"] = Case(path("too-many-tensors"), None, "typed")

    plain, packed = _small(), _small("zstd")
    forged = {
        "n_models 2**32-1 in a small file": _resign(plain, lambda d: d.update(n_models=2**32 - 1)),
        "shape of 2**39 x 2**39": _resign(
            plain, lambda d: d["architecture"]["tensors"][0].update(shape=[2**39, 2**39])
        ),
        "data_length of 1 TiB": _resign(plain, lambda d: d.update(data_length=2**40)),
        "compressed, chunk_rows 1 for 2**32-1 models": _resign(
            packed, lambda d: d["compression"]["chunk_rows"].__setitem__(0, 1) or d.update(n_models=2**32 - 1)
        ),
        "compressed, a frame declaring 1 TiB": _forge_frame(packed, 2**40),
        "compressed, a frame declaring 3 GiB": _forge_frame(packed, 3 << 30),
    }
    for k, (name, blob) in enumerate(forged.items()):
        with open(path(f"forged-{k}"), "wb") as f:
            f.write(blob)
        cases[name] = Case(path(f"forged-{k}"), None, "typed")
        cases[name + ", 1 picked"] = Case(path(f"forged-{k}"), [1], "typed")
    return cases


def _write_and_read(path: str, specs: list[TensorSpec], n_models: int) -> bytes:
    _write_stacked(path, specs, n_models)
    with open(path, "rb") as f:
        return f.read()


def _forge_frame(blob: bytes, declared: int) -> bytes:
    """``blob`` with the first zstd frame of its first tensor declaring ``declared`` bytes (same
    length: the 8-byte content size replaces the frame's own, and the bytes after it shift)."""
    import zstandard

    header = mmpack.fileformat.read_header(mmpack._io.FileReader(io.BytesIO(blob)))
    lengths = header.layout.chunking.lengths
    j = next(j for j, planes in enumerate(lengths) if planes and planes[0] > 16)
    at = header.data_start + header.layout.tensor_offsets[j]
    frame = blob[at : at + lengths[j][0]]
    body = frame[zstandard.frame_header_size(frame) :]
    new = struct.pack("<I", 0xFD2FB528) + bytes([0xE0 | (frame[4] & 0x04)]) + struct.pack("<Q", declared) + body
    new = (new + bytes(len(frame)))[: len(frame)]  # same stored length: the header stays valid
    return blob[:at] + new + blob[at + len(frame) :]

"""Compressed objects (format versions 2 and 3): round trips, partial reads, XOR deltas, damage, settings.

Tests that hold for both codecs run for each; version 3 internals are in test_rans.py.
"""

from __future__ import annotations

import io
import json
import struct

import numpy as np
import pytest
import torch
from helpers import CountingReader, ffnn_models, mixed_models, randomized_cnns
from hypothesis import given
from hypothesis import strategies as st
from test_fileformat import model_sets

import mmpack
from mmpack import (
    Compression,
    CompressionError,
    FormatError,
    IntegrityError,
    MMPackError,
    ModelSet,
    compression,
    fileformat,
)
from mmpack._io import FileReader

CODECS = ["rans", "zstd"]


def _compressed(ms, setting="zstd", **kwargs) -> bytes:
    buffer = io.BytesIO()
    mmpack.save(ms, buffer, compression=setting, **kwargs)
    return buffer.getvalue()


def _header(blob: bytes) -> fileformat.Header:
    return fileformat.read_header(FileReader(io.BytesIO(blob)))


@pytest.mark.parametrize(
    "build",
    [lambda: ffnn_models(30), lambda: randomized_cnns(4), lambda: mixed_models(5), lambda: ffnn_models(1)],
    ids=["ffnn48", "cnn-batchnorm", "fp16-bf16-fp64-int64", "one-model"],
)
@pytest.mark.parametrize("chunk_bytes", [64, 4096, compression.DEFAULT_CHUNK_BYTES])
@pytest.mark.parametrize("codec", CODECS)
def test_compressed_round_trip_through_a_path_whole_and_in_part(tmp_path, build, chunk_bytes, codec):
    ms = ModelSet.from_modules(build())
    path = tmp_path / "set.mmpack"
    mmpack.save(ms, path, compression=Compression(codec=codec, chunk_bytes=chunk_bytes), metadata={"k": "v"})
    assert mmpack.load(path).equal(ms)
    picks = [len(ms) - 1, 0, len(ms) // 2]
    assert mmpack.load(path, indices=picks).equal(ms.select(picks))
    assert mmpack.load(io.BytesIO(path.read_bytes()), indices=picks).equal(ms.select(picks))


def test_compressed_objects_are_version_2_or_3_and_uncompressed_stay_version_1():
    ms = ModelSet.from_modules(ffnn_models(20))
    plain, packed, coded = io.BytesIO(), _compressed(ms), _compressed(ms, "rans")
    mmpack.save(ms, plain)
    assert struct.unpack_from("<I", plain.getvalue(), 8)[0] == 1
    assert struct.unpack_from("<I", packed, 8)[0] == 2
    assert struct.unpack_from("<I", coded, 8)[0] == 3
    header = _header(packed)
    assert header.layout.chunking is not None and header.layout.chunking.delta == "none"
    assert header.layout.chunking.widths == (4,) * 7
    assert fileformat.encode(ms, compression=Compression(codec="zstd")).tobytes() == packed
    assert fileformat.encode(ms, compression=Compression()).tobytes() == coded  # rans is the default codec


@pytest.mark.parametrize("codec", CODECS)
def test_float_weights_compress_below_raw_and_below_plain_zstd(codec):
    import zstandard

    ms = ModelSet.from_modules(ffnn_models(300))
    raw = b"".join(t.numpy().tobytes() for t in ms.tensors.values())
    packed = _compressed(ms, codec)
    plain_zstd = len(zstandard.ZstdCompressor(level=3).compress(raw))
    assert len(packed) < 0.95 * len(raw)
    assert len(packed) < plain_zstd


@pytest.mark.parametrize("codec", CODECS)
def test_reading_one_model_decodes_only_the_chunks_that_hold_it(codec):
    ms = ModelSet.from_modules(ffnn_models(400))
    blob = _compressed(ms, Compression(codec=codec, chunk_bytes=16 * 1024))
    reader = CountingReader(blob)
    assert mmpack.load(reader, indices=[321]).equal(ms.select([321]))
    assert reader.bytes_read < 0.1 * len(blob)
    full = CountingReader(blob)
    mmpack.load(full)
    assert full.bytes_read >= len(blob) - 64


@pytest.mark.parametrize("codec", CODECS)
@given(model_sets(), st.integers(1, 300), st.data())
def test_any_model_set_round_trips_compressed(codec, ms, chunk_bytes, data):
    blob = _compressed(ms, Compression(codec=codec, chunk_bytes=chunk_bytes))
    assert mmpack.load(io.BytesIO(blob)).equal(ms)
    if len(ms):
        indices = data.draw(st.lists(st.integers(0, len(ms) - 1), max_size=6))
        assert mmpack.load(io.BytesIO(blob), indices=indices).equal(ms.select(indices))


@pytest.mark.parametrize("codec", CODECS)
@given(model_sets(), st.integers(0, 2**31), st.integers(0, 7))
def test_a_flipped_bit_never_yields_wrong_values(codec, ms, where, bit):
    blob = bytearray(_compressed(ms, Compression(codec=codec, chunk_bytes=64)))
    blob[where % len(blob)] ^= 1 << bit
    try:
        loaded = mmpack.load(io.BytesIO(bytes(blob)))
    except MMPackError:
        return
    assert loaded.equal(ms)  # a bit no decoder reads (a zstd frame's unused bits, a metadata value)


def test_a_corrupt_frame_is_an_integrity_error():
    ms = ModelSet.from_modules(ffnn_models(50))
    blob = bytearray(_compressed(ms))
    header = _header(bytes(blob))
    at = header.data_start + header.layout.tensor_offsets[1]  # fc2.weight: plane 0 is a zstd frame
    assert header.layout.chunking.lengths[1][0] < len(ms) * 48 * 48
    blob[at + 20 : at + 40] = bytes(20)
    with pytest.raises(IntegrityError):
        mmpack.load(io.BytesIO(bytes(blob)))


def _rewrite(blob: bytes, edit) -> bytes:
    """The object with its header edited (and checksummed again), at its own format version."""
    version = struct.unpack_from("<I", blob, 8)[0]
    length = struct.unpack_from("<Q", blob, 16)[0]
    document = json.loads(blob[32 : 32 + length])
    edit(document)
    body = json.dumps(document).encode()
    start = -(-(32 + length) // 64) * 64
    prefix = struct.pack("<8sIIQQ", b"\x89MMPACK\n", version, 0, len(body), mmpack._native.xxh3_64(body)) + body
    return prefix + bytes(-len(prefix) % 64) + blob[start:]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("compression"), "keys"),
        (lambda d: d["compression"].update(codec="lz4"), "unsupported codec"),
        (lambda d: d["compression"].update(transform="shuffle"), "unsupported codec"),
        (lambda d: d["compression"].update(delta="xor"), "XOR"),
        (lambda d: d["compression"].update(delta="add"), "unsupported delta"),
        (lambda d: d["compression"].update(level=3), "keys"),
        (lambda d: d["compression"]["chunk_rows"].__setitem__(0, 0), "chunk_rows"),
        (lambda d: d["compression"]["chunk_rows"].pop(), "chunk_rows"),
        (lambda d: d["compression"]["chunks"][0].pop(), "stored planes"),
        (lambda d: d["compression"]["chunks"][0].__setitem__(0, 10**9), "above its"),
        (lambda d: d["compression"]["chunks"][0].__setitem__(0, -1), "length -1"),
        (lambda d: d["compression"]["chunks"][1].__setitem__(0, d["compression"]["chunks"][1][0] - 1), "sections"),
    ],
)
def test_compression_headers_that_lie_are_rejected(edit, message):
    blob = _compressed(ModelSet.from_modules(ffnn_models(40)))
    with pytest.raises(FormatError, match=message):
        mmpack.load(io.BytesIO(_rewrite(blob, edit)))


@pytest.mark.parametrize("codec", CODECS)
def test_a_version_1_header_with_a_compression_key_is_rejected(codec):
    blob = _compressed(ModelSet.from_modules(ffnn_models(3)), codec)
    forged = bytearray(blob)
    forged[8:12] = struct.pack("<I", 1)
    with pytest.raises(FormatError, match="version 1 header"):
        mmpack.load(io.BytesIO(bytes(forged)))


@pytest.mark.parametrize("codec", CODECS)
def test_xor_rows_round_trip_against_their_reference(codec):
    base = ModelSet.from_modules(ffnn_models(40))
    tensors = {name: t.clone() for name, t in base.tensors.items()}
    for t in tensors.values():
        t[[3, 17, 30]] += 1e-3 * torch.randn_like(t[[3, 17, 30]])
    new = ModelSet(base.architecture, tensors)
    changed = new.hashes() != base.hashes()
    holders = np.flatnonzero(changed.any(axis=1))
    setting = Compression(codec=codec)
    image, header = fileformat.encode_rows(new, changed, new.hashes(), compression=setting,
                                           reference=base.select(holders))
    assert header.layout.chunking.delta == "xor"
    plain, _ = fileformat.encode_rows(new, changed, new.hashes(), compression=setting)
    assert len(image) < len(plain)  # fine-tuned rows share their high bytes with the reference
    source = FileReader(io.BytesIO(image.tobytes()))
    models = np.concatenate([np.flatnonzero(changed[:, j]) for j in range(changed.shape[1])])
    columns = np.concatenate([np.full(changed[:, j].sum(), j) for j in range(changed.shape[1])])
    stored = np.concatenate([np.arange(changed[:, j].sum()) for j in range(changed.shape[1])])
    out = {n: t.clone() for n, t in base.tensors.items()}  # the references in place
    views = [out[s.name].view(-1).view(torch.uint8).numpy() for s in base.architecture.tensors]
    request = fileformat.RowRequest(source, header, columns, stored, models, xor=True)
    hashes = fileformat.read_rows_many([request], views)[0]
    assert ModelSet(base.architecture, out).equal(new)
    assert np.array_equal(hashes, new.hashes()[models, columns])


def test_xor_requests_need_a_compressed_object():
    ms = ModelSet.from_modules(ffnn_models(2))
    blob = io.BytesIO()
    mmpack.save(ms, blob)
    blob.seek(0)
    source = FileReader(blob)
    header = fileformat.read_header(source)
    one = np.zeros(1, np.int64)
    with pytest.raises(FormatError, match="XOR"):
        fileformat.read_rows_many([fileformat.RowRequest(source, header, one, one, one, xor=True)],
                                  [np.empty(s.nbytes * 2, np.uint8) for s in header.architecture.tensors])


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("lz4", "unknown compression 'lz4'"),
        (3, "unknown compression"),
        (Compression, "unknown compression"),
    ],
)
def test_unknown_compression_is_a_typed_error(setting, message):
    with pytest.raises(CompressionError, match=message):
        mmpack.save(ModelSet.from_modules(ffnn_models(2)), io.BytesIO(), compression=setting)


def test_bad_compression_settings_are_typed_errors():
    with pytest.raises(CompressionError, match="unknown codec"):
        Compression(codec="gzip")
    with pytest.raises(CompressionError, match="level"):
        Compression(codec="zstd", level=0)
    with pytest.raises(CompressionError, match="level is a zstd setting"):
        Compression(level=9)
    with pytest.raises(CompressionError, match="chunk_bytes"):
        Compression(chunk_bytes=0)
    with pytest.raises(CompressionError, match="xor"):
        Compression(xor="yes")
    assert isinstance(CompressionError("x"), ValueError)
    assert compression.resolve("none") is None and compression.resolve("zstd") == Compression(codec="zstd")
    assert compression.resolve("rans") == Compression()
    assert Compression().describe() == "rans" and Compression(codec="zstd", level=9).describe() == "zstd-9"
    for setting in (Compression(), Compression(codec="zstd"), Compression(codec="zstd", level=9)):
        assert Compression.described(setting.describe()) == setting


def test_missing_zstandard_is_explained(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_zstd(name, *args, **kwargs):
        if name == "zstandard":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_zstd)
    monkeypatch.setattr(compression, "_local", type(compression._local)())
    with pytest.raises(CompressionError, match="pip install zstandard"):
        mmpack.save(ModelSet.from_modules(ffnn_models(2)), io.BytesIO(), compression="zstd")


def test_element_widths_follow_the_dtype():
    assert compression.element_width(torch.float32) == 4
    assert compression.element_width(torch.bfloat16) == 2
    assert compression.element_width(torch.complex64) == 4
    assert compression.element_width(torch.bool) == 1
    assert compression.rows_per_chunk(9216, 262144) == 28
    assert compression.rows_per_chunk(0, 262144) == 262144


@pytest.mark.parametrize("codec", CODECS)
def test_compressed_decoding_is_safe_from_many_threads(tmp_path, codec):
    from concurrent.futures import ThreadPoolExecutor

    ms = ModelSet.from_modules(ffnn_models(120))
    path = tmp_path / "set.mmpack"
    mmpack.save(ms, path, compression=Compression(codec=codec, chunk_bytes=8192))

    def load(k: int) -> bool:
        picks = [k % 120, (k * 7) % 120]
        return mmpack.load(path, indices=picks).equal(ms.select(picks)) and mmpack.load(path).equal(ms)

    with ThreadPoolExecutor(6) as pool:
        assert all(pool.map(load, range(12)))


@pytest.mark.parametrize("codec", CODECS)
def test_whole_chunks_decode_in_place_and_partial_ones_through_scratch(codec):
    ms = ModelSet.from_modules(ffnn_models(60))
    blob = _compressed(ms, Compression(codec=codec, chunk_bytes=9216 * 10))  # fc2/fc3 weights: 10 rows per chunk
    for picks in (list(range(10, 40)), list(range(10, 40))[::-1], list(range(5, 45)), [30, 31, 32, 10, 11]):
        assert mmpack.load(io.BytesIO(blob), indices=picks).equal(ms.select(picks))


@pytest.mark.parametrize("codec", CODECS)
def test_a_forged_row_count_cannot_make_the_reader_build_a_huge_table(codec):
    blob = _compressed(ModelSet.from_modules(ffnn_models(3)), codec)
    forged = _rewrite(blob, lambda d: d["compression"]["chunk_rows"].__setitem__(0, 1) or d.update(n_models=2**32 - 1))
    with pytest.raises(FormatError):
        mmpack.load(io.BytesIO(forged))

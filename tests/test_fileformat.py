"""The one-file format: round trips, partial reads, and every kind of damage."""

from __future__ import annotations

import io
import os
import pickle
import struct
import sys
import tempfile

import numpy as np
import pytest
import torch
from helpers import CountingReader, ffnn_models, mixed_models, randomized_cnns
from hypothesis import given, settings
from hypothesis import strategies as st

import mmpack
from mmpack import FormatError, IntegrityError, MMPackError, ModelSet, UnsupportedFormatVersionError, fileformat
from mmpack.architecture import Architecture, TensorSpec


def _bytes_of(models) -> bytes:
    buffer = io.BytesIO()
    mmpack.save(models, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "build",
    [lambda: ffnn_models(9), lambda: randomized_cnns(4), lambda: mixed_models(3), lambda: ffnn_models(1)],
    ids=["ffnn48", "cnn-batchnorm", "fp16-bf16-fp64-int64", "one-model"],
)
def test_round_trip_through_a_path(tmp_path, build):
    models = build()
    path = tmp_path / "set.mmpack"
    mmpack.save(models, path, metadata={"cycle": "3"})
    loaded = mmpack.load(path)
    assert loaded.equal(ModelSet.from_modules(models))
    assert os.listdir(tmp_path) == ["set.mmpack"]


def test_five_thousand_ffnn48_models_round_trip_within_the_size_budget(tmp_path):
    ms = ModelSet.from_modules(ffnn_models(5000))
    path = tmp_path / "big.mmpack"
    mmpack.save(ms, str(path))
    assert os.path.getsize(path) <= 1.005 * ms.nbytes + 64 * 1024
    assert mmpack.load(path).equal(ms)
    assert mmpack.load(path, indices=[4999, 0]).equal(ms.select([4999, 0]))


def test_save_accepts_modelset_or_modules_and_writes_identical_bytes():
    models = randomized_cnns(3)
    assert _bytes_of(models) == _bytes_of(ModelSet.from_modules(models))


def test_loading_selected_models_reads_only_their_bytes():
    ms = ModelSet.from_modules(ffnn_models(200))
    data = _bytes_of(ms)
    header = fileformat.read_header(mmpack._io.FileReader(io.BytesIO(data)))
    per_model = ms.architecture.nbytes_per_model + 8 * len(ms.architecture)  # rows + their hashes

    reader = CountingReader(data)
    assert mmpack.load(reader, indices=[17]).equal(ms.select([17]))
    assert reader.bytes_read == header.data_start + per_model

    reader = CountingReader(data)
    assert mmpack.load(reader, indices=[150, 3, 4, 5, 3]).equal(ms.select([150, 3, 4, 5, 3]))
    assert reader.bytes_read == header.data_start + 4 * per_model  # 4 distinct models, each read once


def test_a_full_load_is_a_few_large_reads_of_each_byte_once():
    ms = ModelSet.from_modules(ffnn_models(300))
    data = _bytes_of(ms)
    reader = CountingReader(data)
    assert mmpack.load(reader).equal(ms)
    assert reader.bytes_read == len(data)
    assert reader.reads <= 2 + 2 * (len(ms.architecture) + 1)  # preamble, header, sections and padding


def test_file_objects_are_read_from_their_current_position():
    ms = ModelSet.from_modules(mixed_models(2))
    buffer = io.BytesIO()
    buffer.write(b"prefix!")
    mmpack.save(ms, buffer)
    buffer.seek(7)
    assert mmpack.load(buffer).equal(ms)


def test_every_flipped_bit_position_is_detected():
    data = bytearray(_bytes_of(mixed_models(2)))
    for position in range(len(data)):
        for bit in (0, 7):
            damaged = bytearray(data)
            damaged[position] ^= 1 << bit
            with pytest.raises(MMPackError):
                mmpack.load(io.BytesIO(bytes(damaged)))


def test_a_flipped_bit_in_a_selected_model_is_detected_by_a_partial_load():
    ms = ModelSet.from_modules(ffnn_models(5))
    data = bytearray(_bytes_of(ms))
    header = fileformat.read_header(mmpack._io.FileReader(io.BytesIO(bytes(data))))
    row = ms.architecture.tensors[1].nbytes
    position = header.data_start + header.layout.tensor_offsets[1] + 3 * row + row // 2
    data[position] ^= 0x10
    with pytest.raises(IntegrityError, match="model 3 tensor #1"):
        mmpack.load(io.BytesIO(bytes(data)), indices=[3])
    assert mmpack.load(io.BytesIO(bytes(data)), indices=[2, 4]).equal(ms.select([2, 4]))


def test_verify_false_skips_checksums():
    ms = ModelSet.from_modules(ffnn_models(2))
    data = bytearray(_bytes_of(ms))
    header = fileformat.read_header(mmpack._io.FileReader(io.BytesIO(bytes(data))))
    data[header.data_start + 5] ^= 1
    with pytest.raises(IntegrityError):
        mmpack.load(io.BytesIO(bytes(data)))
    loaded = mmpack.load(io.BytesIO(bytes(data)), verify=False)
    assert not loaded.equal(ms)


def test_every_truncation_is_detected():
    data = _bytes_of(mixed_models(2))
    for length in range(len(data)):
        with pytest.raises(MMPackError):
            mmpack.load(io.BytesIO(data[:length]))


@pytest.mark.parametrize("indices", [None, [1]])
def test_trailing_bytes_are_rejected(indices):
    data = _bytes_of(mixed_models(2)) + b"\0"
    with pytest.raises(IntegrityError, match="trailing"):
        mmpack.load(io.BytesIO(data), indices=indices)


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        (b"", FormatError, "empty"),
        (b"PK\x03\x04 a zip file, maybe torch.save", FormatError, "magic"),
        (b"\x89MMPACK\n", FormatError, "magic"),
        (os.urandom(4096), FormatError, "magic"),
        (struct.pack("<8sIIQQ", b"\x89MMPACK\n", 4, 0, 10, 0), UnsupportedFormatVersionError, "version 4"),
        (struct.pack("<8sIIQQ", b"\x89MMPACK\n", 1, 4, 10, 0), FormatError, "flags"),
        (struct.pack("<8sIIQQ", b"\x89MMPACK\n", 1, 0, 2**40, 0), FormatError, "header length"),
        (struct.pack("<8sIIQQ", b"\x89MMPACK\n", 1, 0, 100, 0) + b"{}", IntegrityError, "ends inside the header"),
    ],
)
def test_malformed_files_raise_typed_errors(data, error, message):
    with pytest.raises(error, match=message):
        mmpack.load(io.BytesIO(data))


def _rewrite_header(data: bytes, edit, reencode=lambda body: body) -> bytes:
    """Apply ``edit`` to the parsed header JSON and re-sign it (a well-formed but lying file)."""
    import json

    length = struct.unpack_from("<Q", data, 16)[0]
    document = json.loads(data[32 : 32 + length])
    edit(document)
    body = reencode(json.dumps(document).encode())
    start = -(-(32 + length) // 64) * 64
    prefix = struct.pack("<8sIIQQ", b"\x89MMPACK\n", 1, 0, len(body), mmpack._native.xxh3_64(body)) + body
    return prefix + bytes(-len(prefix) % 64) + data[start:]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(extra=1), "keys"),
        (lambda d: d.update(n_models=-1), "n_models"),
        (lambda d: d.update(n_models=1.0), "n_models"),
        (lambda d: d.update(layout="interleaved"), "layout"),
        (lambda d: d["tensors"][0].update(offset=64), "sections"),
        (lambda d: d["hashes"].update(algorithm="md5"), "hash section"),
        (lambda d: d.update(data_length=1), "data_length"),
        (lambda d: d.update(metadata={"a": 1}), "metadata"),
        (lambda d: d["architecture"]["tensors"][0].update(dtype="object"), "dtype"),
    ],
)
def test_headers_that_lie_about_the_layout_are_rejected(edit, message):
    data = _rewrite_header(_bytes_of(mixed_models(2)), edit)
    with pytest.raises(FormatError, match=message):
        mmpack.load(io.BytesIO(data))


def test_header_json_constants_are_rejected():
    blob = _bytes_of(mixed_models(1))
    forged = _rewrite_header(blob, lambda d: None, lambda body: body.replace(b'"n_models": 1', b'"n_models": NaN'))
    with pytest.raises(FormatError, match="not valid JSON"):
        mmpack.load(io.BytesIO(forged))


def test_loading_never_unpickles_or_imports(monkeypatch):
    ms = ModelSet.from_modules(mixed_models(2))
    arch = Architecture(ms.architecture.tensors, "evil_module_that_must_not_load:Payload")
    data = _bytes_of(ModelSet(arch, dict(ms.tensors)))

    def forbidden(*args, **kwargs):
        raise AssertionError("load must not unpickle")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    loaded = mmpack.load(io.BytesIO(data))
    assert loaded.architecture.module == "evil_module_that_must_not_load:Payload"
    assert "evil_module_that_must_not_load" not in sys.modules


def test_a_crash_during_save_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "set.mmpack"
    old = ModelSet.from_modules(ffnn_models(3, seed=1))
    mmpack.save(old, path)

    def crash(f, *args):
        f.write(b"\x89MMPACK\n partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(mmpack.fileformat.writing, "write_body", crash)
    with pytest.raises(KeyboardInterrupt):
        mmpack.save(ffnn_models(3, seed=2), path)
    assert os.listdir(tmp_path) == ["set.mmpack"]
    assert mmpack.load(path).equal(old)


def test_fsync_save_and_overwrite(tmp_path):
    path = tmp_path / "set.mmpack"
    mmpack.save(ffnn_models(2, seed=1), path, fsync=True)
    new = ModelSet.from_modules(ffnn_models(2, seed=2))
    mmpack.save(new, path, fsync=True)
    assert mmpack.load(path).equal(new)


def test_bad_save_arguments():
    with pytest.raises(TypeError, match="metadata"):
        mmpack.save(ffnn_models(1), io.BytesIO(), metadata={"a": 1})
    with pytest.raises(TypeError, match="wrap a single module"):
        mmpack.save(ffnn_models(1)[0], io.BytesIO())
    with pytest.raises(FormatError, match="exceeds"):
        mmpack.save(ffnn_models(1), io.BytesIO(), metadata={"big": "x" * (16 * 2**20)})


def test_non_seekable_streams_are_refused_with_advice():
    class Pipe(io.RawIOBase):
        def readable(self):
            return True

    with pytest.raises(MMPackError, match="seekable"):
        mmpack.load(Pipe())


def test_bad_indices_are_rejected():
    data = _bytes_of(ffnn_models(3))
    with pytest.raises(mmpack.ModelIndexError, match="model index 3 out of range"):
        mmpack.load(io.BytesIO(data), indices=[3])
    assert len(mmpack.load(io.BytesIO(data), indices=[])) == 0


_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int8,
    torch.bool,
    torch.complex64,
]


@st.composite
def model_sets(draw):
    n_tensors = draw(st.integers(1, 4))
    specs = tuple(
        TensorSpec(
            f"t{j}",
            draw(st.sampled_from(["parameter", "buffer"])),
            draw(st.sampled_from(_DTYPES)),
            tuple(draw(st.lists(st.integers(0, 5), max_size=3))),
        )
        for j in range(n_tensors)
    )
    arch = Architecture(specs, None)
    n = draw(st.integers(0, 6))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    tensors = {}
    for spec in specs:
        raw = rng.integers(0, 2 if spec.dtype == torch.bool else 256, n * spec.nbytes, dtype=np.uint8)
        tensors[spec.name] = (
            torch.from_numpy(raw).view(spec.dtype).reshape(n, *spec.shape)
            if raw.size
            else torch.empty((n, *spec.shape), dtype=spec.dtype)
        )
    return ModelSet(arch, tensors)


@given(model_sets(), st.data())
def test_any_model_set_round_trips_whole_and_in_part(ms, data):
    blob = _bytes_of(ms)
    assert mmpack.load(io.BytesIO(blob)).equal(ms)
    assert fileformat.encode(ms).tobytes() == blob
    if len(ms):
        indices = data.draw(st.lists(st.integers(0, len(ms) - 1), max_size=8))
        assert mmpack.load(io.BytesIO(blob), indices=indices).equal(ms.select(indices))


@settings(max_examples=40, deadline=None)
@given(model_sets(), st.booleans())
def test_any_model_set_round_trips_through_a_path(ms, compressed):
    # Files go through the atomic publication path (whole writes of every piece): a set of no
    # models, whose hash table is empty, once failed there.
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "set.mmpack")
        mmpack.save(ms, path, compression=mmpack.Compression(chunk_bytes=256) if compressed else None)
        assert mmpack.load(path).equal(ms)
        assert os.listdir(directory) == ["set.mmpack"]


@given(model_sets(), st.integers(0, 2**31), st.integers(0, 7))
def test_any_single_bit_flip_is_detected(ms, where, bit):
    blob = bytearray(_bytes_of(ms))
    blob[where % len(blob)] ^= 1 << bit
    with pytest.raises(MMPackError):
        mmpack.load(io.BytesIO(bytes(blob)))


@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_crash_the_reader(blob):
    with pytest.raises(MMPackError):
        mmpack.load(io.BytesIO(blob))


@given(model_sets(), st.binary(min_size=1, max_size=64), st.integers(0, 2**31))
def test_mutated_headers_raise_only_mmpack_errors(ms, patch, where):
    blob = bytearray(_bytes_of(ms))
    length = struct.unpack_from("<Q", blob, 16)[0]
    at = where % (32 + length)
    blob[at : at + len(patch)] = patch
    try:
        loaded = mmpack.load(io.BytesIO(bytes(blob)))
    except MMPackError:
        return
    assert loaded.equal(ms)  # the patch rewrote bytes with their own values


@pytest.mark.parametrize("build", [lambda: ffnn_models(40), lambda: mixed_models(3), lambda: randomized_cnns(2)])
def test_in_memory_image_equals_the_streamed_file(build):
    ms = ModelSet.from_modules(build())
    image = fileformat.encode(ms, {"k": "v"})
    buffer = io.BytesIO()
    mmpack.save(ms, buffer, metadata={"k": "v"})
    assert image.tobytes() == buffer.getvalue()

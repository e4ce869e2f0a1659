"""The reader accepts exactly what docs/FORMAT.md allows: for every node of a real header, the
same value as a float or a boolean, an unknown key beside it, a key twice, each with the header's
checksum recomputed, is a FormatError. Tensor names follow the spec's rule on both ends."""

from __future__ import annotations

import io
import json
import struct

import pytest
import torch
from golden_sets import GOLDEN_DIR
from hypothesis import given
from hypothesis import strategies as st

import mmpack
from mmpack import Architecture, ArchitectureMismatchError, Compression, FormatError, ModelSet, TensorSpec, _native


def image(compressed: bool = False) -> bytes:
    path = GOLDEN_DIR / ("v2_stacked_zstd.mmpack" if compressed else "v1_mixed.mmpack")
    return path.read_bytes()


def split(data: bytes) -> tuple[dict, bytes]:
    length = struct.unpack_from("<Q", data, 16)[0]
    return json.loads(data[32 : 32 + length]), data[-(-(32 + length) // 64) * 64 :]


def signed(data: bytes, body: bytes) -> bytes:
    """``data`` with its header replaced by ``body`` and the checksum recomputed."""
    version = struct.unpack_from("<I", data, 8)[0]
    _, rest = split(data)
    prefix = struct.pack("<8sIIQQ", b"\x89MMPACK\n", version, 0, len(body), _native.xxh3_64(body)) + body
    return prefix + bytes(-len(prefix) % 64) + rest


def nodes(value, path=()):
    """Every (path, value) in a JSON document."""
    yield path, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from nodes(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from nodes(v, (*path, i))


def replaced(document, path, new):
    copy = json.loads(json.dumps(document))
    holder = copy
    for step in path[:-1]:
        holder = holder[step]
    holder[path[-1]] = new
    return copy


def loads_strictly(data: bytes) -> None:
    with pytest.raises(FormatError):
        mmpack.load(io.BytesIO(data))


@pytest.mark.parametrize("compressed", [False, True])
def test_an_integer_written_as_a_float_or_a_boolean_is_rejected(compressed):
    data = image(compressed)
    document, _ = split(data)
    integers = [(p, v) for p, v in nodes(document) if type(v) is int and p]
    assert len(integers) > 20
    for path, value in integers:
        for forged in (float(value), *((True,) if value == 1 else ()), *((False,) if value == 0 else ())):
            body = json.dumps(replaced(document, path, forged), separators=(",", ":")).encode()
            try:
                mmpack.load(io.BytesIO(signed(data, body)))
            except FormatError:
                continue
            pytest.fail(f"{'.'.join(map(str, path))} = {forged!r} was accepted")


@pytest.mark.parametrize("compressed", [False, True])
def test_an_unknown_key_in_any_object_is_rejected(compressed):
    data = image(compressed)
    document, _ = split(data)
    objects = [p for p, v in nodes(document) if isinstance(v, dict) and p != ("metadata",)]
    for path in objects:
        copy = json.loads(json.dumps(document))
        holder = copy
        for step in path:
            holder = holder[step]
        holder["unexpected"] = 0
        body = json.dumps(copy, separators=(",", ":")).encode()
        try:
            mmpack.load(io.BytesIO(signed(data, body)))
        except FormatError:
            continue
        pytest.fail(f"an unknown key in {'.'.join(map(str, path)) or 'the header'} was accepted")


def test_a_key_twice_in_any_object_is_rejected():
    data = image()
    document, _ = split(data)
    text = json.dumps(document, separators=(",", ":"))
    starts = [i for i, c in enumerate(text) if c == "{"]
    assert len(starts) > 5
    for start in starts:
        end = text.index(",", start)  # the object's first member, written again
        member = text[start + 1 : end]
        if not member.startswith('"'):
            continue
        body = (text[: start + 1] + member + "," + text[start + 1 :]).encode()
        with pytest.raises(FormatError, match="twice"):
            mmpack.load(io.BytesIO(signed(data, body)))


@given(st.text(min_size=1, max_size=12))
def test_tensor_names_follow_the_spec_on_writing_and_reading(name):
    acceptable = not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in name)
    spec = TensorSpec(name, "parameter", torch.float32, (2,))
    if not acceptable:
        with pytest.raises(ArchitectureMismatchError, match="control character"):
            Architecture((spec,))
        return
    ms = ModelSet(Architecture((spec,)), {name: torch.arange(4.0).reshape(2, 2)})
    buffer = io.BytesIO()
    mmpack.save(ms, buffer)
    assert mmpack.load(io.BytesIO(buffer.getvalue())).equal(ms)


@pytest.mark.parametrize("name", ["", "a" * 1001, "fc\n", "\x00", "x\x85"],
                         ids=["empty", "too-long", "newline", "nul", "c1-control"])
def test_a_header_naming_a_tensor_against_the_spec_is_rejected(name):
    data = image()
    document, _ = split(data)
    body = json.dumps(replaced(document, ("architecture", "tensors", 0, "name"), name)).encode()
    with pytest.raises(FormatError, match="name"):
        mmpack.load(io.BytesIO(signed(data, body)))


def test_the_magic_is_checked_before_the_version():
    """docs/FORMAT.md, Versioning: a file that is not mmpack's is not reported as a newer mmpack."""
    data = bytearray(image())
    data[0] = 0
    struct.pack_into("<I", data, 8, 99)
    with pytest.raises(FormatError, match="magic"):
        mmpack.load(io.BytesIO(bytes(data)))
    data = bytearray(image())
    struct.pack_into("<I", data, 8, 99)
    with pytest.raises(mmpack.UnsupportedFormatVersionError):
        mmpack.load(io.BytesIO(bytes(data)))


def test_empty_tensors_compress_with_the_formula_of_the_spec():
    """R_j = max(1, floor(chunk_bytes / max(nbytes_j, 1))): an empty tensor still has a chunk size."""
    spec = TensorSpec("empty", "parameter", torch.float32, (0, 3))
    ms = ModelSet(Architecture((spec, TensorSpec("w", "parameter", torch.float32, (2,)))),
                  {"empty": torch.empty(4, 0, 3), "w": torch.ones(4, 2)})
    buffer = io.BytesIO()
    mmpack.save(ms, buffer, compression=Compression(chunk_bytes=64))
    document, _ = split(buffer.getvalue())
    assert document["compression"]["chunk_rows"][0] == 64
    assert mmpack.load(io.BytesIO(buffer.getvalue())).equal(ms)

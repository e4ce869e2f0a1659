"""Rows of bool tensors hold bytes 0 and 1 only (docs/FORMAT.md): every read path rejects others.

torch gives other bytes in a bool tensor no meaning, so a reader that let
them through would hand out tensors whose behaviour is undefined. The bad
byte's hash is correct in every case here (the writer hashed what it
stored), so only the bool check can catch it: full and partial loads,
compressed or not, and a repository's full and partial recoveries of a
Baseline and of an Update version.
"""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mmpack
from mmpack import IntegrityError, ModelSet
from mmpack.architecture import Architecture, TensorSpec

ARCH = Architecture((
    TensorSpec("weight", "parameter", torch.float32, (3,)),
    TensorSpec("mask", "buffer", torch.bool, (2, 3)),
    TensorSpec("flag", "buffer", torch.bool, ()),
))


def _set(n: int, seed: int) -> ModelSet:
    generator = torch.Generator().manual_seed(seed)
    return ModelSet(ARCH, {
        "weight": torch.randn((n, 3), generator=generator),
        "mask": torch.randint(0, 2, (n, 2, 3), generator=generator).bool(),
        "flag": torch.randint(0, 2, (n,), generator=generator).bool(),
    })


def _spoil(ms: ModelSet, tensor: str, model: int, at: int, byte: int) -> ModelSet:
    tensors = {name: t.clone() for name, t in ms.tensors.items()}
    raw = tensors[tensor].view(torch.uint8).reshape(len(ms), -1)
    raw[model, at % raw.shape[1]] = byte
    return ModelSet(ARCH, tensors)


spoilt = st.tuples(st.integers(2, 12), st.sampled_from(["mask", "flag"]), st.integers(0, 11), st.integers(0, 5),
                   st.integers(2, 255), st.sampled_from([None, "zstd"]))


@given(spoilt)
@settings(max_examples=40, deadline=None)
def test_loads_reject_a_bool_byte_other_than_0_or_1(case):
    n, tensor, model, at, byte, compression = case
    model %= n
    bad = _spoil(_set(n, n), tensor, model, at, byte)
    buffer = io.BytesIO()
    mmpack.save(bad, buffer, compression=compression)
    blob = buffer.getvalue()
    with pytest.raises(IntegrityError, match=f"bool tensor '{tensor}'"):
        mmpack.load(io.BytesIO(blob))
    with pytest.raises(IntegrityError, match="bool"):
        mmpack.load(io.BytesIO(blob), indices=[model])
    with pytest.raises(IntegrityError, match="bool"):
        mmpack.load(io.BytesIO(blob), verify=False)
    others = [i for i in range(n) if i != model]
    assert mmpack.load(io.BytesIO(blob), indices=others).equal(bad.select(others))  # the other rows are fine


@given(spoilt)
@settings(max_examples=12, deadline=None)
def test_recoveries_reject_a_bool_byte_other_than_0_or_1(tmp_path_factory, case):
    n, tensor, model, at, byte, compression = case
    model %= n
    good = _set(n, n)
    repo = mmpack.Repository(tmp_path_factory.mktemp("bools"), fsync=False)
    v1 = repo.save(_spoil(good, tensor, model, at, byte), compression=compression)
    v2 = repo.save(good, compression=compression)
    v3 = repo.save(_spoil(good, tensor, model, at, byte), approach="update", base=v2, compression=compression)
    fresh = mmpack.Repository(repo.store.root)
    for vid in (v1, v3):
        with pytest.raises(IntegrityError, match="bool"):
            fresh.recover(vid)
        with pytest.raises(IntegrityError, match="bool"):
            fresh.recover(vid, indices=[model])
        with pytest.raises(IntegrityError, match="bool"):
            fresh.recover(vid, strategy="recursive")
    assert fresh.recover(v2).equal(good)

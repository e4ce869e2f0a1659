"""Model sets on devices and the staging path between a device and the host.

There is no GPU in CI: the staging code runs here with host memory standing
in for the device (``staging.host_as_device``), which takes every branch a
CUDA device takes except the streams and pinned buffers; the CUDA tests run
wherever a GPU is, and ``bench/devices.py`` checks that path bit for bit.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from helpers import ffnn_models, mixed_models, randomized_cnns, state_equal
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import mmpack
from mmpack import ModelSet, staging
from mmpack.errors import ArchitectureMismatchError, InvalidArgumentError

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SETS = {"ffnn": lambda: ffnn_models(9), "mixed": lambda: mixed_models(7), "cnn": lambda: randomized_cnns(3)}


@given(kind=st.sampled_from(sorted(SETS)), chunk_bytes=st.integers(1, 20_000))
def test_downloads_copy_and_hash_every_row_whatever_the_chunk(kind, chunk_bytes):
    ms = ModelSet.from_modules(SETS[kind]())
    copy, hashes = ms._to_host_hashed(chunk_bytes=chunk_bytes)
    assert copy.equal(ms) and np.array_equal(hashes, ms.hashes())
    assert np.array_equal(ms._hash_on_host(chunk_bytes), ms.hashes())
    moved = staging.upload(ms.tensors, ms.architecture, len(ms), torch.device("cpu"), chunk_bytes)
    assert ModelSet(ms.architecture, moved).equal(ms)


def test_a_set_without_models_or_bytes_stages():
    class Empty(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(0, 3))
            self.b = nn.Parameter(torch.ones(2))

    ms = ModelSet.from_modules([Empty(), Empty()])
    copy, hashes = ms._to_host_hashed(chunk_bytes=3)
    assert copy.equal(ms) and np.array_equal(hashes, ms.hashes())
    none = ms.select([])
    assert none._to_host_hashed()[0].equal(none)


def test_saves_and_hashes_of_a_device_set_are_those_of_the_host_set(tmp_path):
    ms = ModelSet.from_modules(mixed_models(12))
    plain = io.BytesIO()
    mmpack.save(ms, plain)
    repo = mmpack.Repository(tmp_path / "r")
    with staging.host_as_device():
        staged = io.BytesIO()
        mmpack.save(ms, staged)
        assert np.array_equal(ms.hashes(), ModelSet.from_modules(mixed_models(12)).hashes())
        vid = repo.save(ms)
        future = repo.save(ms.select(range(12)), approach="update", base=vid, blocking=False)
        assert ms.select([3, 1]).equal(ms.select(range(12)).select([3, 1]))
    assert staged.getvalue() == plain.getvalue()
    assert repo.recover(vid).equal(ms) and repo.recover(future.result()).equal(ms)
    repo.close()


def test_to_moves_between_devices_and_refuses_what_holds_no_data():
    ms = ModelSet.from_modules(ffnn_models(3))
    assert ms.to("cpu") is ms and ms.device == torch.device("cpu")
    for bad in ("meta", None, "nonsense"):
        with pytest.raises(InvalidArgumentError):
            ms.to(bad)
    with pytest.raises(InvalidArgumentError, match="meta"):
        ModelSet.from_stacked({"w": torch.empty(3, 2, device="meta")})


def test_from_stacked_shares_the_loops_tensors():
    params, buffers = torch.func.stack_module_state(randomized_cnns(2))
    ms = ModelSet.from_stacked(params, buffers)
    assert all(ms.tensors[n].data_ptr() == t.data_ptr() for n, t in {**params, **buffers}.items())
    with torch.no_grad():
        params["fc.weight"].add_(1)
    assert torch.equal(ms.tensors["fc.weight"], params["fc.weight"].detach())


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 4)
        self.decoder = nn.Linear(4, 4)
        self.decoder.weight = self.encoder.weight  # tied
        self.shared = self.encoder  # one module under two names


def test_from_modules_stores_tied_and_shared_parameters_under_every_name():
    models = [Tied() for _ in range(3)]
    ms = ModelSet.from_modules(models)
    names = ms.architecture.names
    assert {"encoder.weight", "decoder.weight", "shared.weight"} <= set(names)
    assert torch.equal(ms.tensors["decoder.weight"], ms.tensors["encoder.weight"])
    fresh = ms.to_modules(Tied)
    assert all(state_equal(a, b) for a, b in zip(models, fresh))
    assert fresh[0].decoder.weight is fresh[0].encoder.weight  # the tie survives
    same = ffnn_models(1) * 4  # one module four times: its tensors shared between models
    assert ModelSet.from_modules(same).equal(ModelSet.from_modules(ffnn_models(1)).select([0, 0, 0, 0]))


def test_from_modules_copies_non_contiguous_tensors_by_value():
    models = ffnn_models(4)
    for m in models:
        m.fc2.weight = nn.Parameter(m.fc2.weight.detach().t().contiguous().t())  # same values, transposed strides
    assert not models[2].fc2.weight.is_contiguous()
    ms = ModelSet.from_modules(models)
    assert all(torch.equal(ms.tensors["fc2.weight"][i], m.fc2.weight) for i, m in enumerate(models))


def test_from_modules_refuses_models_on_several_devices():
    models = ffnn_models(3)
    models[2].fc3.to("meta")
    with pytest.raises(ArchitectureMismatchError, match=r"model 2 has parameter 'fc3.weight' on meta"):
        ModelSet.from_modules(models)


@CUDA
def test_cuda_sets_move_and_stay_bit_exact():
    ms = ModelSet.from_modules(mixed_models(20))
    on_gpu = ms.to("cuda", chunk_bytes=512)
    assert on_gpu.device.type == "cuda" and on_gpu.equal(ms)
    assert np.array_equal(on_gpu.hashes(), ms.hashes())
    assert on_gpu.to("cpu", chunk_bytes=700).equal(ms)
    assert on_gpu.select([5, 2]).to("cpu").equal(ms.select([5, 2]))
    params = {n: t.cuda() for n, t in ms.params.items()}
    assert ModelSet.from_stacked(params, {n: t.cuda() for n, t in ms.buffers.items()}).device.type == "cuda"

"""Loads and recoveries into existing tensors (out=) and onto a device (device=, map_location=)."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
import torch
from helpers import ffnn_models, mixed_models, randomized_cnns

import mmpack
from mmpack import ModelSet, staging
from mmpack.errors import ArchitectureMismatchError, InvalidArgumentError

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def stepped(ms: ModelSet, rows, by: float) -> ModelSet:
    tensors = {n: t.clone() for n, t in ms.tensors.items()}
    for t in tensors.values():
        if t.dtype.is_floating_point:
            t[rows] += by
    return ModelSet(ms.architecture, tensors)


def zeros_like(ms: ModelSet) -> ModelSet:
    return ModelSet(ms.architecture, {n: torch.zeros_like(t) for n, t in ms.tensors.items()})


def file_of(ms: ModelSet, **kwargs) -> bytes:
    buffer = io.BytesIO()
    mmpack.save(ms, buffer, **kwargs)
    return buffer.getvalue()


@pytest.fixture
def chain(tmp_path):
    """A repository with a full version and two updates (one compressed), and the sets they hold."""
    pytest.importorskip("zstandard")
    ms = ModelSet.from_modules(mixed_models(30))
    repo = mmpack.Repository(tmp_path / "r")
    sets = [ms, stepped(ms, slice(2, 6), 1.0), stepped(ms, slice(20, 23), -2.0)]
    repo.save(sets[0])
    repo.save(sets[1], approach="update", base="v1")
    repo.save(sets[2], approach="update", base="v2", compression=mmpack.Compression(xor=True))
    yield repo, sets
    repo.close()


@pytest.mark.parametrize("vid", ["v1", "v2", "v3"])
def test_recover_into_a_modelset_writes_its_own_tensors(chain, vid):
    repo, sets = chain
    out = zeros_like(sets[0])
    addresses = {n: t.data_ptr() for n, t in out.tensors.items()}
    assert repo.recover(vid, out=out) is out
    assert out.equal(sets[int(vid[1:]) - 1])
    assert {n: t.data_ptr() for n, t in out.tensors.items()} == addresses


def test_recover_with_indices_changes_only_those_rows(chain):
    repo, sets = chain
    out = ModelSet(sets[2].architecture, {n: t.clone() for n, t in sets[2].tensors.items()})
    repo.recover("v1", indices=[21, 3, 3], out=out, chunk_bytes=1)  # one model per chunk
    expected = {n: t.clone() for n, t in sets[2].tensors.items()}
    for n, t in expected.items():
        t[[3, 21]] = sets[0].tensors[n][[3, 21]]
    assert out.equal(ModelSet(sets[0].architecture, expected))


def test_recover_into_stacked_tensors_that_require_grad(tmp_path):
    models = ffnn_models(16)
    params, buffers = torch.func.stack_module_state(models)
    assert all(p.requires_grad for p in params.values())
    repo = mmpack.Repository(tmp_path / "r")
    vid = repo.save(ModelSet.from_modules(ffnn_models(16, seed=5)))
    assert repo.recover(vid, out={**params, **buffers}) == {**params, **buffers}
    assert ModelSet.from_stacked(params, buffers).equal(repo.recover(vid))
    strided = {n: torch.zeros(p.shape[0] * 2, *p.shape[1:])[::2] for n, p in params.items()}  # not contiguous
    repo.recover(vid, indices=range(3, 9), out=strided)
    for n, t in strided.items():
        assert torch.equal(t[3:9], repo.recover(vid).tensors[n][3:9]) and not t[:3].any() and not t[9:].any()


def test_recover_into_allocates_nothing_of_the_sets_size(tmp_path):
    ms = ModelSet.from_modules(ffnn_models(2000))
    repo = mmpack.Repository(tmp_path / "r")
    repo.save(ms)
    repo.save(stepped(ms, slice(0, 1000), 1.0), approach="update", base="v1")
    out = zeros_like(ms)
    repo.recover("v2", out=out)  # warm the caches (catalog, hash tables, open objects)
    for indices in (None, range(0, 2000, 3)):
        tracemalloc.start()
        repo.recover("v2", indices=indices, out=out, chunk_bytes=1 << 20)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < ms.nbytes / 8, (indices, peak, ms.nbytes)
    fresh_peak = _peak(lambda: repo.recover("v2"))
    assert fresh_peak > ms.nbytes * 0.9  # the measure sees numpy's allocations
    data = file_of(ms)
    for indices in (None, [5, 900]):
        def load(indices=indices):
            mmpack.load(io.BytesIO(data), indices=indices, out=out, chunk_bytes=1 << 20)

        assert _peak(load) < ms.nbytes / 8
    assert out.select([5, 900]).equal(ms.select([5, 900]))


def _peak(action) -> int:
    tracemalloc.start()
    try:
        action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_load_into_out_full_and_partial():
    ms = ModelSet.from_modules(randomized_cnns(5))
    data = file_of(ms)
    out = zeros_like(ms)
    assert mmpack.load(io.BytesIO(data), out=out) is out and out.equal(ms)
    other = ModelSet.from_modules(randomized_cnns(5, seed=9))
    target = ModelSet(other.architecture, {n: t.clone() for n, t in other.tensors.items()})
    mmpack.load(io.BytesIO(data), indices=[4, 1], out=target)
    for i in range(5):
        assert target.select([i]).equal((ms if i in (1, 4) else other).select([i]))


def _mismatches(ms: ModelSet):
    tensors = dict(ms.tensors)
    first = ms.architecture.names[0]
    yield "shape", {**tensors, first: torch.zeros(len(ms), 1)}, ArchitectureMismatchError
    yield "dtype", {**tensors, first: tensors[first].double()}, ArchitectureMismatchError
    yield "missing", {n: t for n, t in tensors.items() if n != first}, ArchitectureMismatchError
    yield "extra", {**tensors, "extra.weight": torch.zeros(len(ms))}, ArchitectureMismatchError
    yield "size", ms.select(range(len(ms) - 1)), ArchitectureMismatchError
    yield "architecture", ModelSet.from_modules(ffnn_models(len(ms))), ArchitectureMismatchError
    yield "expanded", {**tensors, first: tensors[first][:1].expand_as(tensors[first])}, InvalidArgumentError
    yield "meta", {**tensors, first: torch.empty_like(tensors[first], device="meta")}, InvalidArgumentError
    yield "type", [tensors[n] for n in tensors], TypeError
    yield "not a tensor", {**tensors, first: tensors[first].numpy()}, TypeError


@pytest.mark.parametrize("case", [c[0] for c in _mismatches(ModelSet.from_modules(mixed_models(3)))])
@pytest.mark.parametrize("where", ["file", "repository"])
def test_a_mismatched_out_raises_before_any_byte_moves(tmp_path, case, where):
    ms = ModelSet.from_modules(mixed_models(6))
    target = ModelSet.from_modules(mixed_models(6, seed=3))
    out, error = next((o, e) for c, o, e in _mismatches(target) if c == case)
    before = {n: t.clone() for n, t in target.tensors.items()}
    if where == "file":
        data = file_of(ms)
        with pytest.raises(error):
            mmpack.load(io.BytesIO(data), out=out)
        with pytest.raises(error):
            mmpack.load(io.BytesIO(data), indices=[1], out=out)
    else:
        repo = mmpack.Repository(tmp_path / "r")
        repo.save(ms)
        with pytest.raises(error):
            repo.recover("v1", out=out)
        with pytest.raises(error):
            repo.recover("v1", indices=[2], out=out)
    assert ModelSet(target.architecture, before).equal(target)


def test_out_and_device_must_agree():
    ms = ModelSet.from_modules(ffnn_models(3))
    with pytest.raises(InvalidArgumentError, match="device= asks for cuda:0"):
        staging.check_device(dict(ms.tensors), torch.device("cuda:0"))
    staging.check_device(dict(ms.tensors), torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(InvalidArgumentError, match="finds none"):
            mmpack.load(io.BytesIO(file_of(ms)), out=zeros_like(ms), device="cuda")


@pytest.mark.parametrize("location", [
    "cpu", torch.device("cpu"), {"cpu": "cpu"}, {"cuda:0": "cpu"}, lambda storage, where: storage,
    lambda storage, where: None,
])
def test_map_location_as_torch_load_takes_it(location):
    ms = ModelSet.from_modules(ffnn_models(4))
    loaded = mmpack.load(io.BytesIO(file_of(ms)), map_location=location)
    assert loaded.device.type == "cpu" and loaded.equal(ms)
    assert mmpack.load(io.BytesIO(file_of(ms)), device="cpu").equal(ms)


@pytest.mark.parametrize("bad", ["meta", "not-a-device", 3.5])
def test_unusable_devices_are_refused(bad):
    ms = ModelSet.from_modules(ffnn_models(2))
    with pytest.raises(InvalidArgumentError):
        mmpack.load(io.BytesIO(file_of(ms)), device=bad)
    with pytest.raises(InvalidArgumentError, match="not both"):
        mmpack.load(io.BytesIO(file_of(ms)), device="cpu", map_location="cpu")


@pytest.mark.parametrize("chunk_bytes", [1, 3000, None])
@pytest.mark.parametrize("indices", [None, [7, 0, 7, 29], range(10, 20)])
def test_the_staged_path_of_accelerators_run_on_the_host(chain, chunk_bytes, indices):
    """What load/recover(device="cuda") do, run with host memory standing in for the device."""
    repo, sets = chain
    data = file_of(sets[0])
    expected = sets[2] if indices is None else sets[2].select(indices)
    with staging.host_as_device():
        placed = repo.recover("v3", indices=indices, device="cpu", chunk_bytes=chunk_bytes)
        assert placed.equal(expected)
        loaded = mmpack.load(io.BytesIO(data), indices=indices, map_location="cpu", chunk_bytes=chunk_bytes)
        assert loaded.equal(sets[0] if indices is None else sets[0].select(indices))
        out = zeros_like(sets[0])
        repo.recover("v3", out=out, chunk_bytes=chunk_bytes)  # not read in place: through the staging buffers
        assert out.equal(sets[2])


def test_a_checksum_failure_stops_a_staged_recovery_before_the_bad_chunk_is_copied(tmp_path):
    ms = ModelSet.from_modules(ffnn_models(20))
    data = bytearray(file_of(ms))
    header = mmpack.fileformat.read_header(mmpack._io.FileReader(io.BytesIO(bytes(data))))
    j = ms.architecture.index("fc2.weight")
    data[header.data_start + header.layout.tensor_offsets[j] + 12 * ms.architecture.tensors[j].nbytes] ^= 0xFF
    out = zeros_like(ms)
    with staging.host_as_device(), pytest.raises(mmpack.IntegrityError, match="model 12"):
        mmpack.load(io.BytesIO(bytes(data)), out=out, chunk_bytes=1)  # a chunk per model
    assert out.select(range(12)).equal(ms.select(range(12)))
    assert not any(t[12:].any() for t in out.tensors.values())  # the corrupt chunk never reached the target


@CUDA
def test_load_and_recover_onto_cuda_and_into_cuda_tensors(chain):
    repo, sets = chain
    on_gpu = repo.recover("v3", device="cuda", chunk_bytes=4096)
    assert on_gpu.device.type == "cuda" and on_gpu.equal(sets[2])
    out = zeros_like(sets[0]).to("cuda")
    repo.recover("v2", indices=[3, 4, 25], out=out, chunk_bytes=4096)
    assert out.select([3, 4, 25]).to("cpu").equal(sets[1].select([3, 4, 25]))
    data = file_of(sets[0])
    assert mmpack.load(io.BytesIO(data), map_location="cuda:0").equal(sets[0])
    assert repo.recover(repo.save(on_gpu, approach="update", base="v3")).equal(sets[2])
    assert np.array_equal(on_gpu.hashes(), sets[2].hashes())

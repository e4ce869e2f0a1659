import numpy as np
import pytest
import torch
import xxhash
from helpers import Mixed, ffnn_models, mixed_models, randomized_cnns, state_equal
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import mmpack
from mmpack import ArchitectureMismatchError, MMPackError, ModelIndexError, ModelSet
from mmpack.workloads import FFNN, ffnn48, small_cnn


@pytest.mark.parametrize(
    ("build", "factory"),
    [
        (lambda: ffnn_models(7), ffnn48),
        (lambda: randomized_cnns(5), small_cnn),
        (lambda: mixed_models(4), Mixed),
        (lambda: ffnn_models(1), ffnn48),
    ],
    ids=["ffnn48", "cnn-batchnorm", "fp16-bf16-fp64-int64", "one-model"],
)
def test_modules_round_trip_bit_exactly(build, factory):
    models = build()
    ms = ModelSet.from_modules(models)
    assert len(ms) == len(models)
    back = ms.to_modules(factory)
    assert all(state_equal(a, b) for a, b in zip(models, back))


def test_stacked_tensors_hold_each_model_in_its_row():
    models = randomized_cnns(3)
    ms = ModelSet.from_modules(models)
    for i, m in enumerate(models):
        for name, value in m.state_dict().items():
            assert torch.equal(ms.tensors[name][i], value)
    assert set(ms.buffers) == {n for n, _ in models[0].named_buffers()}
    assert set(ms.params) == {n for n, _ in models[0].named_parameters()}


def test_five_thousand_models_round_trip():
    models = ffnn_models(5000)
    ms = ModelSet.from_modules(models)
    assert ms.nbytes == 5000 * 4993 * 4
    sample = [0, 1, 2499, 4999]
    back = ms.select(sample).to_modules(ffnn48)
    assert all(state_equal(models[i], b) for i, b in zip(sample, back))


def test_non_contiguous_parameters_are_packed_by_value():
    models = ffnn_models(3)
    for m in models:
        transposed = m.fc2.weight.detach().t().contiguous().t()  # same values, column-major strides
        assert not transposed.is_contiguous()
        m.fc2.weight = nn.Parameter(transposed)
    ms = ModelSet.from_modules(models)
    for i, m in enumerate(models):
        assert torch.equal(ms.tensors["fc2.weight"][i], m.fc2.weight)


def test_hashes_are_xxh3_of_each_slice():
    models = mixed_models(3)
    ms = ModelSet.from_modules(models)
    hashes = ms.hashes()
    assert hashes.dtype == np.uint64 and hashes.shape == (3, len(ms.architecture))
    for i, m in enumerate(models):
        for j, (name, value) in enumerate(m.state_dict().items()):
            raw = value.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            assert hashes[i, j] == xxhash.xxh3_64_intdigest(raw), name


def test_hashes_follow_in_place_changes():
    ms = ModelSet.from_modules(ffnn_models(4))
    before = ms.hashes()
    ms.tensors["fc3.bias"][2].add_(1.0)
    after = ms.hashes()
    changed = np.argwhere(before != after).tolist()
    assert changed == [[2, ms.architecture.index("fc3.bias")]]


def test_select_keeps_order_and_duplicates():
    ms = ModelSet.from_modules(ffnn_models(6))
    sub = ms.select([5, 0, 5])
    assert len(sub) == 3
    assert torch.equal(sub.tensors["fc1.weight"][0], ms.tensors["fc1.weight"][5])
    assert torch.equal(sub.tensors["fc1.weight"][2], ms.tensors["fc1.weight"][5])
    assert torch.equal(sub.tensors["fc1.weight"][1], ms.tensors["fc1.weight"][0])
    assert len(ms.select([])) == 0
    assert ms.select(np.array([1, 2])).equal(ms.select(torch.tensor([1, 2])))


@pytest.mark.parametrize("bad", [[6], [-1], [0.5], [[1]], [True]])
def test_select_rejects_bad_indices(bad):
    ms = ModelSet.from_modules(ffnn_models(6))
    with pytest.raises(ModelIndexError):
        ms.select(bad)


@given(st.lists(st.integers(-(2**80), 2**80), min_size=1, max_size=6), st.sampled_from(["list", "uint64", "tensor"]))
def test_any_integer_index_is_checked_and_named(indices, form):
    # Indices beyond int64 used to be reported as "got object (1,)" (or wrapped negative from uint64).
    ms = ModelSet.from_modules(ffnn_models(6))
    if form == "uint64":
        indices = [i % 2**64 for i in indices]
        given_indices = np.array(indices, dtype=np.uint64)
    elif form == "tensor":
        indices = [max(min(i, 2**63 - 1), -(2**63)) for i in indices]
        given_indices = torch.tensor(indices)
    else:
        given_indices = indices
    bad = [i for i in indices if not 0 <= i < 6]
    if not bad:
        assert ms.select(given_indices).equal(ms.select([int(i) for i in indices]))
        return
    with pytest.raises(ModelIndexError, match=f"model index {bad[0]} out of range: the set has 6 models"):
        ms.select(given_indices)


def test_mismatched_shapes_name_model_and_tensor():
    models = ffnn_models(20) + [FFNN(40)]
    with pytest.raises(
        ArchitectureMismatchError, match=r"model 20 has parameter 'fc1.weight' of shape \(40, 5\).*\(48, 5\)"
    ):
        ModelSet.from_modules(models)


def test_mismatched_dtype_is_reported():
    models = ffnn_models(3)
    models[1].fc3.bias = nn.Parameter(models[1].fc3.bias.double())
    with pytest.raises(ArchitectureMismatchError, match="model 1 has parameter 'fc3.bias'.*float64"):
        ModelSet.from_modules(models)


def test_extra_or_missing_tensors_are_reported():
    models = ffnn_models(3)
    models[2].fc2.register_buffer("extra", torch.zeros(1))
    with pytest.raises(ArchitectureMismatchError, match="model 2"):
        ModelSet.from_modules(models)
    models = ffnn_models(3)
    models[1].fc4.bias = None
    with pytest.raises(ArchitectureMismatchError, match="model 1.*fc4.bias"):
        ModelSet.from_modules(models)
    models = ffnn_models(3)
    models[1].extra = nn.Linear(1, 1)
    with pytest.raises(ArchitectureMismatchError, match="model 1"):
        ModelSet.from_modules(models)


def test_stateless_structure_changes_are_reported():
    models = [nn.Sequential(nn.Linear(2, 2), nn.ReLU()) for _ in range(3)]
    models[2][1] = nn.Tanh()
    with pytest.raises(ArchitectureMismatchError, match="model 2 submodule '1' is a Tanh"):
        ModelSet.from_modules(models)


def test_bad_inputs_to_from_modules():
    with pytest.raises(MMPackError, match="at least one"):
        ModelSet.from_modules([])
    with pytest.raises(TypeError, match="model 1 is a str"):
        ModelSet.from_modules([ffnn48(), "nope"])
    meta = ffnn48().to("meta")
    with pytest.raises(ArchitectureMismatchError, match="model 1 has parameter 'fc1.weight' on meta"):
        ModelSet.from_modules([ffnn48(), meta])


def test_to_modules_rejects_a_factory_of_another_architecture():
    ms = ModelSet.from_modules(ffnn_models(2))
    with pytest.raises(ArchitectureMismatchError, match="fc1.weight"):
        ms.to_modules(lambda: FFNN(69))


def test_to_modules_fills_non_contiguous_targets():
    ms = ModelSet.from_modules(ffnn_models(2))

    def factory():
        m = ffnn48()
        m.fc2.weight = nn.Parameter(torch.empty(48, 48).t())
        return m

    back = ms.to_modules(factory)
    assert torch.equal(back[1].fc2.weight, ms.tensors["fc2.weight"][1])


def test_constructor_validates_stacked_tensors():
    ms = ModelSet.from_modules(ffnn_models(3))
    tensors = dict(ms.tensors)
    again = ModelSet(ms.architecture, tensors)
    assert again.equal(ms)
    with pytest.raises(ArchitectureMismatchError, match="missing"):
        ModelSet(ms.architecture, {k: v for k, v in tensors.items() if k != "fc1.weight"})
    with pytest.raises(ArchitectureMismatchError, match="fc2.bias"):
        ModelSet(ms.architecture, {**tensors, "fc2.bias": tensors["fc2.bias"][:2]})
    with pytest.raises(ArchitectureMismatchError, match="fc2.bias"):
        ModelSet(ms.architecture, {**tensors, "fc2.bias": tensors["fc2.bias"].double()})
    with pytest.raises(TypeError):
        ModelSet(ms.architecture, {**tensors, "fc2.bias": [1, 2]})


def test_from_stacked_accepts_stack_module_state_output():
    models = randomized_cnns(4)
    params, buffers = torch.func.stack_module_state(models)
    ms = ModelSet.from_stacked(params, buffers)
    assert len(ms) == 4
    assert torch.equal(ms.tensors["bn2.running_var"], torch.stack([m.bn2.running_var for m in models]))


def test_equal_detects_a_single_bit():
    ms = ModelSet.from_modules(ffnn_models(2))
    other = ms.select([0, 1])
    assert ms.equal(other)
    other.tensors["fc4.bias"].view(torch.int32)[1, 0] ^= 1
    assert not ms.equal(other)
    assert not ms.equal("x")


def test_vmap_call_evaluates_five_thousand_models_in_one_call():
    models = ffnn_models(5000)
    ms = ModelSet.from_modules(models)
    x = torch.randn(16, 5)
    with torch.no_grad():
        batched = mmpack.vmap_call(models[0], ms, x)
        assert batched.shape == (5000, 16, 1)
        one_by_one = torch.stack([m(x) for m in models])
    # Batched matmuls may sum in another order: equal up to float rounding.
    torch.testing.assert_close(batched, one_by_one, rtol=1e-5, atol=1e-6)


def test_vmap_call_with_one_input_per_model_and_batchnorm_in_eval():
    models = randomized_cnns(3)
    for m in models:
        m.eval()
    ms = ModelSet.from_modules(models)
    xs = torch.randn(3, 2, 3, 32, 32)
    with torch.no_grad():
        out = mmpack.vmap_call(models[0], ms, xs, batched_args=True, chunk_size=2)
        expected = torch.stack([m(x) for m, x in zip(models, xs)])
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_models_are_stacked_on_their_device_and_stay_there():
    models = [m.cuda() for m in ffnn_models(50)]
    ms = ModelSet.from_modules(models)
    assert ms.device.type == "cuda" and all(t.is_cuda for t in ms.tensors.values())
    cpu = ModelSet.from_modules([m.cpu() for m in models])
    assert ms.equal(cpu)
    back = ms.to_modules(lambda: ffnn48().cuda())
    assert torch.equal(back[3].fc2.weight.cpu(), cpu.tensors["fc2.weight"][3])


def test_load_into_existing_modules_checks_every_model():
    ms = ModelSet.from_modules(ffnn_models(4, seed=1))
    targets = ffnn_models(4, seed=2)
    ms.load_into(targets)
    assert ModelSet.from_modules(targets).equal(ms)
    wrong = ffnn_models(3) + [FFNN(40)]
    with pytest.raises(ArchitectureMismatchError, match="model 3"):
        ms.load_into(wrong)
    with pytest.raises(ArchitectureMismatchError, match="3 modules for a set of 4"):
        ms.load_into(ffnn_models(3))


@pytest.mark.parametrize("dtype", sorted(mmpack.dtypes._BY_NAME.values(), key=str), ids=str)
@pytest.mark.parametrize("n_models,shape", [(3, (4, 5)), (1, ()), (0, (2,)), (2, (0, 3))])
def test_fresh_stacked_tensors_and_their_bytes_are_one_memory(dtype, n_models, shape):
    # Readers write every row through the bytes: they must be the tensor's own, of its exact size.
    from mmpack import packing
    from mmpack.architecture import TensorSpec

    spec = TensorSpec("t", "parameter", dtype, shape)
    tensor, raw = packing.empty_stacked_bytes(n_models, spec)
    assert tensor.shape == (n_models, *shape) and tensor.dtype == dtype and tensor.is_contiguous()
    assert raw.dtype == np.uint8 and raw.shape == (n_models * spec.nbytes,)
    raw[:] = np.arange(len(raw)) % 2  # bytes 0 and 1: a valid bool, a valid float8
    assert np.array_equal(packing.byte_view(tensor), raw)
    assert packing.empty_stacked(n_models, spec).shape == tensor.shape

import pytest
import torch
from torch import nn

from mmpack import Architecture, ArchitectureMismatchError, FormatError, TensorSpec
from mmpack.workloads import ffnn48, ffnn69, small_cnn


def test_ffnn48_architecture_matches_the_paper():
    arch = Architecture.from_module(ffnn48())
    assert arch.names == ("fc1.weight", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias", "fc4.weight", "fc4.bias")
    assert sum(t.numel for t in arch.tensors) == 4993
    assert sum(t.numel for t in Architecture.from_module(ffnn69()).tensors) == 10075
    assert arch.nbytes_per_model == 4993 * 4
    assert arch.module == "mmpack.workloads.models:FFNN"


def test_buffers_are_included_in_state_dict_order_and_non_persistent_ones_are_not():
    model = small_cnn()
    model.register_buffer("scratch", torch.zeros(2), persistent=False)
    arch = Architecture.from_module(model)
    assert arch.names == tuple(model.state_dict().keys())
    kinds = {t.name: t.kind for t in arch.tensors}
    assert kinds["bn1.running_mean"] == "buffer" and kinds["conv1.weight"] == "parameter"
    assert 6800 < sum(t.numel for t in arch.tensors if t.kind == "parameter") < 7000


def test_json_round_trip_and_fingerprint():
    arch = Architecture.from_module(small_cnn())
    again = Architecture.from_json(arch.to_json())
    assert again == arch
    assert again.fingerprint() == arch.fingerprint()
    assert Architecture.from_module(ffnn48()).fingerprint() != Architecture.from_module(ffnn69()).fingerprint()


def test_difference_names_the_first_differing_tensor():
    a = Architecture.from_module(ffnn48())
    b = Architecture.from_module(ffnn69())
    assert "fc1.weight" in a.difference(b) and "(48, 5)" in a.difference(b)
    shorter = Architecture(a.tensors[:-1], a.module)
    assert "'fc4.bias'" in a.difference(shorter) and "only in the first" in a.difference(shorter)
    assert a.difference(Architecture(a.tensors, "other:Class")) is None


def test_duplicate_names_are_rejected():
    spec = TensorSpec("w", "parameter", torch.float32, (2,))
    with pytest.raises(ArchitectureMismatchError, match="'w' appears twice"):
        Architecture((spec, spec))


@pytest.mark.parametrize(
    "bad",
    [
        None,
        [],
        {"tensors": "x"},
        {"tensors": [1]},
        {"tensors": [{"name": "", "kind": "parameter", "dtype": "float32", "shape": []}]},
        {"tensors": [{"name": "w", "kind": "weights", "dtype": "float32", "shape": []}]},
        {"tensors": [{"name": "w", "kind": "parameter", "dtype": "float99", "shape": []}]},
        {"tensors": [{"name": "w", "kind": "parameter", "dtype": "float32", "shape": [-1]}]},
        {"tensors": [{"name": "w", "kind": "parameter", "dtype": "float32", "shape": [1.5]}]},
        {"tensors": [{"name": "w", "kind": "parameter", "dtype": "float32", "shape": [True]}]},
        {"tensors": [{"name": "w", "kind": "parameter", "dtype": ["float32"], "shape": [1]}]},
        {"module": 3, "tensors": []},
        {"tensors": [{"name": "w", "kind": "parameter", "dtype": "float32", "shape": [1]}] * 2},
    ],
)
def test_malformed_json_raises_format_error(bad):
    with pytest.raises(FormatError):
        Architecture.from_json(bad)


def test_index_of_unknown_name_lists_known_names():
    arch = Architecture.from_module(nn.Linear(2, 2))
    assert arch.index("bias") == 1
    with pytest.raises(KeyError, match="'weight', 'bias'"):
        arch.index("nope")

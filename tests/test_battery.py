"""The battery workload: simulated data, dataset files, and batch-independent training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmpack
from mmpack import DatasetRef, ModelSet, ProvenanceError
from mmpack.workloads import ffnn48, make_models
from mmpack.workloads.battery import (
    SAMPLES,
    BatteryFleet,
    TrainingConfig,
    finetune,
    generate_dataset,
    generate_datasets,
    load_dataset,
    train,
    write_dataset,
)


def test_datasets_look_like_a_cell_and_age_with_cycles():
    data = generate_datasets(np.arange(4), cycle=0)
    assert data.shape == (4, SAMPLES, 6) and data.dtype == np.float32
    assert np.isfinite(data).all()
    assert np.abs(data).max() < 10  # normalised
    aged = generate_dataset(2, cycle=10)
    assert not np.array_equal(aged, data[2])
    # The voltage sags more under load once the cell has aged (higher resistance, less capacity).
    assert np.array_equal(generate_dataset(2, cycle=0), generate_dataset(2, cycle=0))


def test_dataset_files_are_referenced_by_content(tmp_path):
    data = generate_dataset(7, 1)
    ref = write_dataset(data, tmp_path / "cell7.npy")
    assert ref == DatasetRef.of_file(tmp_path / "cell7.npy")
    assert np.array_equal(load_dataset(ref), data)
    (tmp_path / "cell7.npy").write_bytes(b"changed")
    assert f"dataset size differs (7 bytes, recorded {ref.size})" in ref.problem()  # known before reading
    with pytest.raises(ProvenanceError, match="size differs"):
        ref.read()
    (tmp_path / "cell7.npy").write_bytes(bytes(ref.size))  # the recorded size, other bytes
    assert "content hash differs" in ref.problem()
    (tmp_path / "cell7.npy").unlink()
    assert "missing" in ref.problem()


def test_training_reduces_the_loss():
    cells = np.arange(8)
    data = list(generate_datasets(cells, 0))
    ms = ModelSet.from_modules(make_models(ffnn48, 8))
    trained = train(ms, data, cells, TrainingConfig(steps=80, learning_rate=1e-2))
    x = torch.from_numpy(np.stack(data))
    with torch.no_grad():
        before = ((mmpack.vmap_call(ffnn48(), ms, x[..., :5], batched_args=True) - x[..., 5:]) ** 2).mean()
        after = ((mmpack.vmap_call(ffnn48(), trained, x[..., :5], batched_args=True) - x[..., 5:]) ** 2).mean()
    assert after < 0.5 * before


@pytest.mark.parametrize("subset", [[5], [2, 11], [0, 3, 4, 9, 15]])
def test_a_model_trains_the_same_alone_in_any_batch_and_thread_count(subset):
    cells = np.arange(16)
    data = list(generate_datasets(cells, 0))
    ms = ModelSet.from_modules(make_models(ffnn48, 16))
    config = TrainingConfig(steps=15)
    everyone = train(ms, data, cells, config)
    alone = train(ms.select(subset), [data[i] for i in subset], cells[subset], config)
    assert alone.equal(everyone.select(subset))
    two_threads = train(
        ms.select(subset), [data[i] for i in subset], cells[subset], TrainingConfig(steps=15, threads=2)
    )
    assert two_threads.equal(alone)


def test_partial_fine_tuning_changes_only_the_last_layers():
    cells = np.arange(4)
    data = list(generate_datasets(cells, 1))
    ms = ModelSet.from_modules(make_models(ffnn48, 4))
    out = finetune(ms, data, ["partial", "full", "partial", "full"], TrainingConfig(steps=5).to_json(), cells)
    changed = out.hashes() != ms.hashes()
    names = ms.architecture.names
    for i, kind in enumerate(["partial", "full", "partial", "full"]):
        expected = [n.startswith(("fc3", "fc4")) or kind == "full" for n in names]
        assert changed[i].tolist() == expected


def test_fleet_update_cycle_records_provenance(tmp_path):
    fleet = BatteryFleet(20, tmp_path / "data", initial_steps=5, config=TrainingConfig(steps=5))
    ms, refs = fleet.initial_models()
    assert len(ms) == 20 and len(refs) == 20
    updated, provenance = fleet.update_cycle(ms, cycle=1, fraction=0.2)
    changed = np.flatnonzero((updated.hashes() != ms.hashes()).any(axis=1))
    assert changed.tolist() == provenance.models().tolist()
    assert provenance.function == "mmpack.workloads.battery:finetune"
    assert {kind for _, kind in provenance.updates.values()} == {"full", "partial"}


@pytest.mark.parametrize("hidden", [48, 69])
def test_hand_written_gradients_match_autograd(hidden):
    from torch.func import functional_call, grad, vmap

    from mmpack.workloads.battery import _gradients, initial_weights
    from mmpack.workloads.models import FFNN

    ms = initial_weights(5, hidden, seed=3)
    weights = {k: t.clone() for k, t in ms.tensors.items()}
    x, y = torch.randn(5, 32, 5), torch.randn(5, 32, 1)
    skeleton = FFNN(hidden).to("meta")

    def loss(p, xx, yy):
        return ((functional_call(skeleton, p, (xx,)) - yy) ** 2).mean()

    expected = vmap(grad(loss))(weights, x, y)
    got = _gradients(weights, x, y, set(weights))
    for name in weights:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6)
    partial = _gradients(weights, x, y, {"fc3.weight", "fc3.bias", "fc4.weight", "fc4.bias"})
    assert set(partial) == {"fc3.weight", "fc3.bias", "fc4.weight", "fc4.bias"}


def test_ffnn69_trains_the_same_in_any_batch():
    from mmpack.workloads.battery import initial_weights

    cells = np.arange(12)
    data = list(generate_datasets(cells, 0))
    ms = initial_weights(12, 69)
    everyone = train(ms, data, cells, TrainingConfig(steps=6))
    assert train(ms.select([4, 9]), [data[4], data[9]], cells[[4, 9]], TrainingConfig(steps=6)).equal(
        everyone.select([4, 9])
    )

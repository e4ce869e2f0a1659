"""Trained model sets for the compression benchmark: every weight comes from real training here.

Compression depends on the weights' statistics, so untrained (freshly
initialised) or perturbed models would say little. Each workload returns the
trained set and the set after one update cycle (10 % of the models retrained,
half fully and half partially), so the update deltas are those of real
fine-tuning:

* ``battery``: the paper's battery-cell workload (``mmpack.workloads.battery``):
  FFNN-48 or FFNN-69 per cell, trained on the cell's simulated drive cycle,
  then an update cycle on aged cells' new data.
* ``synthetic``: FFNN-48 trained with fused Adam on a smooth battery-like
  target per model (what this benchmark measured before the battery workload
  landed; its figures are the ones issue 15 quotes).
* ``cnn``: the small CIFAR-sized CNN with BatchNorm, trained on synthetic
  16x16 images (a class template per model and class, plus noise), running
  statistics included; the partial update retrains conv3, bn3 and fc.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

from mmpack import ModelSet
from mmpack.workloads import ffnn48, make_models, small_cnn
from mmpack.workloads.battery import BatteryFleet
from mmpack.workloads.cycles import PARTIAL_PREFIXES


@dataclass
class Workload:
    """A trained set and the set one update cycle later."""

    name: str
    trained: ModelSet
    updated: ModelSet


def battery(n: int, hidden: int, data_dir: str | None = None) -> Workload:
    """The battery workload: n cells' models of the given hidden width, and one update cycle."""
    with tempfile.TemporaryDirectory(dir=data_dir) as directory:
        fleet = BatteryFleet(n, directory, hidden=hidden)
        trained, _ = fleet.initial_models()
        updated, _ = fleet.update_cycle(trained, cycle=1, fraction=0.10)
    return Workload(f"battery FFNN-{hidden}", trained, updated)


# -- FFNN-48 on a synthetic target ---------------------------------------------------


def _targets(x: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """A smooth voltage-like response of (current, temperature, charge, two current histories)."""
    drop = torch.tanh(x @ coef[:5]) * coef[5]
    return (drop + 0.3 * torch.sin(2 * x[..., 2] * coef[6]) + coef[7] * x[..., 0] * x[..., 1]).unsqueeze(-1)


def _train_ffnn(ms: ModelSet, coef: torch.Tensor, steps: int, lr: float, seed: int,
                only: tuple[str, ...] | None) -> ModelSet:
    generator = torch.Generator().manual_seed(seed)
    params = {k: v.clone().requires_grad_(only is None or k.startswith(only)) for k, v in ms.tensors.items()}
    optimizer = torch.optim.Adam([v for v in params.values() if v.requires_grad], lr=lr, fused=True)
    model = ffnn48()
    loss_of = vmap(lambda p, x, y: ((functional_call(model, p, (x,)) - y) ** 2).mean())
    for _ in range(steps):
        x = torch.randn(len(ms), 16, 5, generator=generator)
        loss = loss_of(params, x, vmap(_targets)(x, coef)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return ModelSet(ms.architecture, {k: v.detach().clone() for k, v in params.items()})


def _update(trained: ModelSet, train, partial: tuple[str, ...], seed: int) -> ModelSet:
    """One update cycle: 5 % of the models retrained fully, 5 % only the tensors in ``partial``."""
    n = len(trained)
    chosen = np.random.default_rng(seed).choice(n, max(2, n // 10), replace=False)
    full, part = np.sort(chosen[: len(chosen) // 2]), np.sort(chosen[len(chosen) // 2 :])
    tensors = {k: v.clone() for k, v in trained.tensors.items()}
    for ids, only in ((full, None), (part, partial)):
        tuned = train(trained.select(ids.tolist()), ids, only)
        for k in tensors:
            tensors[k][torch.from_numpy(ids)] = tuned.tensors[k]
    return ModelSet(trained.architecture, tensors)


def synthetic_ffnn48(n: int, steps: int = 150) -> Workload:
    generator = torch.Generator().manual_seed(0)
    coef = torch.randn(n, 8, generator=generator)
    trained = _train_ffnn(ModelSet.from_modules(make_models(ffnn48, n, seed=0)), coef, steps, 3e-3, 1, None)
    aged = coef * (1 + 0.05 * torch.randn(coef.shape, generator=generator))  # the cells aged: targets drift
    updated = _update(trained, lambda ms, ids, only: _train_ffnn(ms, aged[ids], steps // 2, 1e-3, 2, only),
                      PARTIAL_PREFIXES["FFNN"], seed=1)
    return Workload("synthetic FFNN-48", trained, updated)


# -- the CNN ----------------------------------------------------------------------------


def _train_cnn(ms: ModelSet, templates: torch.Tensor, steps: int, lr: float, seed: int,
               only: tuple[str, ...] | None) -> ModelSet:
    """Each model trained on its own as an nn.Module in training mode (BatchNorm keeps its running
    statistics as it does in any training loop); the models are small, so a loop is fast enough."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {k: v.clone() for k, v in ms.tensors.items()}
    model = small_cnn()
    for i in range(len(ms)):
        with torch.no_grad():
            for name, t in model.state_dict(keep_vars=True).items():
                t.copy_(tensors[name][i])
        model.train()
        trainable = [p for name, p in model.named_parameters() if only is None or name.startswith(only)]
        frozen = [m for name, m in model.named_modules() if only is not None and name and not name.startswith(only)]
        optimizer = torch.optim.Adam(trainable, lr=lr)
        for _ in range(steps):
            for m in frozen:
                m.eval()  # a partial update leaves the first blocks' statistics alone
            y = torch.randint(0, 10, (32,), generator=generator)
            x = templates[i, y] + 0.5 * torch.randn(32, 3, 16, 16, generator=generator)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            for name, t in model.state_dict().items():
                tensors[name][i] = t
    return ModelSet(ms.architecture, tensors)


def cnn(n: int, steps: int = 30) -> Workload:
    generator = torch.Generator().manual_seed(3)
    templates = torch.randn(n, 10, 3, 16, 16, generator=generator)  # each model's own classes
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: threads cost more than they save
    try:
        trained = _train_cnn(ModelSet.from_modules(make_models(small_cnn, n, seed=0)), templates, steps, 1e-2, 4, None)
        shifted = templates + 0.3 * torch.randn(templates.shape, generator=generator)  # the data drifted
        updated = _update(trained, lambda ms, ids, only: _train_cnn(ms, shifted[ids], steps // 2, 3e-3, 5, only),
                          PARTIAL_PREFIXES["SmallCNN"], seed=2)
    finally:
        torch.set_num_threads(threads)
    return Workload("CNN", trained, updated)

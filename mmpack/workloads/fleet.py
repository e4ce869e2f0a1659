"""A fleet trained at once: stacked parameters, ``torch.func.grad`` under ``vmap``, SGD in place.

The loop ``docs/TRAINING.md`` walks through, packaged for the benchmark
(``bench/training_loop.py``) and the tests that kill and resume it. Each
epoch draws the fleet's data from a generator seeded by ``(seed, epoch)``,
so a run resumed at epoch ``e`` computes what an uninterrupted run computes
(with the same thread count).

Example::

    fleet = Fleet(5000)
    for epoch in range(3):
        fleet.train_epoch(epoch)          # updates fleet.params in place
    ms = fleet.modelset()                 # shares the fleet's tensors (no copy)
"""

from __future__ import annotations

import copy

import torch
from torch.func import functional_call, grad, stack_module_state, vmap

from mmpack.modelset import ModelSet
from mmpack.workloads.models import ffnn48, make_models

__all__ = ["Fleet"]


class Fleet:
    """``n_models`` FFNN-48 battery-cell models stacked by ``torch.func.stack_module_state``."""

    def __init__(self, n_models: int, *, seed: int = 0, samples: int = 32, lr: float = 0.01,
                 device: torch.device | str = "cpu") -> None:
        models = make_models(ffnn48, n_models, seed)
        self.skeleton = copy.deepcopy(models[0]).to("meta")  # architecture only, for functional_call
        params, buffers = stack_module_state(models)
        self.params = {n: p.detach().to(device) for n, p in params.items()}
        self.buffers = {n: b.to(device) for n, b in buffers.items()}
        self.n_models, self.seed, self.samples, self.lr = n_models, seed, samples, lr
        self.device = torch.device(device)
        self._step = vmap(grad(self._loss))

    def _loss(self, params, buffers, x, y):
        prediction = functional_call(self.skeleton, (params, buffers), (x,))
        return torch.nn.functional.mse_loss(prediction, y)

    def data(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This epoch's inputs ``[n_models, samples, 5]`` and targets ``[n_models, samples, 1]``."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        x = torch.randn(self.n_models, self.samples, 5, generator=generator)
        noise = torch.randn(self.n_models, self.samples, 1, generator=generator)
        y = x[..., :1] * 0.5 - x[..., 1:2] * 0.25 + 0.1 * noise
        return x.to(self.device), y.to(self.device)

    def train_epoch(self, epoch: int, models: slice | torch.Tensor | None = None) -> None:
        """One SGD step on every model (or only the rows ``models``), in place."""
        x, y = self.data(epoch)
        if models is None:
            params, buffers = self.params, self.buffers
        else:
            params = {n: p[models] for n, p in self.params.items()}
            buffers = {n: b[models] for n, b in self.buffers.items()}
            x, y = x[models], y[models]
        grads = self._step(params, buffers, x, y)
        with torch.no_grad():
            for name, g in grads.items():
                if models is None:
                    self.params[name].sub_(self.lr * g)
                else:
                    self.params[name][models] = params[name] - self.lr * g

    def modelset(self) -> ModelSet:
        """The fleet as a ModelSet that shares its tensors: what a checkpoint saves, or a resume fills."""
        return ModelSet.from_stacked(self.params, self.buffers, module="mmpack.workloads.models:FFNN")

"""Run every model of a ModelSet in one vectorised call (torch.func)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmpack.modelset import ModelSet

__all__ = ["vmap_call"]


def vmap_call(
    module: nn.Module,
    models: ModelSet,
    *args: Any,
    batched_args: bool = False,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    **kwargs: Any,
) -> Any:
    """vmap_call(module, models, *args) -> outputs stacked over models

    Evaluate all models at once: ``torch.func.functional_call`` of ``module``
    (any instance of the architecture, used as a skeleton; its own weights are
    ignored) with each model's parameters and buffers, under ``torch.vmap``.

    ``args`` are shared by all models, or, with ``batched_args=True``, carry a
    leading ``n_models`` dimension (one input per model). ``chunk_size`` bounds
    memory as in ``torch.vmap``; ``device`` moves the stacked tensors first.
    Modules whose forward mutates buffers (BatchNorm in training mode) cannot
    be vmapped: call ``module.eval()`` first.

    Example::

        ms = mmpack.ModelSet.from_modules(models)
        y = mmpack.vmap_call(models[0], ms, x)  # y[i] == models[i](x)
    """
    params, buffers = models.params, models.buffers
    if device is not None:
        params = {n: t.to(device) for n, t in params.items()}
        buffers = {n: t.to(device) for n, t in buffers.items()}

    def one_model(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], *a: Any) -> Any:
        return torch.func.functional_call(module, (p, b), a, kwargs)

    in_dims = (0, 0, *([0 if batched_args else None] * len(args)))
    return torch.vmap(one_model, in_dims=in_dims, chunk_size=chunk_size)(params, buffers, *args)

"""A synthetic fleet of FFNN-48 models, made slice by slice (bench/fleet.py and ``mmpack demo --fleet``).

Training a million cell models takes hours; saving and recovering them does
not care how the weights were found. Each slice of models is drawn from
normal(0, 0.1) with a generator seeded by the slice's first model, so a slice
is made again bit for bit from its first model and size alone, and a stream
of slices never holds more than one.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from mmpack.architecture import Architecture
from mmpack.modelset import ModelSet
from mmpack.workloads.models import ffnn48

ARCHITECTURE = Architecture.from_module(ffnn48())
CHANGED = ("fc3.weight", "fc3.bias")  # what an update cycle retrains: one layer
EVERY = 100  # an update cycle touches every 100th model: 1 % of the fleet


def make_slice(first: int, count: int, changed: bool = False) -> ModelSet:
    """make_slice(first, count, changed=False) -> ModelSet

    Models ``first`` to ``first + count - 1`` of the fleet; with ``changed``,
    as after an update cycle: every 100th model's ``fc3`` nudged.

    Example::

        part = make_slice(50_000, 50_000)     # 1 GB of float32
    """
    generator = torch.Generator().manual_seed(first)
    tensors = {}
    for spec in ARCHITECTURE.tensors:
        t = torch.from_numpy(np.empty(count * spec.numel, np.float32)).view(count, *spec.shape)
        tensors[spec.name] = t.normal_(0.0, 0.1, generator=generator)
    if changed:
        picked = torch.from_numpy(np.flatnonzero((np.arange(first, first + count) % EVERY) == 0))
        for name in CHANGED:
            tensors[name][picked] += 0.001
    return ModelSet._trusted(ARCHITECTURE, tensors, count)


def slices(n_models: int, slice_models: int, changed: bool = False) -> Iterator[tuple[int, ModelSet]]:
    """``(first, models)`` slices of a fleet of ``n_models``, made one at a time.

    Example::

        vid = repo.save_stream(slices(1_000_000, 50_000))
    """
    for first in range(0, n_models, slice_models):
        part = make_slice(first, min(slice_models, n_models - first), changed)
        yield first, part
        del part  # the generator holds one slice


def model(k: int, n_models: int, slice_models: int, changed: bool = False) -> ModelSet:
    """Model ``k`` as :func:`slices` made it (its whole slice is made again)."""
    first = k - k % slice_models
    return make_slice(first, min(slice_models, n_models - first), changed).select([k - first])


def changed_models(n_models: int) -> np.ndarray:
    """The models an update cycle changes."""
    return np.arange(0, n_models, EVERY)


__all__ = ["ARCHITECTURE", "CHANGED", "EVERY", "changed_models", "make_slice", "model", "slices"]

"""The paper's update cycles (U3) as perturbations of a ModelSet, for storage and timing studies.

Each cycle retrains a fraction of the models: half of them fully (every
tensor changes), half partially (only the last layers change, the first are
frozen). "Retraining" here is a small deterministic perturbation, which is all
storage, save and recovery times depend on; the battery workload trains for
real where provenance needs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mmpack.modelset import ModelSet

# Tensors a partial update retrains, by architecture: the paper's fc3 and fc4
# for the FFNNs; the last convolution block and the classifier for the CNN.
PARTIAL_PREFIXES = {"FFNN": ("fc3.", "fc4."), "SmallCNN": ("conv3.", "bn3.", "fc.")}


@dataclass(frozen=True)
class Cycle:
    """Which models one cycle retrained."""

    full: np.ndarray
    partial: np.ndarray


def u3_cycle(
    models: ModelSet, rate: float, seed: int, partial_prefixes: tuple[str, ...] | None = None
) -> tuple[ModelSet, Cycle]:
    """u3_cycle(models, rate, seed) -> (new ModelSet, Cycle)

    Retrain ``rate`` of the models: ``rate / 2`` fully, ``rate / 2`` partially.

    Example::

        ms2, cycle = u3_cycle(ms, 0.10, seed=1)  # 250 full + 250 partial of 5,000
    """
    rng = np.random.default_rng(seed)
    n = len(models)
    chosen = rng.choice(n, int(round(rate * n)), replace=False)
    half = len(chosen) // 2
    cycle = Cycle(np.sort(chosen[:half]), np.sort(chosen[half:]))
    prefixes = partial_prefixes if partial_prefixes is not None else _partial_prefixes(models)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, t in models.tensors.items():
        t = t.clone()
        retrained = cycle.full if not name.startswith(prefixes) else np.concatenate([cycle.full, cycle.partial])
        if t.dtype.is_floating_point and len(retrained):
            rows = torch.from_numpy(retrained)
            noise = torch.randn((len(rows), *t.shape[1:]), generator=generator, dtype=torch.float32) * 1e-3
            t[rows] = (t[rows].float() + noise).to(t.dtype)
        elif len(retrained):  # integer buffers such as BatchNorm's step counter
            t[torch.from_numpy(retrained)] += 1
        tensors[name] = t
    return ModelSet(models.architecture, tensors), cycle


def _partial_prefixes(models: ModelSet) -> tuple[str, ...]:
    module = models.architecture.module or ""
    return PARTIAL_PREFIXES.get(module.rpartition(":")[2], ())

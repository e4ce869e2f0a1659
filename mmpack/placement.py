"""Loads and recoveries onto a device or into existing tensors, through :mod:`mmpack.staging`.

One driver serves ``mmpack.load`` and ``Repository.recover``: the caller says
how to read sorted models into contiguous host tensors (and check them), and
the driver reads either straight into the caller's tensors (a whole set into
contiguous host tensors) or a chunk of models at a time into staging buffers,
copied to their rows once checked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch

from mmpack.architecture import Architecture
from mmpack.modelset import ModelSet, normalize_indices, out_tensors
from mmpack.staging import check_device, direct_target, place

Read = Callable[[np.ndarray, dict[str, torch.Tensor]], object]
Out = ModelSet | Mapping[str, torch.Tensor]


def place_models(
    architecture: Architecture,
    n_models: int,
    indices: Iterable[int] | None,
    out: Out | None,
    device: torch.device | None,
    read: Read,
    *,
    chunk_bytes: int | None = None,
    what: str,
) -> Out:
    """The models ``indices`` (None: all ``n_models``) of a set read by ``read(models, tensors)``,
    placed into ``out`` (returned; only the rows of those models change) or into fresh tensors on
    ``device`` (a ModelSet, models in the order asked for). ``out`` is checked against
    ``architecture`` and ``n_models`` (named ``what`` in errors) before anything is read."""
    targets = out_tensors(out, architecture, n_models, what) if out is not None else None
    check_device(targets, device)
    wanted = np.arange(n_models) if indices is None else normalize_indices(indices, n_models)
    models, inverse = np.unique(wanted, return_inverse=True)
    if targets is not None:
        if indices is None and direct_target(targets):
            read(models, targets)
        else:
            place(models, read, targets, models, architecture, chunk_bytes)
        return out
    fresh = {s.name: torch.empty((len(models), *s.shape), dtype=s.dtype, device=device) for s in architecture.tensors}
    place(models, read, fresh, np.arange(len(models)), architecture, chunk_bytes)
    placed = ModelSet._trusted(architecture, fresh, len(models))
    return placed if np.array_equal(models, wanted) else placed.select(inverse)

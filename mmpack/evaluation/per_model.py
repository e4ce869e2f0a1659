"""The per-model pattern of existing model managers (the paper's MMLib-base), as a reference.

Every model of every version becomes one ``torch.save`` file of its
state_dict plus one JSON metadata document (architecture, layer names,
environment), the way single-model managers store a model.
"""

from __future__ import annotations

import json
import os

import torch

from mmpack.modelset import ModelSet
from mmpack.provenance import capture_environment


def save_per_model(models: ModelSet, directory: str) -> int:
    """Write one weights file and one metadata file per model; return the bytes written."""
    os.makedirs(directory, exist_ok=True)
    metadata = {
        "architecture": models.architecture.to_json(),
        "layers": list(models.architecture.names),
        "environment": capture_environment(),
    }
    written = 0
    for i in range(len(models)):
        weights = os.path.join(directory, f"model-{i:06d}.pt")
        # clone: a row of a stacked tensor would drag the whole stacked storage into the file
        torch.save({name: t[i].clone() for name, t in models.tensors.items()}, weights)
        document = os.path.join(directory, f"model-{i:06d}.json")
        with open(document, "w") as f:
            json.dump({**metadata, "model": i, "weights": os.path.basename(weights)}, f)
        written += os.path.getsize(weights) + os.path.getsize(document)
    return written


def load_per_model(directory: str, indices: list[int]) -> list[dict[str, torch.Tensor]]:
    """Read the metadata and weights of the given models back (state_dicts, in order)."""
    out = []
    for i in indices:
        with open(os.path.join(directory, f"model-{i:06d}.json")) as f:
            json.load(f)
        out.append(torch.load(os.path.join(directory, f"model-{i:06d}.pt"), weights_only=True))
    return out

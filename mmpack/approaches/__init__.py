"""The ways a version can be stored; each is a small module behind one interface."""

from mmpack.approaches.base import Approach, SaveRequest, Stored
from mmpack.approaches.baseline import Baseline
from mmpack.approaches.provenance import DefaultPool, ProvenanceApproach, RebuildContext
from mmpack.approaches.update import Update

APPROACHES: dict[str, Approach] = {a.name: a for a in (Baseline(), Update(), ProvenanceApproach())}

__all__ = [
    "APPROACHES",
    "Approach",
    "Baseline",
    "DefaultPool",
    "ProvenanceApproach",
    "RebuildContext",
    "SaveRequest",
    "Stored",
    "Update",
]

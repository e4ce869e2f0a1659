"""The ways a version can be stored; each is a small module behind one interface."""

from mmpack.approaches.base import Approach, SaveRequest, Stored
from mmpack.approaches.baseline import Baseline
from mmpack.approaches.update import Update

APPROACHES: dict[str, Approach] = {a.name: a for a in (Baseline(), Update())}

__all__ = ["APPROACHES", "Approach", "Baseline", "SaveRequest", "Stored", "Update"]

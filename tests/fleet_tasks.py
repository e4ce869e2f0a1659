"""Tasks the parallel-writer tests send to Dask workers (importable there), and stores that fail on cue.

Slices are made from a seed and their first model, so a worker makes its own
slice and the test makes the same one to compare.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch

from mmpack import Architecture, ModelSet
from mmpack.repository import Receipt, WriteHandle
from mmpack.store import LocalStore
from mmpack.workloads import ffnn48

ARCHITECTURE = Architecture.from_module(ffnn48())


def make_slice(first: int, count: int, seed: int = 0) -> ModelSet:
    """Models ``first`` to ``first + count - 1`` of a set: each model's values depend on its id alone."""
    tensors = {}
    for j, spec in enumerate(ARCHITECTURE.tensors):
        rows = [torch.Generator().manual_seed(seed * 1_000_003 + (first + k) * 31 + j) for k in range(count)]
        tensors[spec.name] = torch.stack([torch.randn(spec.shape, generator=g) for g in rows]) if count else \
            torch.empty((0, *spec.shape))
    return ModelSet(ARCHITECTURE, tensors)


def changed_slice(first: int, count: int, every: int = 3) -> ModelSet:
    """``make_slice`` with every ``every``-th model's last layer nudged (an update cycle)."""
    ms = make_slice(first, count)
    tensors = {n: t.clone() for n, t in ms.tensors.items()}
    ids = np.arange(first, first + count)
    picked = torch.from_numpy(np.flatnonzero(ids % every == 0))
    tensors["fc4.weight"][picked] += 0.5
    return ModelSet(ARCHITECTURE, tensors)


def write_slice(handle: WriteHandle, first: int, count: int, changed: bool = False) -> Receipt:
    return handle.write(first, changed_slice(first, count) if changed else make_slice(first, count))


def recover_hashes(handle, first: int, stop: int) -> np.ndarray:
    """What a worker recovering its slice sends back: the slice's hashes (not its bytes)."""
    return handle.recover(range(first, stop)).hashes()


@dataclasses.dataclass
class DyingStore(LocalStore):
    """A local store whose process dies in the middle of writing the ``die_at``-th object it writes,
    once (the marker file says it happened), as a worker killed mid-write would."""

    root: str
    fsync: bool
    marker: str
    die_at: int = 2

    def put(self, key, data):
        if not key.startswith("objects/") or os.path.exists(self.marker):
            return super().put(key, data)
        _PUTS[self.marker] = _PUTS.get(self.marker, 0) + 1
        if _PUTS[self.marker] < self.die_at:
            return super().put(key, data)
        open(self.marker, "w").close()

        def half_then_die(f):
            f.write(b"\x89MMPACK\n" + bytes(4096))  # a temporary, half written, never published
            f.flush()
            os._exit(1)

        return super().put(key, half_then_die)


_PUTS: dict[str, int] = {}


def write_then_fail(handle: WriteHandle, first: int, count: int, marker: str, changed: bool = False) -> Receipt:
    """Write the slice, then fail once (the result lost, as when a worker's reply never arrives):
    the retry writes it again, under new keys."""
    receipt = write_slice(handle, first, count, changed)
    if not os.path.exists(marker):
        open(marker, "w").close()
        raise ConnectionError("the reply was lost")
    return receipt


def dying(handle: WriteHandle, marker: str, die_at: int = 2) -> WriteHandle:
    """The handle, writing through a store that kills its process mid-write once."""
    return dataclasses.replace(handle, store=DyingStore(handle.store.root, False, marker, die_at))

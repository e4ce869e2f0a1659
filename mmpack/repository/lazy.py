"""A version as a ModelSet that reads its data when it is touched, verifying every piece as it lands.

``Repository.recover_lazy(vid)`` gives a :class:`LazyModelSet`. Opening it
reads nothing but the catalog. What is read, and when:

* ``select(indices)`` (and ``len``, ``architecture``, ``nbytes``, which need
  no data): only the shards and rows of those models;
* the first access to a stacked tensor (``ms.tensors[name]``, ``params``,
  ``buffers``, ``to_modules``, ``hashes``, ``equal``...): that tensor of every
  model, kept in memory for the next access;
* ``verify()``: the whole version, slice by slice, nothing kept.

Every piece is checked against its hash as it is read (positioned reads, no
memory maps: a file changed underneath gives a typed error, never a
crash), so corruption is reported when the damaged piece is touched, or by
``verify()``, and never returned.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping

import torch

from mmpack.modelset import ModelSet, normalize_indices
from mmpack.repository import executor
from mmpack.repository.catalog.tables import Tables
from mmpack.repository.planner import plan_recovery
from mmpack.repository.slices import recover_slices


class _Tensors(Mapping):
    """The stacked tensors of a version, each read (and verified) on its first access."""

    def __init__(self, tables: Tables, vid: str, names: tuple[str, ...]) -> None:
        self._tables = tables
        self._vid = vid
        self._names = names
        self._loaded: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> torch.Tensor:
        found = self._loaded.get(name)
        if found is not None:
            return found
        if name not in self._names:
            raise KeyError(name)
        with self._lock:
            if name not in self._loaded:
                plan = plan_recovery(self._tables, self._vid, None, [self._names.index(name)])
                _, tensors = executor.execute_tensors(self._tables, plan)
                self._loaded[name] = tensors[name]
            return self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    @property
    def loaded(self) -> tuple[str, ...]:
        return tuple(n for n in self._names if n in self._loaded)


class LazyModelSet(ModelSet):
    """A :class:`ModelSet` of a repository version whose data is read when touched (module docstring).

    Example::

        fleet = repo.recover_lazy("v3")
        len(fleet)                           # no data read
        two = fleet.select([5, 999_999])     # a ModelSet of two models, read and verified
        fleet.verify()                       # every piece, slice by slice
    """

    __slots__ = ("_slice_models", "_tables", "_vid")

    @classmethod
    def of_version(cls, tables: Tables, vid: str, slice_bytes: int) -> LazyModelSet:
        record = tables.catalog.record(vid)
        architecture = tables.catalog.architecture(record.architecture)
        self = cls.__new__(cls)
        self._architecture = architecture
        self._n_models = record.n_models
        self._tensors = _Tensors(tables, vid, architecture.names)
        self._tables = tables
        self._vid = vid
        self._slice_models = max(1, slice_bytes // max(1, architecture.nbytes_per_model))
        return self

    @property
    def version(self) -> str:
        """The version id."""
        return self._vid

    @property
    def loaded(self) -> tuple[str, ...]:
        """Names of the tensors read so far."""
        return self._tensors.loaded

    def select(self, indices: Iterable[int]) -> ModelSet:
        """ms.select(indices) -> ModelSet: those models, read from their shards alone and verified.

        Example::

            fleet.select(range(1000, 2000))
        """
        wanted = normalize_indices(indices, self._n_models)
        return executor.recover(self._tables, self._vid, wanted)

    def slices(self, slice_models: int | None = None) -> Iterator[tuple[int, ModelSet]]:
        """``(first, models)`` of consecutive slices, each read when asked for (one slice in memory)."""
        return recover_slices(self._tables, self._vid, slice_models or self._slice_models)

    def verify(self) -> None:
        """Read every piece of the version, slice by slice, and check it against its hash; raise
        :class:`~mmpack.IntegrityError` naming the first bad piece. Nothing is kept in memory.

        Example::

            fleet.verify()
        """
        for _ in self.slices():
            pass

    def __repr__(self) -> str:
        return (f"LazyModelSet({self._vid}, n_models={self._n_models}, tensors={len(self._architecture)}, "
                f"loaded={len(self.loaded)})")

    def __reduce__(self):
        raise TypeError("a LazyModelSet reads through its repository; send repo.read_handle(vid) to other processes")

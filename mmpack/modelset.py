"""ModelSet: a set of same-architecture models as one stacked tensor per name."""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from mmpack import packing
from mmpack.architecture import Architecture, TensorSpec
from mmpack.errors import ArchitectureMismatchError, MMPackError, ModelIndexError

__all__ = ["ModelSet"]


class ModelSet:
    """``n_models`` models of one architecture, stacked: one ``[n_models, *shape]`` tensor per name.

    This is mmpack's fast path. Saving, hashing, selecting and recovering work
    on these few large tensors instead of thousands of modules; ``to_modules``
    builds modules only for callers that need them.

    Example::

        models = [mmpack.workloads.ffnn48() for _ in range(1000)]
        ms = mmpack.ModelSet.from_modules(models)
        len(ms)                        # 1000
        ms.tensors["fc2.weight"].shape # torch.Size([1000, 48, 48])
        two = ms.select([3, 17])       # a ModelSet of models 3 and 17
    """

    __slots__ = ("_architecture", "_n_models", "_tensors")

    def __init__(self, architecture: Architecture, tensors: Mapping[str, torch.Tensor]) -> None:
        """Wrap stacked CPU tensors, checking them against ``architecture``.

        ``tensors`` maps every name of the architecture to a ``[n_models, *shape]``
        tensor of the architecture's dtype. Non-contiguous tensors are copied;
        autograd history is dropped.
        """
        missing = [n for n in architecture.names if n not in tensors]
        extra = [n for n in tensors if n not in set(architecture.names)]
        if missing or extra:
            raise ArchitectureMismatchError(
                f"stacked tensors do not match the architecture: missing {missing}, unexpected {extra}"
            )
        n_models = None
        stacked: dict[str, torch.Tensor] = {}
        for spec in architecture.tensors:
            t = tensors[spec.name]
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"tensor {spec.name!r} must be a torch.Tensor, got {type(t).__name__}")
            if n_models is None:
                n_models = t.shape[0] if t.dim() > 0 else -1
            if tuple(t.shape) != (n_models, *spec.shape) or t.dtype != spec.dtype:
                raise ArchitectureMismatchError(
                    f"stacked {spec.kind} {spec.name!r} has shape {tuple(t.shape)} and dtype {t.dtype}; "
                    f"expected {(n_models, *spec.shape)} and {spec.dtype}"
                )
            if not t.is_cpu:
                raise MMPackError(
                    f"stacked tensor {spec.name!r} is on {t.device}; a ModelSet holds host tensors "
                    "(ModelSet.from_modules copies accelerator models to the host for you)"
                )
            stacked[spec.name] = t.detach().contiguous()
        self._architecture = architecture
        self._n_models = n_models if n_models is not None else 0
        self._tensors = stacked

    # -- construction -----------------------------------------------------

    @classmethod
    def from_modules(cls, models: Sequence[nn.Module]) -> ModelSet:
        """ModelSet.from_modules(models) -> ModelSet

        Stack the parameters and persistent buffers of same-architecture modules.
        The copy runs in one native gather (threads, GIL released); models on an
        accelerator are stacked on their device and copied to the host once per
        tensor name. Raises :class:`ArchitectureMismatchError` naming the first
        model and tensor that differ from model 0.

        Example::

            ms = ModelSet.from_modules([nn.Linear(4, 2) for _ in range(3)])
            ms.tensors["weight"].shape  # torch.Size([3, 2, 4])
        """
        return cls._from_modules_hashed(models)[0]

    @classmethod
    def _from_modules_hashed(cls, models: Sequence[nn.Module]) -> tuple[ModelSet, np.ndarray | None]:
        """:meth:`from_modules`, also returning the hashes the gather computed (None on accelerators)."""
        models = list(models)
        if not models:
            raise MMPackError("from_modules needs at least one model")
        if not all(isinstance(m, nn.Module) for m in models):
            bad = next(i for i, m in enumerate(models) if not isinstance(m, nn.Module))
            raise TypeError(f"model {bad} is a {type(models[bad]).__name__}, not an nn.Module")
        architecture = Architecture.from_module(models[0])
        layout = packing.ModuleLayout(models[0], architecture)
        with packing.gc_paused():
            tensors = layout.tensors_of(models)
            device = packing.check_columns(tensors, architecture, len(models))
            if device.type == "cpu":
                stacked, hashes = packing.gather_modules(tensors, architecture, len(models))
            else:
                stacked, hashes = packing.stack_on_device(tensors, architecture, len(models)), None
        return cls._trusted(architecture, stacked, len(models)), hashes

    @classmethod
    def from_stacked(
        cls,
        params: Mapping[str, torch.Tensor],
        buffers: Mapping[str, torch.Tensor] | None = None,
        module: str | None = None,
    ) -> ModelSet:
        """ModelSet.from_stacked(params, buffers=None) -> ModelSet

        Wrap stacked tensors such as those of ``torch.func.stack_module_state``;
        the architecture is read off their shapes (``shape[1:]``), parameters first.

        Example::

            params, buffers = torch.func.stack_module_state(models)
            ms = ModelSet.from_stacked(params, buffers)
        """
        buffers = buffers or {}
        specs = [TensorSpec(n, "parameter", t.dtype, tuple(t.shape[1:])) for n, t in params.items()]
        specs += [TensorSpec(n, "buffer", t.dtype, tuple(t.shape[1:])) for n, t in buffers.items()]
        return cls(Architecture(tuple(specs), module), {**params, **buffers})

    @classmethod
    def _trusted(cls, architecture: Architecture, tensors: dict[str, torch.Tensor], n_models: int) -> ModelSet:
        """Wrap tensors mmpack itself made (right shapes, contiguous, on the host) without checks."""
        self = cls.__new__(cls)
        self._architecture = architecture
        self._n_models = n_models
        self._tensors = tensors
        return self

    # -- views ------------------------------------------------------------

    @property
    def architecture(self) -> Architecture:
        """The shared :class:`Architecture`."""
        return self._architecture

    @property
    def n_models(self) -> int:
        """Number of models; same as ``len(ms)``."""
        return self._n_models

    def __len__(self) -> int:
        return self._n_models

    @property
    def tensors(self) -> Mapping[str, torch.Tensor]:
        """All stacked tensors by name, in architecture order (read-only mapping)."""
        return types.MappingProxyType(self._tensors)

    @property
    def params(self) -> dict[str, torch.Tensor]:
        """Stacked parameters by name, ready for ``torch.func.functional_call``."""
        return {s.name: self._tensors[s.name] for s in self._architecture.tensors if s.kind == "parameter"}

    @property
    def buffers(self) -> dict[str, torch.Tensor]:
        """Stacked persistent buffers by name (BatchNorm running statistics...)."""
        return {s.name: self._tensors[s.name] for s in self._architecture.tensors if s.kind == "buffer"}

    @property
    def nbytes(self) -> int:
        """Bytes of all tensors of all models."""
        return self._n_models * self._architecture.nbytes_per_model

    def __repr__(self) -> str:
        return (
            f"ModelSet(n_models={self._n_models}, tensors={len(self._architecture)}, "
            f"bytes={self.nbytes}, module={self._architecture.module!r})"
        )

    # -- operations -------------------------------------------------------

    def to_modules(self, factory: Callable[[], nn.Module]) -> list[nn.Module]:
        """ms.to_modules(factory) -> list[nn.Module]

        Build ``len(ms)`` modules with ``factory()`` and copy each model's
        tensors into them (native scatter for host modules). Slow by nature:
        building a module costs far more than copying its weights.

        Example::

            models = ms.to_modules(lambda: nn.Linear(4, 2))
        """
        models = [factory() for _ in range(self._n_models)]
        self.load_into(models)
        return models

    def load_into(self, models: Sequence[nn.Module]) -> None:
        """ms.load_into(models) -> None

        Copy model i's tensors into the existing module ``models[i]``, in place
        (like ``load_state_dict`` for every model, in one native scatter).
        Reusing modules this way skips their construction, the slow part of
        :meth:`to_modules`.

        Example::

            ms.select([3, 17]).load_into([cell_a, cell_b])
        """
        models = list(models)
        if len(models) != self._n_models:
            raise ArchitectureMismatchError(f"got {len(models)} modules for a set of {self._n_models} models")
        if not models:
            return
        theirs = Architecture.from_module(models[0])
        difference = theirs.difference(self._architecture)
        if difference is not None:
            raise ArchitectureMismatchError(f"modules are unlike this model set: {difference}")
        layout = packing.ModuleLayout(models[0], theirs)
        with packing.gc_paused():
            targets = layout.tensors_of(models)
            packing.check_columns(targets, self._architecture, self._n_models)  # sizes guard the raw writes
            packing.scatter_to_modules(self._tensors, self._architecture, targets, self._n_models)

    def select(self, indices: Iterable[int]) -> ModelSet:
        """ms.select(indices) -> ModelSet

        A new ModelSet holding copies of the given models, in the given order.

        Example::

            ms.select([3, 17]).n_models  # 2
        """
        index = torch.from_numpy(normalize_indices(indices, self._n_models))
        selected = {
            spec.name: torch.index_select(
                self._tensors[spec.name], 0, index, out=packing.empty_stacked(len(index), spec)
            )
            for spec in self._architecture.tensors
        }
        return ModelSet._trusted(self._architecture, selected, len(index))

    def hashes(self) -> np.ndarray:
        """ms.hashes() -> numpy.ndarray

        XXH3-64 of every (model, tensor) slice as uint64 ``[n_models, n_tensors]``,
        columns in architecture order. Computed afresh on every call (one pass
        over the bytes, multi-threaded), so it always describes the current values.

        Example::

            h = ms.hashes()
            changed = (h != base.hashes()).any(axis=1)  # which models changed
        """
        return packing.hash_stacked(self._tensors, self._architecture, self._n_models)

    def equal(self, other: ModelSet) -> bool:
        """True when ``other`` has the same architecture and bit-identical tensors."""
        if not isinstance(other, ModelSet) or self._architecture.difference(other._architecture) is not None:
            return False
        if self._n_models != other._n_models:
            return False
        return all(
            np.array_equal(packing.byte_view(self._tensors[n]), packing.byte_view(other._tensors[n]))
            for n in self._architecture.names
        )


def normalize_indices(indices: Iterable[int], n_models: int) -> np.ndarray:
    """Model indices as an int64 array, each checked to lie in ``[0, n_models)``."""
    if isinstance(indices, torch.Tensor):
        indices = indices.tolist()
    values = list(indices) if not isinstance(indices, np.ndarray) else indices
    array = np.asarray(values)
    if array.dtype.kind == "f" and not isinstance(values, np.ndarray):
        # Python ints beyond int64 next to others may make numpy choose float64: look at them as they are.
        array = np.asarray(values, dtype=object)
    if array.ndim == 1 and array.dtype == object:
        # Python ints beyond int64 (numpy keeps them as objects): name the first one out of range.
        for value in array:
            if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and not 0 <= value < n_models:
                raise ModelIndexError(f"model index {value} out of range: the set has {n_models} models (0..{n_models - 1})")
    elif array.ndim == 1 and array.dtype.kind == "u" and array.size and int(array.max()) >= n_models:
        bad = int(array[array >= n_models][0])  # before the cast to int64, which would wrap it negative
        raise ModelIndexError(f"model index {bad} out of range: the set has {n_models} models (0..{n_models - 1})")
    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise ModelIndexError(f"model indices must be a flat sequence of integers, got {array.dtype} {array.shape}")
    array = array.astype(np.int64, copy=False)
    if array.size and (array.min() < 0 or array.max() >= n_models):
        bad = int(array[(array < 0) | (array >= n_models)][0])
        raise ModelIndexError(f"model index {bad} out of range: the set has {n_models} models (0..{n_models - 1})")
    return array

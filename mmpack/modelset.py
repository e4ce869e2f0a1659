"""ModelSet: a set of same-architecture models as one stacked tensor per name."""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from mmpack import packing, staging
from mmpack._gc import gc_paused
from mmpack.architecture import Architecture, TensorSpec
from mmpack.errors import ArchitectureMismatchError, InvalidArgumentError, MMPackError, ModelIndexError

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
        """Wrap stacked tensors, checking them against ``architecture``.

        ``tensors`` maps every name of the architecture to a ``[n_models, *shape]``
        tensor of the architecture's dtype, all on one device (the host or an
        accelerator). Contiguous tensors are used as they are (the set shares
        their memory); non-contiguous ones are copied; autograd history is dropped.
        """
        missing = [n for n in architecture.names if n not in tensors]
        extra = [n for n in tensors if n not in set(architecture.names)]
        if missing or extra:
            raise ArchitectureMismatchError(
                f"stacked tensors do not match the architecture: missing {missing}, unexpected {extra}"
            )
        n_models = None
        device = None
        stacked: dict[str, torch.Tensor] = {}
        for spec in architecture.tensors:
            t = tensors[spec.name]
            if n_models is None and isinstance(t, torch.Tensor):
                n_models = t.shape[0] if t.dim() > 0 else -1
            _check_stacked(t, spec, n_models, f"stacked {spec.kind} {spec.name!r}", "expected")
            if stacked and t.device != device:
                raise InvalidArgumentError(
                    f"stacked tensor {spec.name!r} is on {t.device}, {architecture.tensors[0].name!r} on {device}: "
                    "a ModelSet holds all its tensors on one device (move them with .to(device))"
                )
            device = t.device
            stacked[spec.name] = t.detach().contiguous()
        self._architecture = architecture
        self._n_models = n_models if n_models is not None else 0
        self._tensors = stacked

    # -- construction -----------------------------------------------------

    @classmethod
    def from_modules(cls, models: Sequence[nn.Module]) -> ModelSet:
        """ModelSet.from_modules(models) -> ModelSet

        Stack the parameters and persistent buffers of same-architecture modules:
        one walk over the modules (the module tree is learnt from model 0), one
        ``torch.stack`` per tensor name. Models on an accelerator are stacked
        on their device, and the set stays there (see :meth:`to`). Raises
        :class:`ArchitectureMismatchError` naming the first model and tensor
        that differ from model 0, or a model whose tensors lie on another
        device than model 0's.

        Example::

            ms = ModelSet.from_modules([nn.Linear(4, 2) for _ in range(3)])
            ms.tensors["weight"].shape  # torch.Size([3, 2, 4])
        """
        models = list(models)
        if not models:
            raise MMPackError("from_modules needs at least one model")
        if not all(isinstance(m, nn.Module) for m in models):
            bad = next(i for i, m in enumerate(models) if not isinstance(m, nn.Module))
            raise TypeError(f"model {bad} is a {type(models[bad]).__name__}, not an nn.Module")
        architecture = Architecture.from_module(models[0])
        layout = packing.ModuleLayout(models[0], architecture)
        with gc_paused():
            stacked = packing.stack_columns(layout.tensors_of(models), architecture, len(models))
        return cls._trusted(architecture, stacked, len(models))

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
        The tensors may lie on an accelerator (all on one device); contiguous
        ones are shared, not copied, so a training loop that updates them in
        place is seen by the set.

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
        """Wrap tensors mmpack itself made (right shapes, contiguous, on one device) without checks."""
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
    def device(self) -> torch.device:
        """The device holding the tensors (``cpu`` for host memory)."""
        first = next(iter(self._tensors.values()), None)
        return first.device if first is not None else torch.device("cpu")

    @property
    def nbytes(self) -> int:
        """Bytes of all tensors of all models."""
        return self._n_models * self._architecture.nbytes_per_model

    def __repr__(self) -> str:
        where = "" if self.device.type == "cpu" else f", device={str(self.device)!r}"
        return (
            f"ModelSet(n_models={self._n_models}, tensors={len(self._architecture)}, "
            f"bytes={self.nbytes}, module={self._architecture.module!r}{where})"
        )

    # -- devices ----------------------------------------------------------

    def to(self, device: torch.device | str | int, *, chunk_bytes: int | None = None) -> ModelSet:
        """ms.to(device) -> ModelSet

        The same models on ``device`` (``"cuda"``, ``"cuda:1"``, ``"cpu"``...);
        ``self`` if they are there already. Between the host and an
        accelerator the bytes move through two pinned staging buffers of
        ``chunk_bytes`` (default :data:`mmpack.staging.CHUNK_BYTES`), copies
        overlapping the host's side of the work.

        Example::

            on_gpu = ms.to("cuda")         # train with torch.func on the device...
            repo.save(on_gpu, approach="update", base=vid)   # ...and save from there
        """
        target = staging.resolve_device(device)
        if target is None:
            raise InvalidArgumentError("to() needs a device")
        here = self.device
        if target == here:
            return self
        if here.type == "cpu":
            moved = staging.upload(self._tensors, self._architecture, self._n_models, target, chunk_bytes)
        elif target.type == "cpu":
            moved = self._download(chunk_bytes)[0]
        else:
            moved = {n: t.to(target) for n, t in self._tensors.items()}
        return ModelSet._trusted(self._architecture, moved, self._n_models)

    def _host(self, chunk_bytes: int | None = None) -> ModelSet:
        """This set in host memory (itself if it is there)."""
        return self if self.device.type == "cpu" else self.to("cpu", chunk_bytes=chunk_bytes)

    def _to_host_hashed(self, into: dict[str, torch.Tensor] | None = None,
                        chunk_bytes: int | None = None) -> tuple[ModelSet, np.ndarray]:
        """A host copy of this set (into the host tensors ``into``, when given) and its hashes: one
        pass, each row hashed as it lands, the device's copies overlapping the host's."""
        tensors, hashes = self._download(chunk_bytes, into, hashed=True)
        return ModelSet._trusted(self._architecture, tensors, self._n_models), hashes

    def _download(self, chunk_bytes: int | None, into: dict[str, torch.Tensor] | None = None,
                  *, hashed: bool = False) -> tuple[dict[str, torch.Tensor], np.ndarray | None]:
        specs = self._architecture.tensors
        if into is None:
            into = {s.name: packing.empty_stacked(self._n_models, s) for s in specs}
        destinations = [packing.byte_view(into[s.name]) for s in specs]
        by_tensor = np.empty((len(specs), self._n_models), dtype=np.uint64) if hashed else None
        U64 = np.uint64

        def consume(j: int, first: int, count: int, chunk: np.ndarray) -> None:
            size = specs[j].nbytes
            if by_tensor is None:
                np.copyto(destinations[j][first * size : (first + count) * size], chunk)
                return
            starts = np.arange(count, dtype=U64) * U64(size)
            packing.copy_rows(chunk, starts, destinations[j], starts + U64(first * size), size,
                              by_tensor[j, first : first + count])

        staging.download([self._tensors[s.name] for s in specs], [s.nbytes for s in specs], consume, chunk_bytes)
        if by_tensor is not None:
            for j in (j for j, s in enumerate(specs) if s.nbytes == 0):
                packing.hash_empty_rows(by_tensor[j])
        return into, None if by_tensor is None else np.ascontiguousarray(by_tensor.T)

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
        source = self._host()  # the native scatter reads host bytes; device modules take copies from there
        with gc_paused():
            targets = layout.tensors_of(models)
            packing.check_columns(targets, self._architecture, self._n_models)  # sizes guard the raw writes
            packing.scatter_to_modules(source._tensors, self._architecture, targets, self._n_models)

    def select(self, indices: Iterable[int]) -> ModelSet:
        """ms.select(indices) -> ModelSet

        A new ModelSet holding copies of the given models, in the given order.

        Example::

            ms.select([3, 17]).n_models  # 2
        """
        index = torch.from_numpy(normalize_indices(indices, self._n_models))
        device = self.device
        if not staging.is_host(device):
            index = index.to(device)
            selected = {n: torch.index_select(t, 0, index) for n, t in self._tensors.items()}
        else:
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
        A set on an accelerator is hashed on the host as its chunks arrive.

        Example::

            h = ms.hashes()
            changed = (h != base.hashes()).any(axis=1)  # which models changed
        """
        if not staging.is_host(self.device):
            return self._hash_on_host()
        return packing.hash_stacked(self._tensors, self._architecture, self._n_models)

    def _hash_on_host(self, chunk_bytes: int | None = None) -> np.ndarray:
        specs = self._architecture.tensors
        by_tensor = np.empty((len(specs), self._n_models), dtype=np.uint64)

        def consume(j: int, first: int, count: int, chunk: np.ndarray) -> None:
            packing.native_hash_rows(chunk, specs[j].nbytes, by_tensor[j, first : first + count])

        staging.download([self._tensors[s.name] for s in specs], [s.nbytes for s in specs], consume, chunk_bytes)
        for j in (j for j, s in enumerate(specs) if s.nbytes == 0):
            packing.hash_empty_rows(by_tensor[j])
        return np.ascontiguousarray(by_tensor.T)

    def equal(self, other: ModelSet) -> bool:
        """True when ``other`` has the same architecture and bit-identical tensors (on any devices)."""
        if not isinstance(other, ModelSet) or self._architecture.difference(other._architecture) is not None:
            return False
        if self._n_models != other._n_models:
            return False
        if self.device.type == "cpu" and other.device.type == "cpu":
            return all(
                np.array_equal(packing.byte_view(self._tensors[n]), packing.byte_view(other._tensors[n]))
                for n in self._architecture.names
            )
        theirs = other.to(self.device)
        return all(
            torch.equal(_bytes_of(self._tensors[n]), _bytes_of(theirs._tensors[n])) for n in self._architecture.names
        )


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a contiguous tensor, on its device (bitwise comparisons: NaN equals itself)."""
    return tensor.detach().reshape(-1).view(torch.uint8)


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
                raise ModelIndexError(
                    f"model index {value} out of range: the set has {n_models} models (0..{n_models - 1})"
                )
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


def out_tensors(out: object, architecture: Architecture, n_models: int, what: str) -> dict[str, torch.Tensor]:
    """The stacked tensors a load or recovery writes into: ``out`` (a ModelSet, or a mapping of every
    tensor name to its stacked tensor) checked against ``architecture`` and ``n_models`` before any
    byte moves; detached views of the caller's tensors, in architecture order.

    Raises :class:`ArchitectureMismatchError` for a name, shape, dtype or size
    that differs, :class:`InvalidArgumentError` for tensors on several devices or
    whose rows overlap in memory, ``TypeError`` for anything else.
    """
    if isinstance(out, ModelSet):
        difference = out.architecture.difference(architecture)
        if difference is not None:
            raise ArchitectureMismatchError(f"out= is unlike {what}: {difference}")
        if len(out) != n_models:
            raise ArchitectureMismatchError(f"out= holds {len(out)} models; {what} has {n_models}")
        return dict(out._tensors)
    if not isinstance(out, Mapping):
        raise TypeError(
            f"out= must be a ModelSet or a mapping of tensor names to stacked tensors, not {type(out).__name__}"
        )
    missing = [n for n in architecture.names if n not in out]
    extra = [n for n in out if n not in set(architecture.names)]
    if missing or extra:
        raise ArchitectureMismatchError(f"out= is unlike {what}: missing {missing}, unexpected {extra}")
    targets: dict[str, torch.Tensor] = {}
    for spec in architecture.tensors:
        t = out[spec.name]
        _check_stacked(t, spec, n_models, f"out[{spec.name!r}]", f"{what} has")
        if any(stride == 0 and size > 1 for stride, size in zip(t.stride(), t.shape)):
            raise InvalidArgumentError(f"out[{spec.name!r}] has elements that share memory (an expanded tensor)")
        targets[spec.name] = t.detach()
    devices = {t.device for t in targets.values()}
    if len(devices) > 1:
        raise InvalidArgumentError(f"out= holds tensors on several devices: {sorted(map(str, devices))}")
    return targets


def _check_stacked(t: object, spec: TensorSpec, n_models: int, label: str, against: str) -> None:
    """``t`` must be a tensor holding data, ``[n_models, *spec.shape]`` of ``spec.dtype``; ``label``
    names it in the error, ``against`` introduces what it should be."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{label} must be a torch.Tensor, not {type(t).__name__}")
    if tuple(t.shape) != (n_models, *spec.shape) or t.dtype != spec.dtype:
        raise ArchitectureMismatchError(
            f"{label} has shape {tuple(t.shape)} and dtype {t.dtype}; "
            f"{against} {(n_models, *spec.shape)} and {spec.dtype}"
        )
    if t.device.type == "meta":
        raise InvalidArgumentError(f"{label} is on the meta device, which holds no data")

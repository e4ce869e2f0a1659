"""Pack plans: where each (model, tensor) lives, turned into native calls.

Python decides what goes where (addresses, offsets, lengths); ``_native``
moves and hashes the bytes with the GIL released. Walking thousands of
modules is the expensive part of packing, so :class:`ModuleLayout` learns the
module tree once from the first model and then visits every model with plain
dict lookups, checking on the way that its structure is the same.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mmpack import _native
from mmpack.architecture import Architecture, TensorSpec
from mmpack.errors import ArchitectureMismatchError

_shape_dtype_cpu = operator.attrgetter("shape", "dtype", "is_cpu")
_dtype = operator.attrgetter("dtype")


def byte_view(tensor: torch.Tensor) -> np.ndarray:
    """The bytes of a contiguous CPU tensor as a flat uint8 array, without copying.

    Works for every dtype (bfloat16 has no numpy dtype, its bytes do).
    """
    flat = tensor.detach().reshape(-1)
    if flat.numel() == 0:
        return np.empty(0, dtype=np.uint8)
    return flat.view(torch.uint8).numpy()


# The dtypes numpy has: their tensors are made from a numpy array of that dtype directly, in a
# quarter of the time of a byte array viewed twice (a one-model read allocates every tensor).
_NUMPY_DTYPES = {
    torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16,
    torch.complex128: np.complex128, torch.complex64: np.complex64, torch.int64: np.int64,
    torch.int32: np.int32, torch.int16: np.int16, torch.int8: np.int8, torch.uint8: np.uint8, torch.bool: np.bool_,
}


def empty_stacked(n_models: int, spec: TensorSpec) -> torch.Tensor:
    """An uninitialised ``[n_models, *spec.shape]`` tensor for mmpack to fill.

    The memory comes from numpy, which asks Linux for transparent huge pages
    on large arrays: first-touching a fresh 100 MB buffer then costs about a
    fifth of what ``torch.empty`` memory does (measured on 2-core VMs), and
    every pack and load writes into fresh memory.
    """
    return empty_stacked_bytes(n_models, spec)[0]


def empty_stacked_bytes(n_models: int, spec: TensorSpec) -> tuple[torch.Tensor, np.ndarray]:
    """:func:`empty_stacked` and its bytes (what :func:`byte_view` gives), from one allocation.

    ``tensor, raw = empty_stacked_bytes(3, spec)``: ``raw`` is ``3 * spec.nbytes`` uint8
    bytes of ``tensor``'s own memory, ready for a reader to fill.
    """
    shape = (n_models, *spec.shape)
    numpy_dtype = _NUMPY_DTYPES.get(spec.dtype)
    if numpy_dtype is not None:
        array = np.empty(shape, numpy_dtype)
        return torch.from_numpy(array), array.reshape(-1).view(np.uint8)
    if n_models * spec.nbytes == 0:
        return torch.empty(shape, dtype=spec.dtype), np.empty(0, np.uint8)
    raw = np.empty(n_models * spec.nbytes, dtype=np.uint8)
    return torch.from_numpy(raw).view(spec.dtype).view(shape), raw


@dataclass(frozen=True)
class _ModuleStep:
    parent: int  # index of the parent in ModuleLayout.steps; -1 for the root
    key: str  # name in the parent's _modules
    signature: tuple[type, int, int, int]  # class, number of children, parameters, buffers
    path: str


@dataclass(frozen=True)
class _Slot:
    step: int  # which module holds the tensor
    attribute: str  # "_parameters" or "_buffers"
    key: str


class ModuleLayout:
    """The module tree of the first model, used to find tensors in all of them fast."""

    def __init__(self, reference: nn.Module, architecture: Architecture) -> None:
        self.architecture = architecture
        steps: list[_ModuleStep] = []
        index_of: dict[str, int] = {}
        slot_by_name: dict[str, _Slot] = {}
        for path, module in reference.named_modules(remove_duplicate=False):
            parent_path, _, key = path.rpartition(".")
            parent = index_of[parent_path] if path else -1
            index_of[path] = len(steps)
            steps.append(_ModuleStep(parent, key, _signature(module), path))
            dot = f"{path}." if path else ""
            for name in module._parameters:
                slot_by_name[dot + name] = _Slot(len(steps) - 1, "_parameters", name)
            for name in module._buffers:
                slot_by_name[dot + name] = _Slot(len(steps) - 1, "_buffers", name)
        self.steps = tuple(steps)
        self.slots = tuple(slot_by_name[spec.name] for spec in architecture.tensors)

    def tensors_of(self, models: Sequence[nn.Module]) -> list[torch.Tensor]:
        """Every model's state tensors, model-major: ``result[i * L + j]`` is tensor j of model i.

        Raises :class:`ArchitectureMismatchError` naming the first model whose
        module tree differs from the first model's.
        """
        # Plain tuples and locals: this loop runs once per model, thousands of times.
        links = [(s.parent, s.key) for s in self.steps[1:]]
        slots = [(s.step, s.attribute, s.key) for s in self.slots]
        signatures = [s.signature for s in self.steps]
        out: list[torch.Tensor] = []
        append = out.append
        for i, model in enumerate(models):
            modules = [model]
            try:
                for parent, key in links:
                    modules.append(modules[parent]._modules[key])
                # _signature, inlined: a call per module would cost a quarter of the walk.
                if [(type(m), len(m._modules), len(m._parameters), len(m._buffers)) for m in modules] != signatures:
                    raise KeyError
                for step, attribute, key in slots:
                    tensor = getattr(modules[step], attribute)[key]
                    if tensor is None:
                        raise KeyError
                    append(tensor)
            except (KeyError, AttributeError, TypeError):
                raise ArchitectureMismatchError(self._describe_tree_difference(i, model)) from None
        return out

    def _describe_tree_difference(self, i: int, model: nn.Module) -> str:
        reference = self.architecture
        try:
            theirs = Architecture.from_module(model)
        except Exception as exc:  # a model so broken that it cannot be walked
            return f"model {i} cannot be read like model 0: {exc}"
        difference = theirs.difference(reference)
        if difference is not None:
            return f"model {i} differs from model 0: {difference}"
        for step in self.steps:
            try:
                module = model.get_submodule(step.path)
            except AttributeError:
                return f"model {i} has no submodule {step.path!r}; model 0 has one"
            if _signature(module) != step.signature:
                return (
                    f"model {i} submodule {step.path or '<root>'!r} is {_describe(module)}; "
                    f"model 0 has {_describe_signature(step.signature)}"
                )
        return f"model {i} has a module tree unlike model 0's"


def _signature(module: nn.Module) -> tuple[type, int, int, int]:
    return (type(module), len(module._modules), len(module._parameters), len(module._buffers))


def _describe_signature(sig: tuple[type, int, int, int]) -> str:
    cls, children, params, buffers = sig
    return f"a {cls.__name__} with {children} children, {params} parameters, {buffers} buffers"


def _describe(module: nn.Module) -> str:
    return _describe_signature(_signature(module))


def check_columns(tensors: list[torch.Tensor], architecture: Architecture, n_models: int) -> torch.device:
    """Check every tensor's shape, dtype and device against the architecture; return the device.

    One attribute pass over all tensors, then C-level ``list.count`` per
    column: a Python ``if`` per tensor would cost more than copying its bytes.
    """
    width = len(architecture)
    device = tensors[0].device if tensors else torch.device("cpu")
    if device.type == "cpu":
        observed = list(map(_shape_dtype_cpu, tensors))
    else:
        observed = [(t.shape, t.dtype, t.device == device) for t in tensors]
    for j, spec in enumerate(architecture.tensors):
        expected = (torch.Size(spec.shape), spec.dtype, True)
        column = observed[j::width]
        if column.count(expected) == n_models:
            continue
        i = next(i for i, seen in enumerate(column) if seen != expected)
        t = tensors[i * width + j]
        if column[i][2]:
            raise ArchitectureMismatchError(
                f"model {i} has {spec.kind} {spec.name!r} of shape {tuple(t.shape)} and dtype {t.dtype}; "
                f"model 0 has {spec.shape} and {spec.dtype}"
            )
        raise ArchitectureMismatchError(
            f"model {i} has {spec.kind} {spec.name!r} on {t.device}; model 0 has its tensors on {device}"
        )
    return device


def stack_columns(
    tensors: list[torch.Tensor], architecture: Architecture, n_models: int
) -> dict[str, torch.Tensor]:
    """Stack model-major tensors (``tensors[i * L + j]``: tensor j of model i) into one tensor per
    name, on their device (host sets in numpy memory, see :func:`empty_stacked`).

    One ``torch.stack`` per name does the copying, and checks shapes and
    devices in C++ on the way; dtypes are checked first, as stacking would
    promote them. Any mismatch is then reported by :func:`check_columns`,
    which names the first model and tensor that differ.
    """
    width = len(architecture)
    dtypes = list(map(_dtype, tensors))
    if any(dtypes[j::width].count(spec.dtype) != n_models for j, spec in enumerate(architecture.tensors)):
        check_columns(tensors, architecture, n_models)
    host = tensors[0].device.type == "cpu" if tensors else True
    stacked = {}
    try:
        with torch.no_grad():
            for j, spec in enumerate(architecture.tensors):
                column = tensors[j::width]
                stacked[spec.name] = (
                    torch.stack(column, out=empty_stacked(n_models, spec)) if host else torch.stack(column)
                )
    except RuntimeError:
        check_columns(tensors, architecture, n_models)  # names what torch.stack found unlike the rest
        raise
    return stacked


def copy_rows(src: np.ndarray, src_offsets: np.ndarray, dst: np.ndarray, dst_offsets: np.ndarray, row_bytes: int,
              hashes: np.ndarray | None = None) -> None:
    """Copy rows of ``row_bytes`` from byte array ``src`` (at ``src_offsets``) to ``dst`` (at
    ``dst_offsets``) in one native pass, writing each row's XXH3-64 into ``hashes`` when given."""
    n = len(src_offsets)
    zeros = np.zeros(n, dtype=np.uint64)
    _native.copy_segments([src], zeros, src_offsets, [dst], zeros, dst_offsets, np.full(n, row_bytes, np.uint64),
                          hashes)


def copy_bytes(src: np.ndarray, dst: np.ndarray) -> None:
    """``dst[:] = src`` for byte arrays of one size, by the native copy (threads, GIL released)."""
    zero = np.zeros(1, dtype=np.uint64)
    _native.copy_segments([src], zero, zero, [dst], zero, zero, np.array([len(src)], dtype=np.uint64))


def native_hash_rows(data: np.ndarray, row_bytes: int, out: np.ndarray) -> None:
    """XXH3-64 of each ``row_bytes`` row of the byte array ``data`` into ``out`` (native, GIL released)."""
    _native.hash_rows(data, row_bytes, out)


def hash_empty_rows(out: np.ndarray) -> None:
    """The hash of every row of a tensor without bytes (each is the hash of nothing)."""
    _native.hash_rows(np.empty(0, dtype=np.uint8), 0, out)


def scatter_to_modules(
    stacked: dict[str, torch.Tensor], architecture: Architecture, targets: list[torch.Tensor], n_models: int
) -> None:
    """Copy row i of each stacked tensor into ``targets[i * L + j]`` (checked by the caller).

    Contiguous CPU targets are written by the native scatter; others (GPU
    modules, odd strides) by ``Tensor.copy_``.
    """
    width = len(architecture)
    specs = architecture.tensors
    direct = [t.is_cpu and t.is_contiguous() for t in targets]
    k_direct = [k for k, ok in enumerate(direct) if ok]
    if k_direct:
        ks = np.array(k_direct, dtype=np.int64)
        js = (ks % width).astype(np.uint64)
        row_bytes = np.array([s.nbytes for s in specs], dtype=np.uint64)
        _native.scatter(
            [byte_view(stacked[s.name]) for s in specs],
            js,
            (ks // width).astype(np.uint64) * row_bytes[js],
            row_bytes[js],
            np.fromiter((targets[k].data_ptr() for k in k_direct), dtype=np.uint64, count=len(k_direct)),
        )
    if len(k_direct) != len(targets):
        on_device: dict[tuple[str, torch.device], torch.Tensor] = {}
        with torch.no_grad():
            for k, ok in enumerate(direct):
                if ok:
                    continue
                i, j = divmod(k, width)
                name = specs[j].name
                source = on_device.setdefault((name, targets[k].device), stacked[name].to(targets[k].device))
                targets[k].copy_(source[i])


def hash_stacked(stacked: dict[str, torch.Tensor], architecture: Architecture, n_models: int) -> np.ndarray:
    """Per-(model, tensor) XXH3-64 hashes ``[n_models, n_tensors]`` of stacked CPU tensors."""
    by_tensor = np.empty((len(architecture), n_models), dtype=np.uint64)
    for j, spec in enumerate(architecture.tensors):
        _native.hash_rows(byte_view(stacked[spec.name]), spec.nbytes, by_tensor[j])
    return np.ascontiguousarray(by_tensor.T)

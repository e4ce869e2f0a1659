"""What every model of a set shares: tensor names, kinds, dtypes and shapes.

An :class:`Architecture` is plain data. It is written once per file (and once
per repository), and compared whenever two model sets must line up. The class
import path it records is information for people; mmpack never imports it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from mmpack import _json, _native
from mmpack.dtypes import dtype_from_name, dtype_name
from mmpack.errors import ArchitectureMismatchError, FormatError

__all__ = ["MAX_TENSORS", "Architecture", "TensorSpec"]

#: Tensors one architecture may hold (docs/FORMAT.md). Reading a model set costs
#: about 1.3 KB of bookkeeping per tensor (its spec, its torch tensor) whatever
#: the file's size, so the count, not the header's 16 MiB, bounds that memory:
#: at most about 90 MB. Real models have hundreds to a few thousand tensors.
MAX_TENSORS = 65_536

TensorKind = Literal["parameter", "buffer"]
_KINDS = ("parameter", "buffer")
MAX_NAME_LENGTH = 1000
MAX_DIMENSIONS = 64
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of every model: ``TensorSpec("fc1.weight", "parameter", torch.float32, (48, 5))``."""

    name: str
    kind: TensorKind
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        """Elements per model."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes per model."""
        return self.numel * self.dtype.itemsize

    def describe(self) -> str:
        """Human-readable form used in error messages, e.g. ``parameter 'fc1.weight' float32 (48, 5)``."""
        return f"{self.kind} {self.name!r} {dtype_name(self.dtype)} {self.shape}"


@dataclass(frozen=True)
class Architecture:
    """The ordered tensors of one model (state_dict order) and the class it came from.

    Example::

        arch = Architecture.from_module(mmpack.workloads.ffnn48())
        arch.names            # ('fc1.weight', 'fc2.weight', 'fc2.bias', ...)
        arch.nbytes_per_model # 19972
    """

    tensors: tuple[TensorSpec, ...]
    module: str | None = None

    def __post_init__(self) -> None:
        if len(self.tensors) > MAX_TENSORS:
            raise FormatError(
                f"an architecture holds at most {MAX_TENSORS:,} tensors (docs/FORMAT.md); this one has "
                f"{len(self.tensors):,}: merge small tensors into larger ones"
            )
        for spec in self.tensors:
            problem = problem_with_name(spec.name)
            if problem is not None:
                raise ArchitectureMismatchError(f"tensor names are stored in files: {problem}")
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            duplicate = next(n for n in names if names.count(n) > 1)
            raise ArchitectureMismatchError(f"tensor name {duplicate!r} appears twice")

    @classmethod
    def from_module(cls, module: nn.Module) -> Architecture:
        """The architecture of ``module``: its parameters, then persistent buffers, per submodule."""
        specs = [
            TensorSpec(name, kind, tensor.dtype, tuple(tensor.shape))
            for name, kind, tensor in iter_state(module)
        ]
        cls_ = type(module)
        return cls(tuple(specs), f"{cls_.__module__}:{cls_.__qualname__}")

    @property
    def names(self) -> tuple[str, ...]:
        """Tensor names in storage order."""
        return tuple(t.name for t in self.tensors)

    @property
    def nbytes_per_model(self) -> int:
        """Bytes of one model's tensors."""
        return sum(t.nbytes for t in self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def index(self, name: str) -> int:
        """Position of tensor ``name``; raises ``KeyError`` naming the known tensors."""
        for i, spec in enumerate(self.tensors):
            if spec.name == name:
                return i
        raise KeyError(f"no tensor {name!r}; the architecture has {list(self.names)}")

    def difference(self, other: Architecture) -> str | None:
        """First difference from ``other`` in words, or ``None`` when the tensors match.

        The class path is not compared: two classes with identical tensors can
        share storage.
        """
        for mine, theirs in zip(self.tensors, other.tensors):
            if mine != theirs:
                return f"{mine.describe()} vs {theirs.describe()}"
        if len(self.tensors) != len(other.tensors):
            longer, extra = (self, "first") if len(self.tensors) > len(other.tensors) else (other, "second")
            spec = longer.tensors[min(len(self.tensors), len(other.tensors))]
            return f"{spec.describe()} exists only in the {extra} architecture"
        return None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form written into headers and manifests."""
        return {
            "module": self.module,
            "tensors": [
                {"name": t.name, "kind": t.kind, "dtype": dtype_name(t.dtype), "shape": list(t.shape)}
                for t in self.tensors
            ],
        }

    @classmethod
    def from_json(cls, data: object) -> Architecture:
        """Parse :meth:`to_json` output strictly (exact keys, typed values, valid names and
        shapes), raising :class:`FormatError` on anything docs/FORMAT.md does not allow."""
        try:
            data = _json.fields(data, ("module", "tensors"), what="architecture")
            module = data["module"]
            if module is not None and (not isinstance(module, str) or problem_with_name(module) is not None):
                raise _json.Malformed(f"architecture 'module' must be null or a valid name, not {module!r:.80}")
            if not isinstance(data["tensors"], list):
                raise _json.Malformed("architecture 'tensors' must be an array")
            if len(data["tensors"]) > MAX_TENSORS:  # before a spec is built for any of them
                raise _json.Malformed(f"it lists {len(data['tensors']):,} tensors, above the limit of {MAX_TENSORS:,}")
            specs = []
            for i, item in enumerate(data["tensors"]):
                item = _json.fields(item, ("name", "kind", "dtype", "shape"), what=f"architecture tensor {i}")
                name, kind, shape = item["name"], item["kind"], item["shape"]
                problem = problem_with_name(name)
                if problem is not None:
                    raise _json.Malformed(f"architecture tensor {i}: {problem}")
                if kind not in _KINDS:
                    raise _json.Malformed(f"tensor {name!r} has kind {kind!r}; expected one of {_KINDS}")
                if not isinstance(shape, list) or len(shape) > MAX_DIMENSIONS or not all(
                    type(d) is int and 0 <= d < 2**40 for d in shape
                ):
                    raise _json.Malformed(f"tensor {name!r} has malformed shape {shape!r:.80}")
                specs.append(TensorSpec(name, kind, dtype_from_name(item["dtype"]), tuple(shape)))
            return cls(tuple(specs), module)
        except _json.Malformed as exc:
            raise FormatError(f"malformed architecture: {exc}") from None
        except ArchitectureMismatchError as exc:
            raise FormatError(f"malformed architecture: {exc}") from None

    def fingerprint(self) -> str:
        """16-hex-digit XXH3-64 of the canonical JSON of the tensors (class path excluded)."""
        canonical = json.dumps(self.to_json()["tensors"], sort_keys=True, separators=(",", ":"))
        return f"{_native.xxh3_64(canonical.encode()):016x}"


def problem_with_name(name: object) -> str | None:
    """What makes ``name`` unfit as a stored tensor name (docs/FORMAT.md, "Tensor names"), or None.

    A name is a non-empty string of at most :data:`MAX_NAME_LENGTH` characters with no control
    characters (U+0000-U+001F, U+007F-U+009F): state_dict keys always qualify.
    """
    if not isinstance(name, str) or not name:
        return f"a name must be a non-empty string, not {name!r:.80}"
    if len(name) > MAX_NAME_LENGTH:
        return f"name {name[:40]!r}... has {len(name)} characters, more than {MAX_NAME_LENGTH}"
    if _CONTROL.search(name):
        return f"name {name!r:.80} holds a control character"
    return None


def iter_state(module: nn.Module):
    """Yield ``(name, kind, tensor)`` for every parameter and persistent buffer, in state_dict order."""
    for prefix, sub in module.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for name, param in sub._parameters.items():
            if param is not None:
                yield dot + name, "parameter", param
        for name, buf in sub._buffers.items():
            if buf is not None and name not in sub._non_persistent_buffers_set:
                yield dot + name, "buffer", buf

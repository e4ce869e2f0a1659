"""The tensor dtypes mmpack stores, by the names it writes into headers.

Reading maps names back through this fixed table, never through ``getattr``
on torch, so a header cannot name arbitrary attributes.
"""

from __future__ import annotations

import torch

from mmpack.errors import FormatError

_BY_NAME: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "complex128": torch.complex128,
    "complex64": torch.complex64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}
_BY_DTYPE: dict[torch.dtype, str] = {dtype: name for name, dtype in _BY_NAME.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """Name under which ``dtype`` is stored, e.g. ``dtype_name(torch.bfloat16) == "bfloat16"``.

    Raises :class:`FormatError` for dtypes mmpack cannot store (quantized, sparse...).
    """
    try:
        return _BY_DTYPE[dtype]
    except KeyError:
        supported = ", ".join(sorted(_BY_NAME))
        raise FormatError(f"dtype {dtype} cannot be stored; supported: {supported}") from None


def dtype_from_name(name: object) -> torch.dtype:
    """Inverse of :func:`dtype_name`; raises :class:`FormatError` for an unknown name."""
    try:
        return _BY_NAME[name]  # type: ignore[index]
    except (KeyError, TypeError):
        raise FormatError(f"unknown dtype {name!r} in header") from None


"""mmpack: save, version and recover sets of thousands of same-architecture PyTorch models."""

from mmpack.architecture import Architecture, TensorSpec
from mmpack.errors import (
    ArchitectureMismatchError,
    FormatError,
    IntegrityError,
    MMPackError,
    ModelIndexError,
    UnsupportedFormatVersionError,
)
from mmpack.fileformat import load, save
from mmpack.functional import vmap_call
from mmpack.modelset import ModelSet

__version__ = "0.1.0"

__all__ = [
    "Architecture",
    "ArchitectureMismatchError",
    "FormatError",
    "IntegrityError",
    "MMPackError",
    "ModelIndexError",
    "ModelSet",
    "TensorSpec",
    "UnsupportedFormatVersionError",
    "load",
    "save",
    "vmap_call",
]

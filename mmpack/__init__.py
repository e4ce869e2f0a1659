"""mmpack: save, version and recover sets of thousands of same-architecture PyTorch models."""

from mmpack.architecture import Architecture, TensorSpec
from mmpack.errors import (
    ArchitectureMismatchError,
    FormatError,
    IntegrityError,
    MissingDependencyError,
    MMPackError,
    ModelIndexError,
    RepositoryError,
    UnsupportedFormatVersionError,
    VersionNotFoundError,
)
from mmpack.fileformat import load, save
from mmpack.functional import vmap_call
from mmpack.modelset import ModelSet
from mmpack.repository import GcReport, Repository, SnapshotPolicy, VerifyReport, VersionRecord

__version__ = "0.1.0"

__all__ = [
    "Architecture",
    "ArchitectureMismatchError",
    "FormatError",
    "GcReport",
    "IntegrityError",
    "MMPackError",
    "MissingDependencyError",
    "ModelIndexError",
    "ModelSet",
    "Repository",
    "RepositoryError",
    "SnapshotPolicy",
    "TensorSpec",
    "UnsupportedFormatVersionError",
    "VerifyReport",
    "VersionNotFoundError",
    "VersionRecord",
    "load",
    "save",
    "vmap_call",
]

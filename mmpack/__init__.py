"""mmpack: save, version and recover sets of thousands of same-architecture PyTorch models."""

from mmpack.approaches.advisor import Estimate, FastestRecovery, Policy, SmallestUnder, Throughputs
from mmpack.architecture import Architecture, TensorSpec
from mmpack.compression import Compression
from mmpack.errors import (
    ArchitectureMismatchError,
    CompressionError,
    FormatError,
    IntegrityError,
    InvalidArgumentError,
    MissingDependencyError,
    MMPackError,
    ModelIndexError,
    ObjectNotFoundError,
    ProvenanceError,
    ProvenanceMismatchError,
    RepositoryError,
    RepositoryNotFoundError,
    StorageError,
    TagConflictError,
    UnsupportedFormatVersionError,
    VersionNotFoundError,
)
from mmpack.fileformat import load, save
from mmpack.functional import vmap_call
from mmpack.modelset import ModelSet
from mmpack.provenance import DatasetRef, Provenance
from mmpack.repository import GcReport, Repository, SnapshotPolicy, VerifyReport, VersionRecord

__version__ = "0.1.0"

__all__ = [
    "Architecture",
    "ArchitectureMismatchError",
    "Compression",
    "CompressionError",
    "DatasetRef",
    "Estimate",
    "FastestRecovery",
    "FormatError",
    "GcReport",
    "IntegrityError",
    "InvalidArgumentError",
    "MMPackError",
    "MissingDependencyError",
    "ModelIndexError",
    "ModelSet",
    "ObjectNotFoundError",
    "Policy",
    "Provenance",
    "ProvenanceError",
    "ProvenanceMismatchError",
    "Repository",
    "RepositoryError",
    "RepositoryNotFoundError",
    "TagConflictError",
    "SmallestUnder",
    "SnapshotPolicy",
    "StorageError",
    "TensorSpec",
    "Throughputs",
    "UnsupportedFormatVersionError",
    "VerifyReport",
    "VersionNotFoundError",
    "VersionRecord",
    "load",
    "save",
    "vmap_call",
]

"""mmpack: save, version and recover sets of thousands of same-architecture PyTorch models."""

import importlib

from mmpack.errors import (
    ArchitectureMismatchError,
    BackgroundSaveError,
    BaseSaveFailedError,
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

# Everything else is imported on first use (PEP 562): importing a lower layer, say
# ``mmpack.store`` (which needs no torch), must not import torch through this package.
_LAZY = {
    "Estimate": "mmpack.approaches.advisor",
    "FastestRecovery": "mmpack.approaches.advisor",
    "Policy": "mmpack.approaches.advisor",
    "SmallestUnder": "mmpack.approaches.advisor",
    "Throughputs": "mmpack.approaches.advisor",
    "Architecture": "mmpack.architecture",
    "TensorSpec": "mmpack.architecture",
    "Checkpointer": "mmpack.checkpoint",
    "Compression": "mmpack.compression",
    "load": "mmpack.fileformat",
    "save": "mmpack.fileformat",
    "vmap_call": "mmpack.functional",
    "ModelSet": "mmpack.modelset",
    "DatasetRef": "mmpack.provenance",
    "Provenance": "mmpack.provenance",
    "Change": "mmpack.repository",
    "Diff": "mmpack.repository",
    "GcReport": "mmpack.repository",
    "LazyModelSet": "mmpack.repository",
    "PruneReport": "mmpack.repository",
    "ReadHandle": "mmpack.repository",
    "Receipt": "mmpack.repository",
    "RecoveryPlan": "mmpack.repository",
    "Repository": "mmpack.repository",
    "SnapshotPolicy": "mmpack.repository",
    "TagMove": "mmpack.repository",
    "VerifyReport": "mmpack.repository",
    "VersionRecord": "mmpack.repository",
    "VersionWriter": "mmpack.repository",
    "WriteHandle": "mmpack.repository",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mmpack' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__version__ = "0.1.0"

__all__ = [
    "Architecture",
    "ArchitectureMismatchError",
    "BackgroundSaveError",
    "BaseSaveFailedError",
    "Change",
    "Checkpointer",
    "Compression",
    "CompressionError",
    "DatasetRef",
    "Diff",
    "Estimate",
    "FastestRecovery",
    "FormatError",
    "GcReport",
    "IntegrityError",
    "InvalidArgumentError",
    "LazyModelSet",
    "MMPackError",
    "MissingDependencyError",
    "ModelIndexError",
    "ModelSet",
    "ObjectNotFoundError",
    "Policy",
    "Provenance",
    "PruneReport",
    "ReadHandle",
    "Receipt",
    "RecoveryPlan",
    "ProvenanceError",
    "ProvenanceMismatchError",
    "Repository",
    "RepositoryError",
    "RepositoryNotFoundError",
    "TagConflictError",
    "TagMove",
    "SmallestUnder",
    "SnapshotPolicy",
    "StorageError",
    "TensorSpec",
    "Throughputs",
    "UnsupportedFormatVersionError",
    "VerifyReport",
    "VersionNotFoundError",
    "VersionRecord",
    "VersionWriter",
    "WriteHandle",
    "load",
    "save",
    "vmap_call",
]

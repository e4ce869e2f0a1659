"""Versioned repositories of model sets."""

from mmpack.records import VersionRecord
from mmpack.repository.repo import GcReport, Repository, SnapshotPolicy, VerifyReport

__all__ = ["GcReport", "Repository", "SnapshotPolicy", "VerifyReport", "VersionRecord"]

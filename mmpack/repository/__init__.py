"""Versioned repositories of model sets."""

from mmpack.records import VersionRecord
from mmpack.repository.catalog import TagMove
from mmpack.repository.catalog.tables import Change, Diff
from mmpack.repository.lazy import LazyModelSet
from mmpack.repository.maintenance import GcReport, PruneReport, VerifyReport
from mmpack.repository.planner import RecoveryPlan
from mmpack.repository.repo import Repository
from mmpack.repository.saving import SnapshotPolicy
from mmpack.repository.slices import ReadHandle, Receipt, VersionWriter, WriteHandle

__all__ = ["Change", "Diff", "GcReport", "LazyModelSet", "PruneReport", "ReadHandle", "Receipt", "RecoveryPlan",
           "Repository", "SnapshotPolicy", "TagMove", "VerifyReport", "VersionRecord", "VersionWriter", "WriteHandle"]

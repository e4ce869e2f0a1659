"""Stores: where a repository's bytes live (a local directory by default)."""

from mmpack.store.base import CleanupReport, Store, check_key
from mmpack.store.local import LocalStore
from mmpack.store.objects import ObjectStore

__all__ = ["CleanupReport", "LocalStore", "ObjectStore", "Store", "check_key"]

"""Stores: where a repository's bytes live (a local directory by default, or object storage)."""

from mmpack.store.base import CleanupReport, SizedWriter, Store, check_key
from mmpack.store.fsspec_store import FsspecStore
from mmpack.store.local import LocalStore
from mmpack.store.urls import open_store, register_scheme

__all__ = [
    "CleanupReport",
    "FsspecStore",
    "LocalStore",
    "SizedWriter",
    "Store",
    "check_key",
    "open_store",
    "register_scheme",
]

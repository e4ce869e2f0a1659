"""Test suites that ship with mmpack, for code built on it: :class:`StoreTests` checks a store backend
against the store contract (``mmpack.store.Store``), as zarr ships its ``StoreTests``."""

from mmpack.testing.store import StoreTests

__all__ = ["StoreTests"]

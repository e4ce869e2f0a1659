"""Choosing a store from a location: a local path, or an fsspec URL such as ``s3://bucket/prefix``."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

from mmpack.errors import MMPackError
from mmpack.store.base import Store
from mmpack.store.local import LocalStore

# "s3://...", or fsspec's chained form "simplecache::s3://..."; a bare "a::b" stays a path.
_PROTOCOL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)(://|::(?=.*://))")


def protocol_of(location: str) -> str | None:
    """The URL scheme of ``location`` (``"s3"``), or None for a plain path.

    Example::

        protocol_of("s3://bucket/prefix")   # "s3"
        protocol_of("/data/cells.repo")     # None
    """
    match = _PROTOCOL.match(location)
    return match.group(1).lower() if match else None


Opener = Callable[[str, "dict[str, Any] | None", bool], Store]  # (location, storage_options, fsync) -> Store
_OPENERS: dict[str, Opener] = {}


def register_scheme(scheme: str, opener: Opener) -> None:
    """register_scheme(scheme, opener) -> None

    Make :func:`open_store` (and so ``mmpack.Repository(url)``) open URLs of
    ``scheme`` with ``opener(location, storage_options, fsync)``. A new store
    backend is its own module plus this one call; schemes nobody registered
    go to fsspec. Check a backend with :class:`mmpack.testing.StoreTests`.

    Example::

        register_scheme("vault", lambda url, options, fsync: VaultStore(url, **(options or {})))
    """
    if not isinstance(scheme, str) or not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme):
        raise MMPackError(f"a URL scheme is lowercase letters, digits, '+', '.' or '-', not {scheme!r}")
    _OPENERS[scheme] = opener


def _local(location: str, storage_options: dict[str, Any] | None, fsync: bool) -> Store:
    if storage_options:
        raise MMPackError(
            f"storage_options apply to fsspec URLs such as 's3://bucket/prefix', not to the local path {location!r}"
        )
    return LocalStore(location.split("://", 1)[1] if "://" in location else location, fsync=fsync)


def _fsspec(location: str, storage_options: dict[str, Any] | None, fsync: bool) -> Store:
    from mmpack.store.fsspec_store import FsspecStore

    return FsspecStore(location, storage_options)


register_scheme("file", _local)
register_scheme("local", _local)


def open_store(
    location: str | os.PathLike[str], storage_options: dict[str, Any] | None = None, *, fsync: bool = True
) -> Store:
    """open_store(location, storage_options=None, *, fsync=True) -> Store

    The store a repository at ``location`` lives in: a :class:`LocalStore`
    for a path or a ``file://`` URL (``fsync`` applies), the backend a scheme
    was registered for (:func:`register_scheme`), else an
    :class:`~mmpack.store.fsspec_store.FsspecStore` for any other fsspec URL,
    ``storage_options`` going to its file system. This is the one place that
    picks the backend; ``mmpack.Repository(location, ...)`` calls it.

    Example::

        store = open_store("s3://models/cells", {"endpoint_url": "http://127.0.0.1:9000"})
        store = open_store("cells.repo")   # a local directory
    """
    if isinstance(location, os.PathLike):
        location = os.fspath(location)
    if not isinstance(location, str):
        raise TypeError(f"a repository location is a path or a URL string, not {type(location).__name__}")
    protocol = protocol_of(location)
    if protocol is None:
        return _local(location, storage_options, fsync)
    if "::" in location:  # fsspec's chained URLs ("simplecache::s3://...") are fsspec's
        return _fsspec(location, storage_options, fsync)
    return _OPENERS.get(protocol, _fsspec)(location, storage_options, fsync)

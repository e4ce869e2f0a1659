"""Choosing a store from a location: a local path, or an fsspec URL such as ``s3://bucket/prefix``."""

from __future__ import annotations

import os
import re
from typing import Any

from mmpack.errors import MMPackError
from mmpack.store.base import Store
from mmpack.store.local import LocalStore

# "s3://...", or fsspec's chained form "simplecache::s3://..."; a bare "a::b" stays a path.
_PROTOCOL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)(://|::(?=.*://))")
_LOCAL_PROTOCOLS = {"file", "local"}


def protocol_of(location: str) -> str | None:
    """The URL scheme of ``location`` (``"s3"``), or None for a plain path.

    Example::

        protocol_of("s3://bucket/prefix")   # "s3"
        protocol_of("/data/cells.repo")     # None
    """
    match = _PROTOCOL.match(location)
    return match.group(1).lower() if match else None


def open_store(
    location: str | os.PathLike[str], storage_options: dict[str, Any] | None = None, *, fsync: bool = True
) -> Store:
    """open_store(location, storage_options=None, *, fsync=True) -> Store

    The store a repository at ``location`` lives in: a :class:`LocalStore`
    for a path or a ``file://`` URL (``fsync`` applies), an
    :class:`~mmpack.store.fsspec_store.FsspecStore` for any other fsspec
    URL, ``storage_options`` going to its file system. This is the one
    place that picks the backend; ``mmpack.Repository(location, ...)`` calls it.

    Example::

        store = open_store("s3://models/cells", {"endpoint_url": "http://127.0.0.1:9000"})
        store = open_store("cells.repo")   # a local directory
    """
    if isinstance(location, os.PathLike):
        location = os.fspath(location)
    if not isinstance(location, str):
        raise TypeError(f"a repository location is a path or a URL string, not {type(location).__name__}")
    protocol = protocol_of(location)
    if protocol is None or (protocol in _LOCAL_PROTOCOLS and "::" not in location):
        if storage_options:
            raise MMPackError(
                f"storage_options apply to fsspec URLs such as 's3://bucket/prefix', not to the local path {location!r}"
            )
        return LocalStore(location.split("://", 1)[1] if protocol is not None else location, fsync=fsync)
    from mmpack.store.fsspec_store import FsspecStore

    return FsspecStore(location, storage_options)

"""fsspec file systems for repository URLs: which one, with which options, and what they report."""

from __future__ import annotations

import sys
from datetime import datetime
from typing import Any

from mmpack.errors import MissingDependencyError, MMPackError


def filesystem_for(url: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    """The fsspec file system and root path of ``url``; a missing backend names what to install."""
    protocol = url.split("://", 1)[0].split("::", 1)[0]
    hint = _install_hint(protocol)
    try:
        import fsspec
    except ImportError:
        raise MissingDependencyError(f"repositories at {url!r} need fsspec: {hint}") from None
    # Listings are never cached: a stale listing would hide a version or a claim. fsspec shares
    # file system instances with equal options (so a client is built once per process, which
    # costs ~0.5 s on S3); the option is part of that key, so every shared instance has it too.
    options = {**(storage_options or {}), "use_listings_cache": False}
    try:
        fs, root = fsspec.url_to_fs(url, **options)
    except ImportError as exc:
        raise MissingDependencyError(f"repositories at {url!r} need an extra package: {hint} ({exc})") from None
    except ValueError as exc:
        raise MMPackError(f"cannot open {url!r}: {exc}") from None
    return fs, root


def _install_hint(protocol: str) -> str:
    if protocol in {"s3", "s3a"}:
        return 'pip install "mmpack[s3]" (it installs s3fs)'
    return f"install the fsspec backend for {protocol!r} (see fsspec's list of implementations)"


def is_s3(fs: Any) -> bool:
    s3fs = sys.modules.get("s3fs")  # an S3 file system means s3fs is already imported
    return s3fs is not None and isinstance(fs, s3fs.S3FileSystem)


def mtime(info: dict[str, Any]) -> float:
    """When an object was last written, from an fsspec info record (each backend names it its own way)."""
    for name in ("LastModified", "mtime", "last_modified", "updated", "modified", "created"):
        value = info.get(name)
        if value is not None and value != "":
            return timestamp(value)
    raise MMPackError(f"the file system reports no modification time for {info.get('name')!r}")


def timestamp(value: Any) -> float:
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, str):
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return float(value)

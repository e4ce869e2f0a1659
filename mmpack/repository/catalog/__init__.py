"""The catalog: all of a repository's metadata (versions, architectures, tags, chains, hash tables).

:func:`open_catalog` reads the marker and returns the catalog of the
repository's format, creating a format 2 repository where there is none.
:func:`upgrade` turns a format 1 repository into a format 2 one in place.
"""

from __future__ import annotations

import errno
import json

from mmpack import _json
from mmpack.errors import RepositoryError, RepositoryNotFoundError
from mmpack.objects import ObjectStore
from mmpack.repository.catalog.base import MARKER, MARKER_FORMAT, Catalog
from mmpack.repository.catalog.format1 import Format1Catalog
from mmpack.repository.catalog.format2 import Format2Catalog, checkpoint_key
from mmpack.repository.catalog.state import CatalogState, TagMove
from mmpack.store import Store

__all__ = ["Catalog", "Format1Catalog", "Format2Catalog", "TagMove", "create", "open_catalog", "upgrade"]

FORMATS = {1: Format1Catalog, 2: Format2Catalog}
NEWEST = 2


def marker(version: int) -> bytes:
    return json.dumps({"format": MARKER_FORMAT, "format_version": version}).encode()


def read_marker(content: bytes, store: Store) -> int:
    """The repository format a marker states (docs/REPOSITORY.md), read strictly."""
    try:
        found = _json.fields(_json.loads(content), ("format", "format_version"), what=MARKER)
    except _json.Malformed as exc:
        raise RepositoryError(f"{store!r} is not an mmpack repository (bad {MARKER}: {exc})") from None
    if found["format"] != MARKER_FORMAT:
        raise RepositoryError(f"{store!r} is not an mmpack repository (bad {MARKER})")
    version = found["format_version"]
    if type(version) is not int or version not in FORMATS:
        raise RepositoryError(
            f"repository format version {version!r} is not supported; this mmpack reads versions "
            f"{', '.join(map(str, FORMATS))} (a newer mmpack may read it)"
        )
    return version


def open_catalog(store: Store, objects: ObjectStore, create: bool) -> Catalog:
    """The catalog of the repository in ``store``; with ``create``, a new format 2 repository where
    the store holds nothing (:class:`RepositoryNotFoundError` otherwise, and nothing is written)."""
    head = Format2Catalog.read_head(store)
    if head is not None:  # a format 2 repository with commits: HEAD says so, the marker need not be read
        return Format2Catalog(store, objects, head=head)
    try:
        content = store.get(MARKER)  # one request when the repository exists
    except FileNotFoundError:
        if not create:
            raise RepositoryNotFoundError(errno.ENOENT, f"no mmpack repository at {store!r}") from None
        content = _create(store)
    return FORMATS[read_marker(content, store)](store, objects)


def _create(store: Store) -> bytes:
    """Create a repository unless another opener just did; the marker that now exists.

    The marker is the last thing creation writes (after checkpoint 0) and
    nothing removes it, so a location that lists keys but has no marker,
    read *after* the listing, is not a repository; reading it only before the
    listing would count as foreign the marker a concurrent opener published
    in between. Concurrent creators write the same checkpoint 0 (the same
    bytes) and one of them the marker.
    """
    if store.list("") or store.list("versions/"):
        try:
            return store.get(MARKER)
        except FileNotFoundError:
            raise RepositoryError(f"{store!r} holds files but is not an mmpack repository") from None
    return create(store, NEWEST)


def create(store: Store, version: int = NEWEST) -> bytes:
    """Make an empty repository of format ``version`` in ``store`` (unless another creator just
    did); the marker that now exists. Format 1 is for writing repositories that mmpack 0.1 reads,
    and for comparing the formats (bench/catalog.py)."""
    if version not in FORMATS:
        raise RepositoryError(f"no repository format {version!r}; formats are {sorted(FORMATS)}")
    content = marker(version)
    if version >= 2 and not store.exists(checkpoint_key(0)):
        store.put(checkpoint_key(0), Format2Catalog.initial_checkpoint())
    if store.put_if_absent(MARKER, content):
        return content
    return store.get(MARKER)


def upgrade(store: Store, objects: ObjectStore) -> bool:
    """Turn a format 1 repository into format 2 in place; False if it already is format 2.

    The versions keep their ids and objects: checkpoint 0 takes every
    manifest's record (as read by this mmpack), then the marker says
    format 2. Manifests stay (format 1 readers of older mmpack versions will
    refuse the marker, as they should). No other process may write to the
    repository meanwhile: a format 1 writer that publishes a manifest after
    the checkpoint is read would go unseen (the upgrade checks the listing
    once more at the end and fails if it changed).
    """
    catalog = open_catalog(store, objects, create=False)
    if catalog.format_version == NEWEST:
        return False
    state = CatalogState()
    ids = catalog.ids()
    for vid in ids:
        record = catalog.record(vid)
        if record.architecture not in state.architectures:
            state.architectures[record.architecture] = catalog.architecture(record.architecture)
        state.records[vid] = record
    numbers = [int(v[1:]) for v in ids]
    state.next_version = max(numbers, default=0) + 1
    store.put(checkpoint_key(0), state.encode_checkpoint())
    if catalog.ids() != ids:
        raise RepositoryError("a version was saved while upgrading; run the upgrade again when no process writes")
    store.put(MARKER, marker(NEWEST))
    return True

"""Format 1 catalogs: one manifest per version under ``versions/`` (mmpack 0.1).

Read as they are, and still written the way they always were: a version
exists once ``versions/v<n>.json`` is created (create-only), and a writer
that finds its number taken takes the next. Listing reads one key per
version; tags and prune need format 2 (``Repository.upgrade``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace

from mmpack import _json
from mmpack.architecture import Architecture
from mmpack.errors import FormatError, MMPackError, RepositoryError, VersionNotFoundError
from mmpack.records import VersionRecord
from mmpack.repository.catalog.base import Catalog, sort_ids
from mmpack.repository.catalog.documents import (
    check_version_id,
    decode_manifest,
    encode_manifest,
    is_version_id,
    manifest_key,
    version_number,
)
from mmpack.repository.cleanup import WriteLog, create_once

_MAX_ID_ATTEMPTS = 1000


class Format1Catalog(Catalog):
    """Manifests under ``versions/``, architecture records under ``architectures/``."""

    format_version = 1

    def __init__(self, store, objects) -> None:
        super().__init__(store, objects)
        self._records: dict[str, VersionRecord] = {}
        self._architectures: dict[str, Architecture] = {}

    def refresh(self) -> None:
        pass  # every listing is fresh, and records are immutable

    def ids(self) -> list[str]:
        return sort_ids(self._manifest_ids())

    def _manifest_ids(self) -> list[str]:
        names = (k[len("versions/") : -len(".json")] for k in self.store.list("versions/") if k.endswith(".json"))
        return [name for name in names if is_version_id(name)]

    def record(self, vid: str) -> VersionRecord:
        check_version_id(vid)
        found = self._records.get(vid)
        if found is None:
            try:
                raw = self.store.get(manifest_key(vid))
            except FileNotFoundError:
                raise VersionNotFoundError(f"no version {vid!r} in {self.store!r}") from None
            found = self._records.setdefault(vid, decode_manifest(raw, vid, lambda fp: len(self.architecture(fp))))
        return found

    def architecture(self, fingerprint: str) -> Architecture:
        found = self._architectures.get(fingerprint)
        if found is None:
            try:
                raw = self.store.get(f"architectures/{fingerprint}.json")
            except (FileNotFoundError, MMPackError):
                raise RepositoryError(f"architecture record {fingerprint!r} is missing") from None
            try:
                found = Architecture.from_json(_json.loads(raw))
            except (_json.Malformed, FormatError) as exc:
                raise RepositoryError(f"architecture record {fingerprint} is malformed: {exc}") from None
            if found.fingerprint() != fingerprint:
                raise RepositoryError(f"architecture record {fingerprint} does not match its fingerprint")
            self._architectures[fingerprint] = found
        return found

    def publish(self, build: Callable[[str, int], VersionRecord], architecture: Architecture,
                written: WriteLog | None = None) -> VersionRecord:
        architecture_bytes = self._store_architecture(architecture)
        for _ in range(_MAX_ID_ATTEMPTS):
            taken = [version_number(vid) for vid in self._manifest_ids()]
            vid = f"v{max(taken, default=0) + 1}"
            record = build(vid, architecture_bytes)
            content = encode_manifest(record)
            if create_once(self.store, manifest_key(vid), content, written):
                record = replace(record, manifest_bytes=len(content))
                self._records[vid] = record
                return record
        raise RepositoryError("could not allocate a version id: too many concurrent writers")

    def _store_architecture(self, architecture: Architecture) -> int:
        """Write the architecture record once per repository; the bytes written (0 if it existed)."""
        fingerprint = architecture.fingerprint()
        key = f"architectures/{fingerprint}.json"
        if fingerprint not in self._architectures and not self.store.exists(key):
            content = json.dumps(architecture.to_json(), sort_keys=True).encode()
            if self.store.put_if_absent(key, content):
                self._architectures[fingerprint] = architecture
                return len(content)
        if self.architecture(fingerprint).difference(architecture) is not None:
            raise RepositoryError(f"architecture record {fingerprint} collides with another architecture")
        return 0

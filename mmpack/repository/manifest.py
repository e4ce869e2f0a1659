"""Version manifests: the small JSON document whose publication makes a version exist.

A manifest names the version's approach, base, data objects and, for delta
versions, which (model, tensor) pairs it changed, in a compact binary form
(base64 of little-endian model ids and packed bit masks). A second line
carries the XXH3-64 of the JSON line, so a damaged manifest is detected
rather than misread.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Any

from mmpack import _native
from mmpack.errors import RepositoryError, VersionNotFoundError
from mmpack.records import Changes, ObjectRef, VersionRecord

MANIFEST_FORMAT = "mmpack-version"
MANIFEST_VERSION = 1
APPROACHES = ("baseline", "update", "provenance")
_VERSION_ID = re.compile(r"v[1-9][0-9]{0,17}")


def check_version_id(vid: object) -> str:
    """A well-formed id (``"v1"``, ``"v42"``...); anything else is not found."""
    if not isinstance(vid, str) or not _VERSION_ID.fullmatch(vid):
        raise VersionNotFoundError(f"no version {vid!r}: version ids look like 'v1', 'v42'")
    return vid


def version_number(vid: str) -> int:
    return int(check_version_id(vid)[1:])


def manifest_key(vid: str) -> str:
    return f"versions/{check_version_id(vid)}.json"


def encode_manifest(record: VersionRecord) -> bytes:
    """The manifest document of ``record`` (its manifest_bytes field is ignored).

    Layout: the JSON body on one line, then ``xxh3-64:<hex>`` of exactly those
    bytes on the next, so checking it needs no re-encoding.
    """
    body = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "id": record.id,
        "approach": record.approach,
        "base": record.base,
        "n_models": record.n_models,
        "architecture": record.architecture,
        "architecture_bytes": record.architecture_bytes,
        "created": record.created.isoformat(),
        "message": record.message,
        "reason": record.reason,
        "objects": [{"key": o.key, "bytes": o.bytes, "xxh3": f"{o.checksum:016x}"} for o in record.objects],
        "changes": record.changes.to_json() if record.changes is not None else None,
        "details": record.details,
    }
    encoded = json.dumps(body, separators=(",", ":")).encode()
    return encoded + f"\nxxh3-64:{_native.xxh3_64(encoded):016x}\n".encode()


def decode_manifest(raw: bytes, vid: str, n_tensors_of: Any) -> VersionRecord:
    """Parse and check a manifest; ``n_tensors_of(fingerprint)`` gives the architecture's tensor count."""
    encoded, _, checksum = raw.rstrip(b"\n").rpartition(b"\n")
    if checksum != f"xxh3-64:{_native.xxh3_64(encoded):016x}".encode():
        raise RepositoryError(f"manifest of {vid} fails its checksum: the repository is damaged")
    try:
        body = json.loads(encoded)
        if body["format"] != MANIFEST_FORMAT or body["format_version"] != MANIFEST_VERSION:
            raise RepositoryError(f"manifest of {vid} has unsupported format {body['format']!r} {body['format_version']!r}")
        if body["id"] != vid or body["approach"] not in APPROACHES:
            raise RepositoryError(f"manifest of {vid} names id {body['id']!r} and approach {body['approach']!r}")
        if body["base"] is not None:
            check_version_id(body["base"])
        n_models = int(body["n_models"])
        changes = None
        if body["changes"] is not None:
            changes = Changes.from_json(body["changes"], n_models, n_tensors_of(body["architecture"]))
        return VersionRecord(
            id=vid,
            approach=body["approach"],
            base=body["base"],
            n_models=n_models,
            created=datetime.fromisoformat(body["created"]),
            message=str(body["message"]),
            reason=str(body["reason"]),
            architecture=str(body["architecture"]),
            objects=tuple(ObjectRef(o["key"], int(o["bytes"]), int(o["xxh3"], 16)) for o in body["objects"]),
            changes=changes,
            details=dict(body["details"]),
            architecture_bytes=int(body["architecture_bytes"]),
            manifest_bytes=len(raw),
        )
    except RepositoryError:
        raise
    except VersionNotFoundError as exc:
        raise RepositoryError(f"manifest of {vid} names a malformed base: {exc}") from None
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        raise RepositoryError(f"manifest of {vid} is malformed: {exc!r}") from None


def now() -> datetime:
    return datetime.now(timezone.utc)


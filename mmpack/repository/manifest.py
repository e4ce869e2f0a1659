"""Version manifests: the small JSON document whose publication makes a version exist.

A manifest names the version's approach, base, data objects and, for delta
versions, which (model, tensor) pairs it changed, in a compact binary form
(base64 of little-endian model ids and packed bit masks). A second line
carries the XXH3-64 of the JSON line, so a damaged manifest is detected
rather than misread. The format is specified in docs/REPOSITORY.md; reading
is strict: every field is checked for its type and range, and against the
approach it names, before anything else uses the record.

Format version 2 (written since mmpack 0.2) adds each model-set object's
``pin``; version 1 manifests are still read.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any

from mmpack import _json, _native
from mmpack.approaches import APPROACHES
from mmpack.errors import RepositoryError, VersionNotFoundError
from mmpack.records import Changes, ObjectRef, VersionRecord
from mmpack.store import ObjectStore, check_key

MANIFEST_FORMAT = "mmpack-version"
MANIFEST_VERSION = 2
READABLE_VERSIONS = (1, 2)
MAX_MODELS = 2**32  # the rows layout indexes models with 32-bit ids
_VERSION_ID = re.compile(r"v[1-9][0-9]{0,17}")
_KEYS = ("format", "format_version", "id", "approach", "base", "n_models", "architecture", "architecture_bytes",
         "created", "message", "reason", "objects", "changes", "details")
_CHECKSUM_LINE = re.compile(rb"xxh3-64:([0-9a-f]{16})\n")
# details: what each documented note may hold (docs/REPOSITORY.md, "details").
_DETAILS = {"compression": str, "xor_base": str, "retrained": int, "function": str, "policy": str, "estimates": dict}


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
    import json

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
        "objects": [_encode_ref(o) for o in record.objects],
        "changes": record.changes.to_json() if record.changes is not None else None,
        "details": record.details,
    }
    encoded = json.dumps(body, separators=(",", ":")).encode()
    return encoded + f"\nxxh3-64:{_native.xxh3_64(encoded):016x}\n".encode()


def _encode_ref(ref: ObjectRef) -> dict[str, Any]:
    entry: dict[str, Any] = {"key": ref.key, "bytes": ref.bytes, "xxh3": f"{ref.checksum:016x}"}
    if ref.pin is not None:
        entry["pin"] = f"{ref.pin:016x}"
    return entry


def decode_manifest(raw: bytes, vid: str, n_tensors_of: Any) -> VersionRecord:
    """Parse and check a manifest; ``n_tensors_of(fingerprint)`` gives the architecture's tensor count."""
    encoded, newline, checksum = raw.partition(b"\n")
    found = _CHECKSUM_LINE.fullmatch(checksum) if newline else None
    if found is None or int(found.group(1), 16) != _native.xxh3_64(encoded):
        raise RepositoryError(f"manifest of {vid} fails its checksum: the repository is damaged")
    try:
        return _decode_body(_json.loads(encoded), vid, len(raw), n_tensors_of)
    except _json.Malformed as exc:
        raise RepositoryError(f"manifest of {vid} is malformed: {exc}") from None
    except VersionNotFoundError as exc:
        raise RepositoryError(f"manifest of {vid} names a malformed version id: {exc}") from None


def _decode_body(body: Any, vid: str, size: int, n_tensors_of: Any) -> VersionRecord:
    body = _json.fields(body, _KEYS, what="the manifest")
    if body["format"] != MANIFEST_FORMAT or body["format_version"] not in READABLE_VERSIONS or type(body["format_version"]) is not int:
        raise RepositoryError(
            f"manifest of {vid} has format {body['format']!r} version {body['format_version']!r}; this mmpack reads "
            f"{MANIFEST_FORMAT!r} versions {', '.join(map(str, READABLE_VERSIONS))} (a newer mmpack may read it)"
        )
    version = body["format_version"]
    if body["id"] != vid:
        raise _json.Malformed(f"it names id {body['id']!r}")
    approach = APPROACHES.get(body["approach"]) if isinstance(body["approach"], str) else None
    if approach is None:
        raise _json.Malformed(f"unknown approach {body['approach']!r}; known: {sorted(APPROACHES)}")
    base = body["base"]
    if base is not None and version_number(base) >= version_number(vid):
        raise _json.Malformed(f"base {base!r} is not an earlier version")
    if approach.delta and base is None:
        raise _json.Malformed(f"a {approach.name} version needs a base")
    n_models = _json.integer(body["n_models"], "n_models", 0, MAX_MODELS)
    architecture = body["architecture"]
    _json.hex64(architecture, "architecture")
    objects = body["objects"]
    if not isinstance(objects, list) or len(objects) != 1:
        raise _json.Malformed(f"a {approach.name} version has exactly one object, not {objects!r:.80}")
    refs = tuple(_decode_ref(o, version, approach.object_kind) for o in objects)
    changes = body["changes"]
    if approach.delta != (changes is not None):
        raise _json.Malformed(f"a {approach.name} version {'needs' if approach.delta else 'has no'} change list")
    if changes is not None:
        _json.fields(changes, ("count", "models", "masks"), what="changes")
        count = _json.integer(changes["count"], "changes.count", 0, n_models + 1)
        _json.string(changes["models"], "changes.models")
        _json.string(changes["masks"], "changes.masks")
        changes = Changes.from_json(changes, n_models, n_tensors_of(architecture))
        if count and not n_models:
            raise _json.Malformed("changes name models of an empty set")
    return VersionRecord(
        id=vid,
        approach=approach.name,
        base=base,
        n_models=n_models,
        created=_created(body["created"]),
        message=_json.string(body["message"], "message"),
        reason=_json.string(body["reason"], "reason"),
        architecture=architecture,
        objects=refs,
        changes=changes,
        details=_details(body["details"]),
        architecture_bytes=_json.integer(body["architecture_bytes"], "architecture_bytes"),
        manifest_bytes=size,
    )


def _decode_ref(entry: Any, version: int, kind: str) -> ObjectRef:
    pinned = version >= 2 and kind == "model-set"
    entry = _json.fields(entry, ("key", "bytes", "xxh3", "pin") if pinned else ("key", "bytes", "xxh3"), what="an object")
    key = _json.string(entry["key"], "an object's key")
    try:
        check_key(key)
    except Exception:
        raise _json.Malformed(f"object key {key!r} is not a store key") from None
    if not key.startswith(ObjectStore.PREFIX):
        raise _json.Malformed(f"object key {key!r} is not under {ObjectStore.PREFIX}")
    return ObjectRef(
        key,
        _json.integer(entry["bytes"], "an object's bytes"),
        _json.hex64(entry["xxh3"], "an object's xxh3"),
        _json.hex64(entry["pin"], "an object's pin") if pinned else None,
    )


def _created(value: Any) -> datetime:
    try:
        created = datetime.fromisoformat(_json.string(value, "created"))
    except ValueError:
        raise _json.Malformed(f"created {value!r} is not an ISO 8601 time") from None
    if created.tzinfo is None:
        raise _json.Malformed(f"created {value!r} has no time zone")
    return created


def _details(value: Any) -> dict[str, Any]:
    details = _json.fields(value, (), _DETAILS, what="details")
    for key, kind in _DETAILS.items():
        if key in details and type(details[key]) is not kind:
            raise _json.Malformed(f"details.{key} must be {kind.__name__}, not {details[key]!r:.40}")
    if "xor_base" in details:
        check_version_id(details["xor_base"])
    return dict(details)


def now() -> datetime:
    return datetime.now(timezone.utc)

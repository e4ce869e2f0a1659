"""The catalog's documents, byte for byte (docs/REPOSITORY.md): version records, format 1
manifests, format 2 commits and checkpoints.

Every document is one JSON line followed by a line with the XXH3-64 of that
line, so a damaged document is detected rather than misread, and every field
is checked for its type and range when read (``mmpack._json``), before the
catalog or anything else uses it. Encoding is deterministic (same state, same
bytes): two writers that write the same checkpoint write identical files.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np

from mmpack import _json, _native
from mmpack.approaches import APPROACHES
from mmpack.errors import RepositoryError, VersionNotFoundError
from mmpack.records import Changes, ObjectRef, VersionRecord

MAX_MODELS = 2**32  # the rows layout indexes models with 32-bit ids
MAX_SHARDS = 2**20  # objects of one version
MAX_VERSION = 10**18
_VERSION_ID = re.compile(r"v[1-9][0-9]{0,17}")
_CHECKSUM_LINE = re.compile(rb"xxh3-64:([0-9a-f]{16})\n")
OBJECT_KEY = re.compile(r"objects/[0-9a-f]{20}\.(mmpack|provenance\.json)")  # what ObjectStore.new_key makes
RECORD_KEYS = ("id", "approach", "base", "n_models", "architecture", "architecture_bytes", "created", "message",
               "reason", "objects", "changes", "details")
# details: what each documented note may hold (docs/REPOSITORY.md, "Details").
_DETAILS = {"compression": str, "xor_base": str, "retrained": int, "function": str, "policy": str, "estimates": dict}


def check_version_id(vid: object) -> str:
    """A well-formed id (``"v1"``, ``"v42"``...); anything else is not found."""
    if not isinstance(vid, str) or not _VERSION_ID.fullmatch(vid):
        raise VersionNotFoundError(f"no version {vid!r}: version ids look like 'v1', 'v42'")
    return vid


def is_version_id(name: object) -> bool:
    return isinstance(name, str) and _VERSION_ID.fullmatch(name) is not None


def version_number(vid: str) -> int:
    return int(check_version_id(vid)[1:])


def now() -> datetime:
    return datetime.now(timezone.utc)


# -- signed documents -----------------------------------------------------------------------


def signed(body: dict[str, Any]) -> bytes:
    """``body`` as one compact JSON line, then ``xxh3-64:<hex>`` of exactly those bytes."""
    encoded = json.dumps(body, separators=(",", ":")).encode()
    return encoded + f"\nxxh3-64:{_native.xxh3_64(encoded):016x}\n".encode()


def unsigned(raw: bytes, what: str) -> Any:
    """The JSON body of a signed document, after checking its checksum line; strict parsing."""
    encoded, newline, checksum = raw.partition(b"\n")
    found = _CHECKSUM_LINE.fullmatch(checksum) if newline else None
    if found is None or int(found.group(1), 16) != _native.xxh3_64(encoded):
        raise RepositoryError(f"{what} fails its checksum: the repository is damaged")
    try:
        return _json.loads(encoded)
    except _json.Malformed as exc:
        raise RepositoryError(f"{what} is malformed: {exc}") from None


def check_format(body: Any, name: str, readable: tuple[int, ...], keys: tuple[str, ...], what: str) -> dict[str, Any]:
    """A document's ``format`` and ``format_version`` first (a newer mmpack's document is reported
    as such, not as malformed), then its exact keys."""
    if not isinstance(body, dict) or body.get("format") != name:
        raise RepositoryError(f"{what} is not an {name!r} document")
    version = body.get("format_version")
    if type(version) is not int or version not in readable:
        raise RepositoryError(
            f"{what} has format version {version!r}; this mmpack reads {name!r} versions "
            f"{', '.join(map(str, readable))} (a newer mmpack may read it)"
        )
    try:
        return _json.fields(body, ("format", "format_version", *keys), what=what)
    except _json.Malformed as exc:
        raise RepositoryError(f"{what} is malformed: {exc}") from None


# -- version records ------------------------------------------------------------------------


def record_to_json(record: VersionRecord) -> dict[str, Any]:
    """The fields of a version record as manifests and commits store them: references carry shard
    ranges only when the version has several shards (or one of part of the set), so a version of
    one object reads as it always did."""
    sharded = is_sharded(record)
    return {
        "id": record.id,
        "approach": record.approach,
        "base": record.base,
        "n_models": record.n_models,
        "architecture": record.architecture,
        "architecture_bytes": record.architecture_bytes,
        "created": record.created.isoformat(),
        "message": record.message,
        "reason": record.reason,
        "objects": [_ref_to_json(o, record.n_models, sharded) for o in record.objects],
        "changes": record.changes.to_json() if record.changes is not None else None,
        "details": record.details,
    }


def _ref_to_json(ref: ObjectRef, n_models: int, sharded: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"key": ref.key, "bytes": ref.bytes, "xxh3": f"{ref.checksum:016x}"}
    if ref.pin is not None:
        entry["pin"] = f"{ref.pin:016x}"
    if sharded and ref.pin is not None:  # model-set objects of a record with shards say their range
        entry.update(first=ref.first, count=ref.stop(n_models) - ref.first, table=ref.table)
    return entry


def is_sharded(record: VersionRecord) -> bool:
    """Whether the record needs shard ranges to be told (catalog documents of version 2): more
    than one data object, or a data object holding less than the whole set."""
    shards = record.shards
    return len(shards) != 1 or shards[0].index != 0 or shards[0].first != 0 or shards[0].stop != record.n_models \
        or any(s.index != 1 or s.first != 0 or s.stop != record.n_models for s in record.table_shards)


def check_shards(refs: tuple[ObjectRef, ...], n_models: int, delta: bool, document: bool) -> None:
    """The rules of docs/REPOSITORY.md ("Shards") for a record's objects; ``_json.Malformed`` if broken.

    Data objects come first, ascending by range, then table objects. A full version's shards tile
    models 0 to ``n_models - 1``; a delta's are disjoint (a delta that changed nothing may have none);
    table objects, where there are any, tile the set. A document (provenance) is one object holding
    every model, followed by its table objects."""
    data = [r for r in refs if not r.table]
    tables = [r for r in refs if r.table]
    if list(refs) != data + tables:
        raise _json.Malformed("a version lists its data objects before its table objects")
    if tables and not delta:
        raise _json.Malformed("only a delta version has table objects")
    if document and (len(data) != 1 or data[0].count is not None):
        raise _json.Malformed("a provenance version has one document, holding every model")
    for what, group, tile in (("data", data, not delta and not document), ("table", tables, True)):
        position = 0
        for ref in group:
            stop = ref.stop(n_models)
            if ref.first < position or stop > n_models or (stop == ref.first and n_models):
                raise _json.Malformed(f"{what} objects must hold disjoint, ascending, non-empty ranges of the "
                                      f"{n_models} models; one holds {ref.first} to {stop - 1}")
            if tile and ref.first != position:
                raise _json.Malformed(f"the {what} objects of the version must hold every model once; models "
                                      f"{position} to {ref.first - 1} are missing")
            position = stop
        if tile and group and position != n_models:
            raise _json.Malformed(f"the {what} objects of the version stop at model {position} of {n_models}")
    if not data and not delta:
        raise _json.Malformed("a full version needs at least one data object")


_IN_BODY = object()


def record_from_json(body: Any, vid: str | None, size: int, n_tensors_of: Any, *, pins: bool | str,
                     changes_for_baselines: bool, changes: Any = _IN_BODY, shards: bool = False) -> VersionRecord:
    """Check and build a record. ``pins``: model-set references carry a pin (manifest format 2,
    catalog format 2). ``changes_for_baselines``: a Baseline saved against a base may record
    what changed (catalog format 2); otherwise only delta approaches have a change list.
    ``shards``: references may carry shard ranges (catalog documents of version 2).
    ``n_tensors_of(fingerprint)`` gives the architecture's tensor count; ``pins="optional"``
    accepts references with or without a pin (records imported from format 1). ``changes``, when
    given, is the change list already decoded (checkpoints decode all at once). Raises
    ``_json.Malformed`` or ``VersionNotFoundError`` (for malformed ids) on anything the spec
    does not allow."""
    body = _json.fields(body, RECORD_KEYS, what="the version record")
    if vid is not None and body["id"] != vid:
        raise _json.Malformed(f"it names id {body['id']!r}")
    vid = check_version_id(body["id"])
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
    ranged = shards and isinstance(objects, list) and any(isinstance(o, dict) and "first" in o for o in objects)
    if not isinstance(objects, list) or not (ranged or 1 <= len(objects) <= 1 + approach.delta) \
            or len(objects) > MAX_SHARDS:
        raise _json.Malformed(f"a {approach.name} version names one object (a delta: and its hash table), "
                              f"or shards, not {objects!r:.80}")
    refs = tuple(_ref_from_json(o, pins if (k > 0 or approach.object_kind == "model-set") else False,
                                ranged and (k > 0 or approach.object_kind == "model-set"), k, n_models)
                 for k, o in enumerate(objects))
    if ranged:
        check_shards(refs, n_models, approach.delta, approach.object_kind == "document")
    decoded = changes
    changes = body["changes"] if decoded is _IN_BODY else decoded
    allowed = approach.delta or (changes_for_baselines and base is not None)
    if changes is None and approach.delta:
        raise _json.Malformed(f"a {approach.name} version needs a change list")
    if changes is not None and not allowed:
        raise _json.Malformed(
            f"a {approach.name} version {'without a base ' if base is None else ''}has no change list"
        )
    if changes is not None and decoded is _IN_BODY:
        _json.fields(changes, ("count", "models", "masks"), what="changes")
        _json.integer(changes["count"], "changes.count", 0, n_models + 1)
        _json.string(changes["models"], "changes.models")
        _json.string(changes["masks"], "changes.masks")
        changes = Changes.from_json(changes, n_models, n_tensors_of(architecture))
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
        delta=approach.delta,
    )


def _ref_from_json(entry: Any, pinned: bool | str, ranged: bool, index: int, n_models: int) -> ObjectRef:
    """One object reference. ``ranged``: a model-set object of a record with shards, whose range
    (``first``, ``count``, ``table``) is given; otherwise object 1 of a delta is its table object."""
    optional = ("pin",) if pinned == "optional" else ()
    required = ("key", "bytes", "xxh3", "pin") if pinned is True else ("key", "bytes", "xxh3")
    if ranged:
        required = (*required, "first", "count", "table")
    entry = _json.fields(entry, required, optional, what="an object")
    pinned = "pin" in entry
    key = _json.string(entry["key"], "an object's key")
    if not OBJECT_KEY.fullmatch(key):
        raise _json.Malformed(f"object key {key!r:.80} is not objects/<20 hex digits>.mmpack (or .provenance.json)")
    first, count, table = 0, None, index > 0
    if ranged:
        first = _json.integer(entry["first"], "an object's first model", 0, MAX_MODELS)
        count = _json.integer(entry["count"], "an object's count of models", 0, MAX_MODELS - first + 1)
        if type(entry["table"]) is not bool:
            raise _json.Malformed(f"an object's table must be true or false, not {entry['table']!r:.40}")
        table = entry["table"]
    elif not key.endswith(".mmpack") and index > 0:
        raise _json.Malformed("a table object is a model-set object")
    return ObjectRef(
        key,
        _json.integer(entry["bytes"], "an object's bytes"),
        _json.hex64(entry["xxh3"], "an object's xxh3"),
        _json.hex64(entry["pin"], "an object's pin") if pinned else None,
        first, count, table,
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


def decode_record(body: Any, vid: str | None, size: int, n_tensors_of: Any, what: str, *, pins: bool | str,
                  changes_for_baselines: bool) -> VersionRecord:
    """:func:`record_from_json` with its problems as :class:`RepositoryError` naming ``what``."""
    try:
        return record_from_json(body, vid, size, n_tensors_of, pins=pins, changes_for_baselines=changes_for_baselines)
    except _json.Malformed as exc:
        raise RepositoryError(f"{what} is malformed: {exc}") from None
    except VersionNotFoundError as exc:
        raise RepositoryError(f"{what} names a malformed version id: {exc}") from None


# -- format 1: one manifest per version ------------------------------------------------------

MANIFEST_FORMAT = "mmpack-version"
MANIFEST_VERSION = 2
READABLE_MANIFESTS = (1, 2)


def manifest_key(vid: str) -> str:
    return f"versions/{check_version_id(vid)}.json"


def encode_manifest(record: VersionRecord) -> bytes:
    """The manifest document of ``record`` (its manifest_bytes field is ignored)."""
    return signed({"format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION, **record_to_json(record)})


def decode_manifest(raw: bytes, vid: str, n_tensors_of: Any) -> VersionRecord:
    """Parse and check a format 1 repository's manifest."""
    what = f"manifest of {vid}"
    body = check_format(unsigned(raw, what), MANIFEST_FORMAT, READABLE_MANIFESTS, RECORD_KEYS, what)
    version = body.pop("format_version")
    body.pop("format")
    return decode_record(body, vid, len(raw), n_tensors_of, what, pins=version >= 2, changes_for_baselines=False)


# -- format 2: commits and checkpoints --------------------------------------------------------

COMMIT_FORMAT = "mmpack-commit"
CHECKPOINT_FORMAT = "mmpack-checkpoint"
CATALOG_VERSION = 2  # version 1 plus shard ranges in object references; written only when a record has shards
READABLE_CATALOG = (1, 2)


def catalog_version(records) -> int:
    """The version a commit or checkpoint holding ``records`` is written as: 2 only if one of them
    has shards, so that a catalog without sharded versions stays readable by version 1 readers."""
    return CATALOG_VERSION if any(is_sharded(r) for r in records) else 1


@dataclass(frozen=True)
class Commit:
    """One commit of the log: its number, the checkpoint it builds on, and the entries since."""

    seq: int
    checkpoint: int
    entries: tuple[dict[str, Any], ...]
    size: int
    version: int = CATALOG_VERSION

    @property
    def shards(self) -> bool:
        """Whether its records may carry shard ranges (version 2)."""
        return self.version >= 2


def entry_has_shards(entry: dict[str, Any]) -> bool:
    """Whether a log entry (as written) holds a record whose objects carry shard ranges."""
    records = [entry.get("record")] if entry.get("op") == "version" else list(entry.get("replaced") or ())
    return any(isinstance(o, dict) and "first" in o for r in records if isinstance(r, dict)
               for o in r.get("objects") or ())


def encode_commit(seq: int, checkpoint: int, entries: list[dict[str, Any]]) -> bytes:
    version = CATALOG_VERSION if any(entry_has_shards(e) for e in entries) else 1
    return signed({"format": COMMIT_FORMAT, "format_version": version, "seq": seq,
                   "checkpoint": checkpoint, "entries": entries})


def decode_commit(raw: bytes, seq: int | None = None) -> Commit:
    """A commit, its numbering checked (``seq``: the number its key gives, when known); its
    entries are checked when the state applies them."""
    what = f"catalog commit {seq}" if seq is not None else "catalog commit"
    body = check_format(unsigned(raw, what), COMMIT_FORMAT, READABLE_CATALOG, ("seq", "checkpoint", "entries"), what)
    try:
        number = _json.integer(body["seq"], "seq", 1, MAX_VERSION)
        checkpoint = _json.integer(body["checkpoint"], "checkpoint", 0, number)
        entries = body["entries"]
        if seq is not None and number != seq:
            raise _json.Malformed(f"it says it is commit {number}")
        if not isinstance(entries, list) or len(entries) != number - checkpoint:
            raise _json.Malformed(f"commit {number} on checkpoint {checkpoint} must hold {number - checkpoint} entries")
        for k, entry in enumerate(entries):
            if not isinstance(entry, dict) or not _json.same(entry.get("seq"), checkpoint + 1 + k):
                raise _json.Malformed(f"entry {k} is not entry {checkpoint + 1 + k} of the log")
    except _json.Malformed as exc:
        raise RepositoryError(f"{what} is malformed: {exc}") from None
    return Commit(number, checkpoint, tuple(entries), len(raw), body["format_version"])


def pack_u32(values: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(values, dtype="<u4").tobytes()).decode()


def unpack_u32(text: Any, what: str) -> np.ndarray:
    try:
        raw = base64.b64decode(_json.string(text, what), validate=True)
    except ValueError:
        raise _json.Malformed(f"{what} is not base64") from None
    if len(raw) % 4:
        raise _json.Malformed(f"{what} is not a whole number of u32")
    return np.frombuffer(raw, dtype="<u4").astype(np.int64)

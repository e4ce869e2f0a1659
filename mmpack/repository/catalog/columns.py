"""The version records of a checkpoint as columns: one array per field, numbers as binary blobs.

A checkpoint of 10,000 versions read as 10,000 JSON objects took 240 us a
version (strict parsing calls back into Python for every object); as one
array per field, with digests, object keys, times and change lists packed
into base64 blobs of little-endian integers, the JSON parser meets a few
long arrays and the checks run once per column. Reading 10,000 versions then
takes a few tens of milliseconds (bench/catalog.py). The layout is in
docs/REPOSITORY.md ("Checkpoints").
"""

from __future__ import annotations

import base64
import re
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np

from mmpack import _json
from mmpack.architecture import Architecture
from mmpack.records import Changes, ObjectRef, VersionRecord
from mmpack.repository.catalog import documents
from mmpack.repository.catalog.documents import check_version_id, version_number

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
SUFFIXES = (".mmpack", ".provenance.json")  # object kinds, by their key's ending
FIELDS = ("count", "id", "approach", "base", "n_models", "architecture", "architecture_bytes", "entry_bytes",
          "created", "created_offset", "message", "reason", "objects", "details", "changes")
OBJECT_FIELDS = ("count", "token", "kind", "bytes", "xxh3", "pin", "pinned")
SHARD_FIELDS = ("first", "models", "table")  # catalog version 2: each object's range of models
_KEY = re.compile(r"objects/([0-9a-f]{20})(\.mmpack|\.provenance\.json)")


def encode(records: list[VersionRecord], approaches: list[str], fingerprints: list[str], *,
           shards: bool = False) -> dict[str, Any]:
    """The ``versions`` object of a checkpoint (``approaches`` and ``fingerprints`` are the tables
    the ``approach`` and ``architecture`` columns index). ``shards``: with every object's range of
    models (catalog version 2)."""
    changed = [r.changes for r in records]
    refs = [o for r in records for o in r.objects]
    present = sorted({key for r in records for key in r.details})
    offsets = [int(r.created.utcoffset().total_seconds()) for r in records]
    for ref in refs:
        if not _KEY.fullmatch(ref.key):
            raise ValueError(f"object key {ref.key!r} is not one mmpack writes")
    objects = {
        "count": [len(r.objects) for r in records],
        "token": base64.b64encode(b"".join(bytes.fromhex(o.key[8:28]) for o in refs)).decode(),
        "kind": [SUFFIXES.index(o.key[28:]) for o in refs],
        "bytes": [o.bytes for o in refs],
        "xxh3": _blob([o.checksum for o in refs], "<u8"),
        "pin": _blob([o.pin or 0 for o in refs], "<u8"),
        "pinned": [int(o.pin is not None) for o in refs],
    }
    if shards:  # a document's range is the whole set, written as 0, 0
        spans = [(0, 0, False) if o.key.endswith(SUFFIXES[1]) else (o.first, o.stop(r.n_models) - o.first, o.table)
                 for r in records for o in r.objects]
        objects["first"] = _blob([s[0] for s in spans], "<u8")
        objects["models"] = _blob([s[1] for s in spans], "<u8")
        objects["table"] = [int(s[2]) for s in spans]
    return {
        "count": len(records),
        "id": [version_number(r.id) for r in records],
        "approach": [approaches.index(r.approach) for r in records],
        "base": [version_number(r.base) if r.base is not None else None for r in records],
        "n_models": [r.n_models for r in records],
        "architecture": [fingerprints.index(r.architecture) for r in records],
        "architecture_bytes": [r.architecture_bytes for r in records],
        "entry_bytes": [r.manifest_bytes for r in records],
        "created": _blob([(r.created - EPOCH) // timedelta(microseconds=1) for r in records], "<i8"),
        "created_offset": offsets,
        "message": [r.message for r in records],
        "reason": [r.reason for r in records],
        "objects": objects,
        "details": {key: [r.details.get(key) for r in records] for key in present},
        "changes": {
            "count": [len(c.models) if c is not None else None for c in changed],
            "models": documents.pack_u32(np.concatenate([c.models for c in changed if c is not None] or [np.empty(0)])),
            "masks": base64.b64encode(b"".join(
                np.packbits(c.masks, axis=1).tobytes() for c in changed if c is not None)).decode(),
        },
    }


def decode(data: Any, approach_names: Any, fingerprints: list[str], architectures: dict[str, Architecture],
           next_version: int, *, shards: bool = False) -> list[VersionRecord]:
    """Check the columns whole (the rules of ``documents.record_from_json``, per column) and build the
    records. Raises ``_json.Malformed`` on anything the spec does not allow."""
    from mmpack.approaches import APPROACHES

    columns = _json.fields(data, FIELDS, what="versions")
    n = _json.integer(columns["count"], "versions.count", 0, documents.MAX_VERSION)
    for name in FIELDS[1:12]:
        if name != "created" and (not isinstance(columns[name], list) or len(columns[name]) != n):
            raise _json.Malformed(f"versions.{name} must list one value per version")
    if not isinstance(approach_names, list) or not all(isinstance(a, str) and a in APPROACHES for a in approach_names):
        raise _json.Malformed(f"approaches must name known approaches; known: {sorted(APPROACHES)}")
    approaches = [APPROACHES[a] for a in approach_names]
    ids = columns["id"]
    if not _ints(ids, 1, next_version) or (n > 1 and np.any(np.diff(np.array(ids, dtype=np.int64)) <= 0)):
        raise _json.Malformed("version ids must be ascending and below next_version")
    if not _ints(columns["approach"], 0, len(approaches)) or not _ints(columns["architecture"], 0, len(fingerprints)):
        raise _json.Malformed("versions.approach and versions.architecture must index their tables")
    kinds = [approaches[a] for a in columns["approach"]]
    bases = columns["base"]
    known = [(b, i) for b, i in zip(bases, ids) if b is not None]
    if not _ints([b for b, _ in known], 1, next_version) or any(b >= i for b, i in known):
        raise _json.Malformed("every base must be an earlier version number, or null")
    if any(a.delta and b is None for a, b in zip(kinds, bases)):
        raise _json.Malformed("a delta version needs a base")
    n_models = columns["n_models"]
    if not _ints(n_models, 0, documents.MAX_MODELS):
        raise _json.Malformed("versions.n_models must be integers from 0 to 2**32 - 1")
    for name in ("architecture_bytes", "entry_bytes"):
        if not _ints(columns[name], 0, 2**63):
            raise _json.Malformed(f"versions.{name} must be non-negative integers")
    for name in ("message", "reason"):
        if not all(isinstance(v, str) for v in columns[name]):
            raise _json.Malformed(f"versions.{name} must be strings")
    created = _times(columns["created"], columns["created_offset"], n)
    fps = [fingerprints[a] for a in columns["architecture"]]
    objects = _objects(columns["objects"], kinds, n_models, shards)
    details = _details(columns["details"], n)
    changes = _changes(columns["changes"], fps, architectures, n)
    records = []
    for k in range(n):
        approach, change = kinds[k], changes[k]
        if (change is None) if approach.delta else (change is not None and bases[k] is None):
            raise _json.Malformed(f"version {ids[k]}: a delta needs a change list, a version without a base has none")
        if change is not None and len(change.models) and change.models[-1] >= n_models[k]:
            raise _json.Malformed(f"the change list of version {ids[k]} names models beyond its {n_models[k]}")
        records.append(VersionRecord(
            f"v{ids[k]}", approach.name, f"v{bases[k]}" if bases[k] is not None else None, n_models[k], created[k],
            columns["message"][k], columns["reason"][k], fps[k], objects[k], change, details[k],
            columns["architecture_bytes"][k], columns["entry_bytes"][k], approach.delta,
        ))
    return records


def _ints(values: list, low: int, high: int) -> bool:
    """Every value an int (not a bool, not a float) in ``[low, high)``; by column, in C loops."""
    return set(map(type, values)) <= {int} and (not values or (low <= min(values) and max(values) < high))


def _blob(values: list[int], dtype: str) -> str:
    return base64.b64encode(np.asarray(values, dtype=dtype).tobytes()).decode()


def _unblob(text: Any, dtype: str, n: int, what: str) -> np.ndarray:
    try:
        raw = base64.b64decode(_json.string(text, what), validate=True)
    except ValueError:
        raise _json.Malformed(f"{what} is not base64") from None
    width = np.dtype(dtype).itemsize
    if len(raw) != n * width:
        raise _json.Malformed(f"{what} must hold {n} values of {width} bytes")
    return np.frombuffer(raw, dtype=dtype)


def _times(micros: Any, offsets: Any, n: int) -> list[datetime]:
    instants = _unblob(micros, "<i8", n, "versions.created").tolist()
    if not _ints(offsets, -86399, 86400):
        raise _json.Malformed("versions.created_offset must be UTC offsets in seconds")
    # The epoch in each offset's zone, once: adding to it gives the instant in that zone directly.
    epochs = {o: EPOCH.astimezone(timezone(timedelta(seconds=o))) for o in set(offsets)}
    return [epochs[o] + timedelta(microseconds=t) for t, o in zip(instants, offsets)]


def _objects(data: Any, kinds: list, n_models: list[int], shards: bool) -> list[tuple[ObjectRef, ...]]:
    n = len(kinds)
    columns = _json.fields(data, OBJECT_FIELDS + (SHARD_FIELDS if shards else ()), what="versions.objects")
    counts = columns["count"]
    if not isinstance(counts, list) or len(counts) != n or not all(
        type(c) is int and (0 <= c <= documents.MAX_SHARDS if shards else 1 <= c <= 1 + kind.delta)
        for c, kind in zip(counts, kinds)
    ):
        raise _json.Malformed("versions.objects.count must give each version one object (a delta: or two), or "
                              "its shards")
    total = sum(counts)
    for name in ("kind", "bytes", "pinned") + (("table",) if shards else ()):
        if not isinstance(columns[name], list) or len(columns[name]) != total:
            raise _json.Malformed(f"versions.objects.{name} must list one value per object")
    if not _ints(columns["kind"], 0, len(SUFFIXES)) or not _ints(columns["bytes"], 0, 2**63) \
            or not _ints(columns["pinned"], 0, 2) or (shards and not _ints(columns["table"], 0, 2)):
        raise _json.Malformed("versions.objects holds values out of range")
    tokens = _unblob(columns["token"], "u1", total * 10, "versions.objects.token").tobytes().hex()
    digests = _unblob(columns["xxh3"], "<u8", total, "versions.objects.xxh3").tolist()
    pins = _unblob(columns["pin"], "<u8", total, "versions.objects.pin").tolist()
    # A provenance version's first object is its document (kind 1, never pinned); every other
    # object is a model-set object (kind 0).
    starts = np.cumsum([0, *counts])
    document = np.zeros(total, dtype=bool)
    document[starts[:-1][[kind.object_kind == "document" for kind in kinds]]] = True
    wrong = (np.array(columns["kind"], dtype=np.int64) == 1) != document
    wrong |= document & np.array(columns["pinned"], dtype=bool)
    if wrong.any():
        k = int(np.searchsorted(starts, np.flatnonzero(wrong)[0], side="right")) - 1
        raise _json.Malformed(f"version {k + 1} of the checkpoint lists an object of the wrong kind")
    owner = np.repeat(np.arange(len(counts)), counts)
    if shards:  # every model-set object states its range; a document 0, 0, 0 (it holds every model)
        firsts = _unblob(columns["first"], "<u8", total, "versions.objects.first").astype(np.int64)
        sizes = _unblob(columns["models"], "<u8", total, "versions.objects.models").astype(np.int64)
        tables = np.array(columns["table"], dtype=bool)
        if np.any(document & ((firsts != 0) | (sizes != 0) | tables)):
            raise _json.Malformed("a document of the checkpoint is given a range")
        beyond = np.flatnonzero(firsts + sizes > np.array(n_models, dtype=np.int64)[owner])
        if len(beyond):
            raise _json.Malformed(f"version {int(owner[beyond[0]]) + 1} of the checkpoint names a range beyond "
                                  "its models")
        spans = [(0, None, False) if d else (f, s, t)
                 for d, f, s, t in zip(document.tolist(), firsts.tolist(), sizes.tolist(), tables.tolist())]
    else:  # catalog version 1: one object holding every model, a delta's second its table object
        spans = [(0, None, j > a) for j, a in enumerate(starts[owner].tolist())]
    refs = [
        ObjectRef(f"objects/{tokens[20 * j : 20 * j + 20]}{SUFFIXES[kind]}", size, digest, pin if pinned else None,
                  *span)
        for j, (kind, size, digest, pin, pinned, span) in enumerate(
            zip(columns["kind"], columns["bytes"], digests, pins, columns["pinned"], spans))
    ]
    out = [tuple(refs[a:b]) for a, b in zip(starts[:-1].tolist(), starts[1:].tolist())]
    if shards:
        for k, found in enumerate(out):
            documents.check_shards(found, n_models[k], kinds[k].delta, kinds[k].object_kind == "document")
    return out


def _details(data: Any, n: int) -> list[dict[str, Any]]:
    columns = _json.fields(data, (), documents._DETAILS, what="versions.details")
    out: list[dict[str, Any]] = [{} for _ in range(n)]
    for key, values in columns.items():
        kind = documents._DETAILS[key]
        if not isinstance(values, list) or len(values) != n or not all(v is None or type(v) is kind for v in values):
            raise _json.Malformed(f"versions.details.{key} must give a {kind.__name__} or null per version")
        for k, value in enumerate(values):
            if value is not None:
                if key == "xor_base":
                    check_version_id(value)
                out[k][key] = value
    return out


def _changes(data: Any, fingerprints: list[str], architectures: dict[str, Architecture], n: int) -> list:
    """Every change list at once: one array of model ids, one of packed masks, unpacked in one call
    when the versions share an architecture, then sliced per version (views, no copies)."""
    data = _json.fields(data, ("count", "models", "masks"), what="versions.changes")
    counts = data["count"]
    if not isinstance(counts, list) or len(counts) != n or not all(c is None or (type(c) is int and c >= 0)
                                                                    for c in counts):
        raise _json.Malformed("versions.changes.count must give a count (or null) per version")
    sizes = np.array([c or 0 for c in counts], dtype=np.int64)
    models = documents.unpack_u32(data["models"], "versions.changes.models")
    if len(models) != int(sizes.sum()):
        raise _json.Malformed("versions.changes.models holds another number of ids than its counts")
    starts = np.concatenate([[0], np.cumsum(sizes)])
    if len(models) > 1:  # ascending within every list (a jump down is allowed only where a list starts)
        down = np.flatnonzero(np.diff(models) <= 0) + 1
        first = np.zeros(len(models) + 1, dtype=bool)
        first[starts[1:-1]] = True
        if not first[down].all():
            raise _json.Malformed("a change list of the checkpoint is not ascending")
    widths = np.array([len(architectures[fp]) for fp in fingerprints], dtype=np.int64)
    row = (widths + 7) // 8
    try:
        masks = np.frombuffer(base64.b64decode(_json.string(data["masks"], "versions.changes.masks"), validate=True),
                              dtype=np.uint8)
    except ValueError:
        raise _json.Malformed("versions.changes.masks is not base64") from None
    mask_bytes = sizes * row
    if len(masks) != int(mask_bytes.sum()):
        raise _json.Malformed("versions.changes.masks holds another number of bytes than its counts")
    uniform = len(set(widths.tolist())) <= 1
    if uniform and len(masks):
        unpacked = np.unpackbits(masks.reshape(-1, int(row[0])), axis=1, count=int(widths[0])).astype(bool)
    mask_starts = np.concatenate([[0], np.cumsum(mask_bytes)])
    out: list[Changes | None] = []
    for k, count in enumerate(counts):
        if count is None:
            out.append(None)
            continue
        ids = models[starts[k] : starts[k + 1]]
        if uniform:
            bits = unpacked[starts[k] : starts[k + 1]] if len(masks) else np.zeros((0, int(widths[k])), bool)
        else:
            packed = masks[mask_starts[k] : mask_starts[k + 1]].reshape(count, int(row[k]))
            bits = np.unpackbits(packed, axis=1, count=int(widths[k])).astype(bool)
        out.append(Changes(ids, bits))
    return out

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
import dataclasses
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
    records. Raises ``_json.Malformed`` on anything the spec does not allow.

    Every check runs here, on whole columns; what the records then hold is built per record only
    when first read: a record's objects, change list and time (see :class:`ColumnRecord`). Listing
    10,000 versions pays for parsing and checking, not for 30,000 objects nobody reads."""
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
    delta = np.array([a.delta for a in approaches], dtype=bool)[np.array(columns["approach"], dtype=np.int64)]
    bases = columns["base"]
    base_numbers = np.array([0 if b is None else b for b in bases], dtype=np.int64)  # 0: no base
    no_base = base_numbers == 0
    if not _ints([b for b in bases if b is not None], 1, next_version) or np.any(
            base_numbers >= np.array(ids, dtype=np.int64)):
        raise _json.Malformed("every base must be an earlier version number, or null")
    if np.any(delta & no_base):
        raise _json.Malformed("a delta version needs a base")
    n_models = columns["n_models"]
    if not _ints(n_models, 0, documents.MAX_MODELS):
        raise _json.Malformed("versions.n_models must be integers from 0 to 2**32 - 1")
    for name in ("architecture_bytes", "entry_bytes"):
        if not _ints(columns[name], 0, 2**63):
            raise _json.Malformed(f"versions.{name} must be non-negative integers")
    for name in ("message", "reason"):
        if not set(map(type, columns[name])) <= {str}:
            raise _json.Malformed(f"versions.{name} must be strings")
    fps = [fingerprints[a] for a in columns["architecture"]]
    block = _Block(
        _times(columns["created"], columns["created_offset"], n),
        _objects(columns["objects"], kinds, n_models, shards),
        _changes(columns["changes"], fps, architectures, n),
    )
    has_change = np.array([c is not None for c in block.changes.counts], dtype=bool)
    wrong = (delta & ~has_change) | (~delta & has_change & no_base)
    if wrong.any():
        raise _json.Malformed(f"version {ids[int(np.argmax(wrong))]}: a delta needs a change list, a version "
                              "without a base has none")
    beyond = block.changes.last_model() >= np.array(n_models, dtype=np.int64)
    if beyond.any():
        k = int(np.argmax(beyond))
        raise _json.Malformed(f"the change list of version {ids[k]} names models beyond its {n_models[k]}")
    details = _details(columns["details"], n)
    new = object.__new__
    vids = [f"v{i}" for i in ids]
    base_ids = [None if b is None else f"v{b}" for b in bases]
    names = [a.name for a in kinds]
    flags = delta.tolist()
    records = []
    for k, (message, reason, detail) in enumerate(zip(columns["message"], columns["reason"], details)):
        record = new(ColumnRecord)
        d = record.__dict__
        d["id"], d["approach"], d["base"], d["n_models"], d["message"], d["reason"] = (
            vids[k], names[k], base_ids[k], n_models[k], message, reason)
        d["architecture"], d["details"], d["architecture_bytes"], d["manifest_bytes"], d["delta"] = (
            fps[k], detail, columns["architecture_bytes"][k], columns["entry_bytes"][k], flags[k])
        d["_block"], d["_row"] = block, k
        records.append(record)
    return records


class _Lazy:
    """A record field built from its columns on first read, then kept in the record like any other
    (a non-data descriptor: a value in the instance wins, so ``dataclasses.replace`` still works).
    Not ``functools.cached_property``: before Python 3.12 it takes one lock per class on every
    first read, which listing 10,000 records and reading them from many threads would contend for."""

    def __init__(self, build) -> None:
        self.build = build

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, record, owner=None):
        if record is None:
            return self
        value = self.build(record._block, record._row)
        record.__dict__[self.name] = value  # two threads may both build it: equal values, either wins
        return value


class ColumnRecord(VersionRecord):
    """A :class:`~mmpack.records.VersionRecord` read from a checkpoint's columns, checked whole
    when the checkpoint was read; its ``created``, ``objects`` and ``changes`` are built on first
    read. Compares, prints and pickles as the plain record it stands for.

    Example::

        record = repo.versions()[-1]   # a ColumnRecord when it comes from a checkpoint
        record.objects                 # built now, kept from then on
    """

    created = _Lazy(lambda block, k: block.times.at(k))
    objects = _Lazy(lambda block, k: block.objects.at(k))
    changes = _Lazy(lambda block, k: block.changes.at(k))

    def _values(self) -> tuple:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(VersionRecord))

    def _plain(self) -> VersionRecord:
        return VersionRecord(*self._values())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VersionRecord):
            return NotImplemented
        return self._plain() == (other._plain() if isinstance(other, ColumnRecord) else other)

    __hash__ = VersionRecord.__hash__

    def __reduce__(self):
        return VersionRecord, self._values()


@dataclasses.dataclass(frozen=True)
class _Block:
    """The decoded columns a checkpoint's records share."""

    times: _Times
    objects: _Objects
    changes: _ChangeLists


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


class _Times:
    """Creation times: instants in microseconds since the epoch, and each one's UTC offset."""

    def __init__(self, instants: list[int], offsets: list[int]) -> None:
        self.instants, self.offsets = instants, offsets
        # The epoch in each offset's zone, once: adding to it gives the instant in that zone directly.
        self.epochs = {o: EPOCH.astimezone(timezone(timedelta(seconds=o))) for o in set(offsets)}

    def at(self, k: int) -> datetime:
        return self.epochs[self.offsets[k]] + timedelta(microseconds=self.instants[k])


# Instants a datetime holds in any UTC offset (a day inside datetime's own range at each end).
_FIRST_INSTANT = (datetime(1, 1, 2, tzinfo=timezone.utc) - EPOCH) // timedelta(microseconds=1)
_LAST_INSTANT = (datetime(9999, 12, 30, tzinfo=timezone.utc) - EPOCH) // timedelta(microseconds=1)


def _times(micros: Any, offsets: Any, n: int) -> _Times:
    instants = _unblob(micros, "<i8", n, "versions.created")
    if n and (int(instants.min()) < _FIRST_INSTANT or int(instants.max()) > _LAST_INSTANT):
        raise _json.Malformed("versions.created holds a time outside the years 1 to 9999")
    if not _ints(offsets, -86399, 86400):
        raise _json.Malformed("versions.created_offset must be UTC offsets in seconds")
    return _Times(instants.tolist(), offsets)


class _Objects:
    """Every version's object references, column by column; ``starts[k]`` is version ``k``'s first."""

    def __init__(self, starts: list[int], tokens: str, kinds: list[int], sizes: list[int], digests: list[int],
                 pins: list[int], pinned: list[int], spans: tuple[list, list, list] | None) -> None:
        self.starts, self.tokens, self.kinds, self.sizes = starts, tokens, kinds, sizes
        self.digests, self.pins, self.pinned, self.spans = digests, pins, pinned, spans

    def at(self, k: int) -> tuple[ObjectRef, ...]:
        first = self.starts[k]
        refs = []
        for j in range(first, self.starts[k + 1]):
            if self.spans is None:  # catalog version 1: one object of every model, a delta's second its table
                span = (0, None, j > first)
            else:
                span = self.spans[0][j], self.spans[1][j], self.spans[2][j]
            refs.append(ObjectRef(f"objects/{self.tokens[20 * j : 20 * j + 20]}{SUFFIXES[self.kinds[j]]}",
                                  self.sizes[j], self.digests[j], self.pins[j] if self.pinned[j] else None, *span))
        return tuple(refs)


def _objects(data: Any, kinds: list, n_models: list[int], shards: bool) -> _Objects:
    n = len(kinds)
    columns = _json.fields(data, OBJECT_FIELDS + (SHARD_FIELDS if shards else ()), what="versions.objects")
    counts = columns["count"]
    allowed = documents.MAX_SHARDS if shards else 1 + np.array([kind.delta for kind in kinds], dtype=np.int64)
    if not isinstance(counts, list) or len(counts) != n or not _ints(counts, 0 if shards else 1, 2**63) or np.any(
        np.array(counts, dtype=np.int64) > allowed
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
    spans = None
    if shards:  # every model-set object states its range; a document 0, 0, 0 (it holds every model)
        firsts = _unblob(columns["first"], "<u8", total, "versions.objects.first")
        sizes = _unblob(columns["models"], "<u8", total, "versions.objects.models")
        tables = np.array(columns["table"], dtype=bool)
        if np.any(document & ((firsts != 0) | (sizes != 0) | tables)):
            raise _json.Malformed("a document of the checkpoint is given a range")
        _check_shards(starts, firsts, sizes, tables, document, kinds, n_models)
        counted = np.where(document, -1, sizes.astype(np.int64)).tolist()
        spans = (firsts.tolist(), [None if c < 0 else c for c in counted], tables.tolist())
    return _Objects(starts.tolist(), tokens, columns["kind"], columns["bytes"], digests, pins, columns["pinned"],
                    spans)


def _check_shards(starts: np.ndarray, firsts: np.ndarray, sizes: np.ndarray, tables: np.ndarray,
                  document: np.ndarray, kinds: list, n_models: list[int]) -> None:
    """``documents.check_shards`` for every version at once (tests/test_catalog_columns.py holds the
    two to the same verdicts): object ``j`` is compared with object ``j - 1`` of its version."""
    counts = np.diff(starts)
    owner = np.repeat(np.arange(len(counts)), counts)
    total = len(owner)
    if np.any(firsts >= documents.MAX_MODELS) or np.any(sizes >= documents.MAX_MODELS):
        raise _json.Malformed("an object of the checkpoint names a range beyond 2**32 models")
    models = np.array(n_models, dtype=np.int64)
    delta = np.array([kind.delta for kind in kinds], dtype=bool)
    documented = np.array([kind.object_kind == "document" for kind in kinds], dtype=bool)
    held = models[owner]
    first = np.where(document, 0, firsts.astype(np.int64))
    stop = np.where(document, held, first + sizes.astype(np.int64))
    after = np.zeros(total, dtype=bool)  # object j follows another object of its version
    after[1:] = owner[1:] == owner[:-1]
    previous_table = np.roll(tables, 1)
    previous_stop = np.roll(stop, 1)
    grouped = after & (tables == previous_table)  # follows an object of the same group (data or table)
    tiled = tables | ~(delta | documented)[owner]  # groups that must hold every model once
    last = np.ones(total, dtype=bool)
    last[:-1] = ~grouped[1:]
    data = counts - np.bincount(owner, weights=tables, minlength=len(counts)).astype(np.int64)

    def refuse(broken: np.ndarray, message: str, *, of_objects: bool = True) -> None:
        if broken.any():
            k = int(owner[np.argmax(broken)]) if of_objects else int(np.argmax(broken))
            raise _json.Malformed(f"version {k + 1} of the checkpoint: {message}")

    refuse(after & previous_table & ~tables, "a version lists its data objects before its table objects")
    refuse(tables & ~delta[owner], "only a delta version has table objects")
    refuse(documented & (data != 1), "a provenance version has one document, holding every model", of_objects=False)
    refuse(stop > held, "an object names a range beyond its models")
    refuse((grouped & (first < previous_stop)) | ((stop == first) & (held != 0)),
           "objects must hold disjoint, ascending, non-empty ranges of the models")
    refuse(tiled & ((grouped & (first != previous_stop)) | (~grouped & (first != 0)) | (last & (stop != held))),
           "the objects of a group must hold every model once")
    refuse(~delta & (data == 0), "a full version needs at least one data object", of_objects=False)


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


class _ChangeLists:
    """Every change list: one array of model ids, their masks unpacked (one ``[ids, tensors]`` array
    when the versions share an architecture, else packed rows per version), sliced per version."""

    def __init__(self, counts: list, models: np.ndarray, starts: list[int], unpacked: np.ndarray | None,
                 masks: np.ndarray, mask_starts: list[int], widths: list[int]) -> None:
        self.counts, self.models, self.starts, self.unpacked = counts, models, starts, unpacked
        self.masks, self.mask_starts, self.widths = masks, mask_starts, widths

    def at(self, k: int) -> Changes | None:
        count = self.counts[k]
        if count is None:
            return None
        a, b = self.starts[k], self.starts[k + 1]
        if self.unpacked is not None:
            bits = self.unpacked[a:b]
        else:
            width = self.widths[k]
            packed = self.masks[self.mask_starts[k] : self.mask_starts[k + 1]].reshape(count, (width + 7) // 8)
            bits = np.unpackbits(packed, axis=1, count=width).astype(bool)
        return Changes(self.models[a:b], bits)

    def last_model(self) -> np.ndarray:
        """The last model id of each version's change list; -1 where it has none."""
        ends = np.array(self.starts[1:], dtype=np.int64)
        found = np.diff(np.array(self.starts, dtype=np.int64)) > 0
        return np.where(found, self.models[np.maximum(ends - 1, 0)] if len(self.models) else -1, -1)


def _changes(data: Any, fingerprints: list[str], architectures: dict[str, Architecture], n: int) -> _ChangeLists:
    """Every change list at once: one array of model ids, one of packed masks, unpacked in one call
    when the versions share an architecture."""
    data = _json.fields(data, ("count", "models", "masks"), what="versions.changes")
    counts = data["count"]
    if not isinstance(counts, list) or len(counts) != n or not _ints([c for c in counts if c is not None], 0, 2**63):
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
    width_of = {fp: len(architectures[fp]) for fp in set(fingerprints)}
    widths = np.array([width_of[fp] for fp in fingerprints], dtype=np.int64)
    row = (widths + 7) // 8
    try:
        masks = np.frombuffer(base64.b64decode(_json.string(data["masks"], "versions.changes.masks"), validate=True),
                              dtype=np.uint8)
    except ValueError:
        raise _json.Malformed("versions.changes.masks is not base64") from None
    mask_bytes = sizes * row
    if len(masks) != int(mask_bytes.sum()):
        raise _json.Malformed("versions.changes.masks holds another number of bytes than its counts")
    unpacked = None
    if len(set(widths.tolist())) <= 1:
        width = int(widths[0]) if n else 0
        unpacked = (np.unpackbits(masks.reshape(-1, int(row[0])), axis=1, count=width).astype(bool) if len(masks)
                    else np.zeros((0, width), dtype=bool))
    mask_starts = np.concatenate([[0], np.cumsum(mask_bytes)])
    return _ChangeLists(counts, models, starts.tolist(), unpacked, masks, mask_starts.tolist(), widths.tolist())

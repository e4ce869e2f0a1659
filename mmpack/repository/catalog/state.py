"""What a format 2 catalog's log says: the state after a commit, and how each entry changes it.

The state is the live versions (their records, in id order), the
architectures they use, the tags and every tag move ever made. It is built
from the newest checkpoint (the state after commit ``C``, compacted) plus
the entries since, and each entry is checked against the state before it is
applied: a log that names a missing base, moves a tag it does not hold, or
skips a version number is reported, never half-applied.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from mmpack import _json
from mmpack._gc import gc_paused
from mmpack.architecture import Architecture
from mmpack.errors import FormatError, RepositoryError
from mmpack.records import VersionRecord
from mmpack.repository.catalog import columns, documents
from mmpack.repository.catalog.documents import check_version_id, is_version_id

_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


def check_tag_name(name: object) -> str:
    """Tag names: 1 to 128 letters, digits, ``.``, ``_`` or ``-``, not starting with ``.`` or ``-``,
    and not shaped like a version id (``v12`` names a version, never a tag)."""
    if not isinstance(name, str) or not _TAG.fullmatch(name) or is_version_id(name):
        raise _json.Malformed(
            f"tag name {name!r} must be 1-128 letters, digits, '.', '_' or '-' (not starting with '.' or '-') "
            "and must not look like a version id such as 'v12'"
        )
    return name


@dataclass(frozen=True)
class TagMove:
    """One move of a tag, as ``repo.tag_log()`` lists it: ``before`` None for a new tag, ``after``
    None for a tag removed."""

    seq: int
    time: datetime
    name: str
    before: str | None
    after: str | None
    message: str

    def to_json(self) -> dict[str, Any]:
        """The move as the tag log's JSON (``mmpack log --tags --json``; docs/REPOSITORY.md)."""
        return {"seq": self.seq, "time": self.time.isoformat(), "name": self.name, "from": self.before,
                "to": self.after, "message": self.message}


@dataclass
class CatalogState:
    """The catalog after commit ``seq``; ``checkpoint`` is the newest checkpoint at or below it,
    and ``pending`` the raw entries since that checkpoint (what the next commit repeats)."""

    seq: int = 0
    checkpoint: int = 0
    next_version: int = 1
    records: dict[str, VersionRecord] = field(default_factory=dict)
    architectures: dict[str, Architecture] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    tag_log: list[TagMove] = field(default_factory=list)
    pending: list[dict[str, Any]] = field(default_factory=list)

    def copy(self) -> CatalogState:
        return CatalogState(self.seq, self.checkpoint, self.next_version, dict(self.records),
                            dict(self.architectures), dict(self.tags), list(self.tag_log), list(self.pending))

    def n_tensors(self, fingerprint: str) -> int:
        found = self.architectures.get(fingerprint)
        if found is None:
            raise _json.Malformed(f"architecture {fingerprint} is not in the catalog")
        return len(found)

    # -- entries ---------------------------------------------------------------------------

    def apply(self, entry: dict[str, Any], shards: bool = True) -> None:
        """Check ``entry`` (the log's next) against this state and apply it; RepositoryError if the
        log is damaged. The state is unchanged when it raises. ``shards``: the entry comes from a
        document that may give shard ranges (catalog version 2)."""
        seq = self.seq + 1
        try:
            if not isinstance(entry, dict):
                raise _json.Malformed("an entry must be an object")
            op = entry.get("op")
            if op == "version":
                change = self._version(entry, seq, shards)
            elif op == "tag":
                change = self._tag(entry, seq)
            elif op == "prune":
                change = self._prune(entry, seq, shards)
            else:
                raise _json.Malformed(f"unknown operation {op!r}")
        except _json.Malformed as exc:
            raise RepositoryError(f"catalog entry {seq} is malformed: {exc}") from None
        except FormatError as exc:
            raise RepositoryError(f"catalog entry {seq} is malformed: {exc}") from None
        change()
        self.seq = seq
        self.pending.append(entry)

    def _version(self, entry: dict[str, Any], seq: int, shards: bool):
        _json.fields(entry, ("seq", "time", "op", "record", "architecture"), what="a version entry")
        _entry_time(entry)
        new_architecture = None
        if entry["architecture"] is not None:
            new_architecture = Architecture.from_json(entry["architecture"])
        architectures = dict(self.architectures)
        if new_architecture is not None:
            architectures[new_architecture.fingerprint()] = new_architecture
        size = len(json.dumps(entry, separators=(",", ":")))
        record = documents.record_from_json(
            entry["record"], None, size, lambda fp: _n_tensors(architectures, fp), pins=True,
            changes_for_baselines=True, shards=shards,
        )
        if record.id != f"v{self.next_version}":
            raise _json.Malformed(f"version {record.id} where v{self.next_version} comes next")
        if (new_architecture is None) == (record.architecture not in self.architectures):
            raise _json.Malformed(f"{record.id} must carry its architecture exactly when the catalog lacks it")
        if new_architecture is not None and new_architecture.fingerprint() != record.architecture:
            raise _json.Malformed(f"{record.id} carries an architecture other than the one it names")
        self._check_base(record)

        def change() -> None:
            self.architectures = architectures
            self.records[record.id] = record
            self.next_version += 1

        return change

    def _tag(self, entry: dict[str, Any], seq: int):
        _json.fields(entry, ("seq", "time", "op", "name", "from", "to", "message"), what="a tag entry")
        name = check_tag_name(entry["name"])
        before, after = entry["from"], entry["to"]
        if before != self.tags.get(name):
            raise _json.Malformed(f"tag {name!r} moves from {before!r}, but it is on {self.tags.get(name)!r}")
        if after is not None and check_version_id(after) not in self.records:
            raise _json.Malformed(f"tag {name!r} moves to {after!r}, which is not a live version")
        if before is None and after is None:
            raise _json.Malformed(f"tag {name!r} neither exists nor is created")
        move = TagMove(seq, _entry_time(entry), name, before, after, _json.string(entry["message"], "message"))

        def change() -> None:
            if after is None:
                del self.tags[name]
            else:
                self.tags[name] = after
            self.tag_log.append(move)

        return change

    def _prune(self, entry: dict[str, Any], seq: int, shards: bool):
        _json.fields(entry, ("seq", "time", "op", "deleted", "replaced", "message"), what="a prune entry")
        time = _entry_time(entry)
        message = _json.string(entry["message"], "message")
        deleted = entry["deleted"]
        if not isinstance(deleted, list) or not all(is_version_id(v) and v in self.records for v in deleted):
            raise _json.Malformed(f"prune deletes {deleted!r:.80}, not a list of live versions")
        if len(set(deleted)) != len(deleted):
            raise _json.Malformed("prune deletes a version twice")
        if not isinstance(entry["replaced"], list):
            raise _json.Malformed("prune's replaced records must be a list")
        records = {k: v for k, v in self.records.items() if k not in set(deleted)}
        for body in entry["replaced"]:
            replacement = documents.record_from_json(
                body, None, 0, lambda fp: self.n_tensors(fp), pins=True, changes_for_baselines=True, shards=shards
            )
            old = records.get(replacement.id)
            if old is None:
                raise _json.Malformed(f"prune replaces {replacement.id}, which is not a kept version")
            if (replacement.n_models, replacement.architecture) != (old.n_models, old.architecture):
                raise _json.Malformed(f"prune replaces {replacement.id} with a set of another shape")
            records[replacement.id] = _with_bytes(replacement, old.manifest_bytes)
        for record in records.values():
            if record.base is not None and record.base not in records and record.delta:
                raise _json.Malformed(f"after the prune, {record.id} is a delta on {record.base}, which is gone")
        untag = sorted(name for name, vid in self.tags.items() if vid not in records)
        moves = [TagMove(seq, time, name, self.tags[name], None, message or "pruned") for name in untag]

        def change() -> None:
            self.records = records
            for name in untag:
                del self.tags[name]
            self.tag_log.extend(moves)

        return change

    def _check_base(self, record: VersionRecord) -> None:
        if record.base is None:
            return
        base = self.records.get(record.base)
        if base is None:
            raise _json.Malformed(f"{record.id} names base {record.base}, which is not a live version")
        if (base.n_models, base.architecture) != (record.n_models, record.architecture):
            raise _json.Malformed(f"{record.id} is saved against {record.base}, a set of another shape")

    # -- checkpoints -----------------------------------------------------------------------

    def encode_checkpoint(self) -> bytes:
        """The state as a checkpoint document (docs/REPOSITORY.md), its records as columns
        (:mod:`~mmpack.repository.catalog.columns`). The same state always gives the same bytes."""
        from mmpack.approaches import APPROACHES

        fingerprints = sorted(self.architectures)
        approaches = list(APPROACHES)
        records = list(self.records.values())
        version = documents.catalog_version(records)
        return documents.signed({
            "format": documents.CHECKPOINT_FORMAT,
            "format_version": version,
            "seq": self.seq,
            "next_version": self.next_version,
            "architectures": {fp: self.architectures[fp].to_json() for fp in fingerprints},
            "approaches": approaches,
            "versions": columns.encode(records, approaches, fingerprints, shards=version >= 2),
            "tags": dict(sorted(self.tags.items())),
            "tag_log": [m.to_json() for m in self.tag_log],
        })

    @classmethod
    def decode_checkpoint(cls, raw: bytes, seq: int) -> CatalogState:
        what = f"catalog checkpoint {seq}"
        # Parsing and building 10,000 versions makes ~100,000 objects and no cycles: collections
        # in the middle of it cost 40% of the time.
        with gc_paused():
            body = documents.check_format(
                documents.unsigned(raw, what), documents.CHECKPOINT_FORMAT, documents.READABLE_CATALOG,
                ("seq", "next_version", "architectures", "approaches", "versions", "tags", "tag_log"), what,
            )
            try:
                return cls._from_checkpoint(body, seq, body["format_version"] >= 2)
            except (_json.Malformed, FormatError) as exc:
                raise RepositoryError(f"{what} is malformed: {exc}") from None

    @classmethod
    def _from_checkpoint(cls, body: dict[str, Any], seq: int, shards: bool) -> CatalogState:
        if not _json.same(body["seq"], seq):
            raise _json.Malformed(f"it says it is checkpoint {body['seq']!r}")
        state = cls(seq=seq, checkpoint=seq)
        state.next_version = _json.integer(body["next_version"], "next_version", 1, documents.MAX_VERSION)
        architectures = body["architectures"]
        if not isinstance(architectures, dict):
            raise _json.Malformed("architectures must be an object")
        for fp, data in architectures.items():
            found = Architecture.from_json(data)
            if found.fingerprint() != fp:
                raise _json.Malformed(f"architecture {fp} does not match its fingerprint")
            state.architectures[fp] = found
        records = columns.decode(body["versions"], body["approaches"], list(architectures), state.architectures,
                                 state.next_version, shards=shards)
        live = {r.id for r in records}
        for record in records:
            if record.delta and record.base not in live:
                raise _json.Malformed(f"{record.id} is a delta on {record.base}, which is not a live version")
            state.records[record.id] = record
        tags = body["tags"]
        if not isinstance(tags, dict):
            raise _json.Malformed("tags must be an object")
        for name, vid in tags.items():
            check_tag_name(name)
            if vid not in state.records:
                raise _json.Malformed(f"tag {name!r} is on {vid!r}, which is not a live version")
            state.tags[name] = vid
        if not isinstance(body["tag_log"], list):
            raise _json.Malformed("tag_log must be an array")
        for move in body["tag_log"]:
            move = _json.fields(move, ("seq", "time", "name", "from", "to", "message"), what="a tag move")
            state.tag_log.append(TagMove(
                _json.integer(move["seq"], "tag move seq", 1, seq + 1), documents._created(move["time"]),
                check_tag_name(move["name"]), _optional_id(move["from"]), _optional_id(move["to"]),
                _json.string(move["message"], "tag move message"),
            ))
        return state


def _n_tensors(architectures: dict[str, Architecture], fingerprint: str) -> int:
    found = architectures.get(fingerprint)
    if found is None:
        raise _json.Malformed(f"architecture {fingerprint} is not in the catalog")
    return len(found)


def _entry_time(entry: dict[str, Any]) -> datetime:
    return documents._created(entry["time"])


def _optional_id(value: Any) -> str | None:
    return None if value is None else check_version_id(value)


def _with_bytes(record: VersionRecord, size: int) -> VersionRecord:
    from dataclasses import replace

    return replace(record, manifest_bytes=size)



"""Format 2 catalogs: a log of commits with checkpoints, read at a cost that does not grow with history.

Keys (docs/REPOSITORY.md, "Format 2"):

* ``catalog/log/<seq>.json``: commit ``seq`` (20 digits), created once
  (create-only): publishing a version, moving a tag or pruning is this one
  conditional write, so concurrent writers are serialised by the store.
* ``catalog/checkpoints/<seq>.json``: the whole state after commit ``seq``,
  compacted; checkpoint 0 is the state a repository starts from.
* ``catalog/HEAD.json``: a copy of the newest commit, overwritten after each
  commit. Only a hint: a reader lists the log after it to find newer ones.

The writer that starts a new checkpoint also removes the catalog documents
no reader needs any more (everything before the previous checkpoint), so the
catalog holds two checkpoints and at most 64 commits whatever the history.

Every commit repeats the entries since the checkpoint it builds on, so a
reader needs three requests whatever the history: HEAD, a listing of the
commits after it, and that checkpoint (plus the newest commit, if HEAD is
stale). A writer starts a new checkpoint once :data:`CHECKPOINT_EVERY`
entries have piled up, and writes the checkpoint itself (deterministic
content, a plain write) before the first commit that builds on it.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from mmpack.architecture import Architecture
from mmpack.errors import InvalidArgumentError, MMPackError, RepositoryError, TagConflictError, VersionNotFoundError
from mmpack.records import VersionRecord
from mmpack.repository.catalog import documents
from mmpack.repository.catalog.base import Catalog
from mmpack.repository.catalog.documents import Commit, check_version_id, decode_commit, encode_commit, now
from mmpack.repository.catalog.state import CatalogState, TagMove, check_tag_name
from mmpack.repository.cleanup import WriteLog, create_once

LOG = "catalog/log/"
CHECKPOINTS = "catalog/checkpoints/"
HEAD = "catalog/HEAD.json"
CHECKPOINT_EVERY = 32
_MAX_ATTEMPTS = 1000


def log_key(seq: int) -> str:
    return f"{LOG}{seq:020d}.json"


def checkpoint_key(seq: int) -> str:
    return f"{CHECKPOINTS}{seq:020d}.json"


def _seq_of(key: str, prefix: str) -> int | None:
    name = key[len(prefix) :]
    stem = name[: -len(".json")] if name.endswith(".json") else ""
    return int(stem) if len(stem) == 20 and stem.isdigit() else None


class Format2Catalog(Catalog):
    """The log, its checkpoints and HEAD; the state after the newest commit, kept in memory."""

    format_version = 2

    def __init__(self, store, objects, head: Commit | None = None) -> None:
        super().__init__(store, objects)
        self._state = CatalogState()
        self._loaded = False
        self._known_head = head  # HEAD as the opener read it: the first refresh need not read it again

    @staticmethod
    def read_head(store) -> Commit | None:
        """The newest commit as HEAD has it, or None (absent or unreadable: HEAD is only a hint)."""
        try:
            return decode_commit(store.get(HEAD))
        except (FileNotFoundError, RepositoryError):
            return None

    @classmethod
    def initial_checkpoint(cls, state: CatalogState | None = None) -> bytes:
        """Checkpoint 0: the empty state of a new repository, or one imported by an upgrade."""
        return (state or CatalogState()).encode_checkpoint()

    # -- reading -----------------------------------------------------------------------------

    @property
    def state(self) -> CatalogState:
        with self._lock:
            if not self._loaded:
                self.refresh()
            return self._state

    @property
    def seq(self) -> int:
        return self.state.seq

    def refresh(self) -> None:
        with self._lock:
            for attempt in range(3):  # gc may remove a document between a listing and its read
                try:
                    self._refresh()
                    self._loaded = True
                    return
                except FileNotFoundError:
                    if attempt == 2:
                        raise RepositoryError(
                            f"the catalog of {self.store!r} lost documents while being read"
                        ) from None

    def _refresh(self) -> None:
        head = self._head()
        known = self._state.seq if self._loaded else 0
        start = max(head.seq if head is not None else 0, known)
        newer = [s for s in (_seq_of(k, LOG) for k in self.store.list_after(LOG, log_key(start))) if s is not None]
        newest = max(newer, default=start)
        if self._loaded and newest == self._state.seq:
            return
        if newest == 0:
            self._state = self._checkpoint(0)
            return
        commit = (
            head if head is not None and head.seq == newest else decode_commit(self.store.get(log_key(newest)), newest)
        )
        if self._loaded and self._state.seq >= commit.checkpoint:
            state = self._state.copy()
        else:
            state = self._checkpoint(commit.checkpoint)
        for entry in commit.entries[state.seq - commit.checkpoint :]:
            state.apply(entry, commit.shards)
        state.checkpoint = commit.checkpoint
        state.pending = list(commit.entries)
        self._state = state

    def _head(self) -> Commit | None:
        head, self._known_head = self._known_head, None
        return head if head is not None else self.read_head(self.store)

    def _checkpoint(self, seq: int) -> CatalogState:
        try:
            raw = self.store.get(checkpoint_key(seq))
        except FileNotFoundError:
            if seq == 0:
                raise RepositoryError(
                    f"{self.store!r} has no catalog checkpoint 0: the repository is damaged"
                ) from None
            raise
        return CatalogState.decode_checkpoint(raw, seq)

    def ids(self) -> list[str]:
        self.refresh()
        return list(self._state.records)

    def versions(self) -> list[VersionRecord]:
        self.refresh()
        return list(self._state.records.values())

    def record(self, vid: str) -> VersionRecord:
        check_version_id(vid)
        found = self.state.records.get(vid)
        if found is None:
            self.refresh()
            found = self._state.records.get(vid)
        if found is None:
            raise VersionNotFoundError(f"no version {vid!r} in {self.store!r}")
        return found

    def architecture(self, fingerprint: str) -> Architecture:
        found = self.state.architectures.get(fingerprint)
        if found is None:
            raise RepositoryError(f"architecture {fingerprint!r} is not in the catalog of {self.store!r}")
        return found

    def tags(self) -> dict[str, str]:
        self.refresh()
        return dict(self._state.tags)

    def tag_log(self) -> list[TagMove]:
        self.refresh()
        return list(self._state.tag_log)

    # -- writing -----------------------------------------------------------------------------

    def publish(self, build: Callable[[str, int], VersionRecord], architecture: Architecture,
                written: WriteLog | None = None) -> VersionRecord:
        fingerprint = architecture.fingerprint()

        def entry(state: CatalogState, seq: int) -> dict:
            new = fingerprint not in state.architectures
            arch_json = architecture.to_json() if new else None
            size = len(json.dumps(arch_json, separators=(",", ":"))) if new else 0
            record = build(f"v{state.next_version}", size)
            return {"seq": seq, "time": now().isoformat(), "op": "version",
                    "record": documents.record_to_json(record), "architecture": arch_json}

        state = self._commit(entry, written)
        return state.records[f"v{state.next_version - 1}"]

    def move_tag(self, name: str, to: str | None, expected: str | None, message: str) -> TagMove:
        from mmpack import _json

        try:
            check_tag_name(name)
        except _json.Malformed as exc:
            raise InvalidArgumentError(str(exc)) from None

        def entry(state: CatalogState, seq: int) -> dict:
            current = state.tags.get(name)
            if expected is not None and current != expected:
                raise TagConflictError(f"tag {name!r} is on {current or 'no version'}, not on {expected}")
            if to is None and current is None:
                raise VersionNotFoundError(f"no tag {name!r} in {self.store!r}")
            if to is not None and to not in state.records:
                raise VersionNotFoundError(f"no version {to!r} in {self.store!r}")
            return {"seq": seq, "time": now().isoformat(), "op": "tag", "name": name, "from": current, "to": to,
                    "message": message}

        return self._commit(entry).tag_log[-1]

    def commit_prune(self, deleted: list[str], replaced: list[VersionRecord], message: str, seen: int) -> None:
        def entry(state: CatalogState, seq: int) -> dict:
            if state.seq != seen:
                raise StaleCatalogError()
            return {"seq": seq, "time": now().isoformat(), "op": "prune", "deleted": list(deleted),
                    "replaced": [documents.record_to_json(r) for r in replaced], "message": message}

        self._commit(entry)

    def _commit(self, make_entry: Callable[[CatalogState, int], dict], written: WriteLog | None = None) -> CatalogState:
        """Append the entry ``make_entry(state, seq)`` as commit ``seq = state.seq + 1``; on a race,
        catch up and build the entry again against the new state (which may refuse it)."""
        with self._lock:
            state = self.state
            for _ in range(_MAX_ATTEMPTS):
                seq = state.seq + 1
                entry = make_entry(state, seq)
                after = state.copy()
                after.apply(entry)  # the same checks every reader makes, before anything is written
                if len(state.pending) >= CHECKPOINT_EVERY:
                    self._ensure_checkpoint(state)
                    checkpoint, entries = state.seq, [entry]
                else:
                    checkpoint, entries = state.checkpoint, [*state.pending, entry]
                content = encode_commit(seq, checkpoint, entries)
                if create_once(self.store, log_key(seq), content, written):
                    after.checkpoint, after.pending = checkpoint, entries
                    self._state = after
                    self._put_head(content)
                    if checkpoint != state.checkpoint:
                        self._compact(below=state.checkpoint)
                    return after
                self.refresh()
                state = self._state
            raise RepositoryError("could not commit to the catalog: too many concurrent writers")

    def _ensure_checkpoint(self, state: CatalogState) -> None:
        key = checkpoint_key(state.seq)
        if not self.store.exists(key):
            self.store.put(key, state.encode_checkpoint())

    def _compact(self, below: int) -> None:
        """Remove what no reader needs once commits build on a newer checkpoint: the checkpoints
        before ``below`` (the previous one stays, for readers that started from it) and the commits
        up to it. Best effort: ``gc`` removes whatever is left (a failed delete, a killed writer)."""
        try:
            for prefix, last in ((LOG, below), (CHECKPOINTS, below - 1)):
                for key in self.store.list(prefix):
                    seq = _seq_of(key, prefix)
                    if seq is not None and seq <= last:
                        self.store.delete(key)
        except (OSError, MMPackError):
            pass

    def _put_head(self, content: bytes) -> None:
        try:
            self.store.put(HEAD, content)
        except (OSError, MMPackError):
            pass  # a hint only: readers find the commit by listing the log after the old HEAD


class StaleCatalogError(Exception):
    """The catalog moved since the caller planned against it (prune plans again); internal."""

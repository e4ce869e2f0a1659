"""The repository against a plain in-memory model of what it should hold (hypothesis state machine):
saves, recoveries, tags and their log, prune and gc, seen from the same and from fresh Repository objects."""

from __future__ import annotations

import shutil
import tempfile

import numpy as np
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from mmpack import (
    Architecture,
    ModelSet,
    Repository,
    SnapshotPolicy,
    TagConflictError,
    TensorSpec,
    VersionNotFoundError,
)

ARCH = Architecture((
    TensorSpec("w", "parameter", torch.float32, (3, 2)),
    TensorSpec("b", "parameter", torch.float16, (2,)),
    TensorSpec("steps", "buffer", torch.int64, ()),
))
N_MODELS = 6


class RepositoryMachine(RuleBasedStateMachine):
    @initialize(snapshot_every=st.sampled_from([None, 1, 3]))
    def open(self, snapshot_every):
        self.directory = tempfile.mkdtemp(prefix="mmpack-state-")
        self.repo = Repository(self.directory, fsync=False, snapshots=SnapshotPolicy(every=snapshot_every))
        self.expected: dict[str, ModelSet] = {}
        self.tags: dict[str, str] = {}
        self.moves: list[tuple[str, str | None, str | None]] = []
        self.counter = 0

    def teardown(self):
        shutil.rmtree(self.directory, ignore_errors=True)

    def _new_set(self, like: ModelSet | None, touched: list[tuple[int, int]]) -> ModelSet:
        self.counter += 1
        if like is None:
            rng = np.random.default_rng(self.counter)
            tensors = {
                s.name: torch.from_numpy(rng.integers(0, 256, N_MODELS * s.nbytes, dtype=np.uint8))
                .view(s.dtype)
                .reshape(N_MODELS, *s.shape)
                .clone()
                for s in ARCH.tensors
            }
        else:
            tensors = {n: t.clone() for n, t in like.tensors.items()}
            for model, tensor in touched:
                name = ARCH.tensors[tensor].name
                tensors[name][model].view(-1).view(torch.uint8)[0] ^= (self.counter % 255) + 1
        return ModelSet(ARCH, tensors)

    @rule()
    def save_baseline(self):
        ms = self._new_set(None, [])
        self.expected[self.repo.save(ms)] = ms

    @precondition(lambda self: self.expected)
    @rule(data=st.data(), touched=st.lists(st.tuples(st.integers(0, N_MODELS - 1), st.integers(0, 2)), max_size=8))
    def save_update(self, data, touched):
        base = data.draw(st.sampled_from(sorted(self.expected)))
        ms = self._new_set(self.expected[base], touched)
        vid = self.repo.save(ms, approach="update", base=base)
        self.expected[vid] = ms

    @precondition(lambda self: self.expected)
    @rule(data=st.data(), strategy=st.sampled_from(["resolve", "recursive"]))
    def recover_all(self, data, strategy):
        vid = data.draw(st.sampled_from(sorted(self.expected)))
        assert self.repo.recover(vid, strategy=strategy).equal(self.expected[vid])

    @precondition(lambda self: self.expected)
    @rule(data=st.data(), indices=st.lists(st.integers(0, N_MODELS - 1), max_size=5))
    def recover_some(self, data, indices):
        vid = data.draw(st.sampled_from(sorted(self.expected)))
        fresh = Repository(self.directory)
        assert fresh.recover(vid, indices=indices).equal(self.expected[vid].select(indices))

    @precondition(lambda self: self.expected)
    @rule(data=st.data(), name=st.sampled_from(["production", "canary"]), stale=st.booleans())
    def tag(self, data, name, stale):
        vid = data.draw(st.sampled_from(sorted(self.expected)))
        current = self.tags.get(name)
        expected = (current or "v1") if not stale else "v999"
        if stale and current != "v999":
            try:
                self.repo.tag(name, vid, expected=expected)
            except (TagConflictError, VersionNotFoundError):
                return
            raise AssertionError("a compare-and-swap from the wrong version succeeded")
        self.repo.tag(name, vid)
        self.moves.append((name, current, vid))
        self.tags[name] = vid

    @precondition(lambda self: self.tags)
    @rule(data=st.data())
    def untag(self, data):
        name = data.draw(st.sampled_from(sorted(self.tags)))
        self.repo.untag(name, expected=self.tags[name])
        self.moves.append((name, self.tags.pop(name), None))

    @precondition(lambda self: len(self.expected) > 1)
    @rule(keep_last=st.integers(1, 3), keep_tagged=st.booleans(), dry_run=st.booleans())
    def prune(self, keep_last, keep_tagged, dry_run):
        ids = sorted(self.expected, key=lambda v: int(v[1:]))
        kept = set(ids[-keep_last:]) | (set(self.tags.values()) if keep_tagged else set())
        report = self.repo.prune(keep_last=keep_last, keep_tagged=keep_tagged, dry_run=dry_run)
        assert set(report.deleted) == set(ids) - kept
        if dry_run:
            return
        for vid in report.deleted:
            del self.expected[vid]
        for name in sorted(self.tags):
            if self.tags[name] not in kept:
                self.moves.append((name, self.tags.pop(name), None))

    @rule()
    def gc(self):
        self.repo.gc(grace_seconds=0)
        referenced = {ref.key for record in self.repo.versions() for ref in record.objects}
        assert set(self.repo.store.list("objects/")) == referenced

    @invariant()
    def listing_matches(self):
        if hasattr(self, "repo"):
            assert [r.id for r in self.repo.versions()] == sorted(self.expected, key=lambda v: int(v[1:]))
            fresh = Repository(self.directory, create=False)
            assert fresh.tags() == self.tags
            assert [(m.name, m.before, m.after) for m in fresh.tag_log()] == self.moves


RepositoryMachine.TestCase.settings = settings(max_examples=30, stateful_step_count=20, deadline=None)
TestRepositoryMachine = RepositoryMachine.TestCase

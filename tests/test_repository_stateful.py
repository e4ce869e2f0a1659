"""The repository against a plain in-memory model of what it should hold (hypothesis state machine)."""

from __future__ import annotations

import shutil
import tempfile

import numpy as np
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from mmpack import Architecture, ModelSet, Repository, SnapshotPolicy, TensorSpec

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
        self.counter = 0

    def teardown(self):
        shutil.rmtree(self.directory, ignore_errors=True)

    def _new_set(self, like: ModelSet | None, touched: list[tuple[int, int]]) -> ModelSet:
        self.counter += 1
        if like is None:
            rng = np.random.default_rng(self.counter)
            tensors = {
                s.name: torch.from_numpy(rng.integers(0, 256, N_MODELS * s.nbytes, dtype=np.uint8)).view(s.dtype).reshape(N_MODELS, *s.shape).clone()
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

    @invariant()
    def listing_matches(self):
        if hasattr(self, "repo"):
            assert [r.id for r in self.repo.versions()] == sorted(self.expected, key=lambda v: int(v[1:]))


RepositoryMachine.TestCase.settings = settings(max_examples=25, stateful_step_count=15, deadline=None)
TestRepositoryMachine = RepositoryMachine.TestCase

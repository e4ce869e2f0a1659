"""mmpack.Checkpointer: one call per epoch, one to resume, retention, failures, and kill -9."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from faulty_store import Fault, FaultyStore
from golden_sets import GOLDEN_DIR
from training_driver import FLEET, digest

import mmpack
from mmpack import ModelSet
from mmpack.errors import InvalidArgumentError
from mmpack.store import local
from mmpack.workloads.fleet import Fleet

DRIVER = os.path.join(os.path.dirname(__file__), "training_driver.py")


@pytest.fixture
def one_thread():
    """The subprocess trains with one thread; bit-exact comparisons need the same here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def train(fleet: Fleet, epochs) -> list[ModelSet]:
    """Train through ``epochs``; copies of the set after each."""
    seen = []
    for epoch in epochs:
        fleet.train_epoch(epoch)
        seen.append(fleet.modelset().select(range(fleet.n_models)))
    return seen


def test_a_loop_checkpoints_every_n_epochs_keeps_the_last_and_resumes(tmp_path):
    fleet = Fleet(12)
    ms = fleet.modelset()
    repo = mmpack.Repository(tmp_path / "r")
    ckpt = mmpack.Checkpointer(repo, every=2, keep_last=2, gc_grace_seconds=0)
    assert ckpt.resume(out=ms) == 0 and ckpt.latest() is None
    after = {}
    for epoch in range(7):
        fleet.train_epoch(epoch)
        step = ckpt.step(epoch, ms)
        assert (step is None) == (epoch % 2 == 0)
        after[epoch] = ms.select(range(12))
    ckpt.close()
    records = repo.versions()
    assert [r.message for r in records] == ["checkpoint epoch 3", "checkpoint epoch 5"]
    assert ckpt.latest() == (5, records[-1].id)
    assert [r.base for r in repo.chain(records[-1].id)][:1] in ([records[0].id], [None])
    fresh = Fleet(12, seed=7)
    again = mmpack.Checkpointer(repo, every=2, keep_last=2)
    assert again.resume(out=fresh.modelset()) == 6
    assert fresh.modelset().equal(after[5])
    assert repo.gc(grace_seconds=0).objects == 0  # retention collected what the prunes freed
    repo.close()


def test_updates_chain_on_the_previous_checkpoint_and_resume_without_out(tmp_path):
    fleet = Fleet(10)
    ms = fleet.modelset()
    with mmpack.Repository(tmp_path / "r") as repo:
        ckpt = mmpack.Checkpointer(repo, approach="update")
        for epoch in range(3):
            fleet.train_epoch(epoch, models=slice(2, 4))  # a few models train: small deltas
            ckpt.step(epoch, ms)
        ckpt.wait()
        records = repo.versions()
        assert [r.approach for r in records] == ["baseline", "update", "update"]
        assert [r.base for r in records] == [None, "v1", "v2"]
        assert list(records[2].changes.models) == [2, 3]
        later = mmpack.Checkpointer(repo, approach="update")
        assert later.resume() == 3 and later.restored.equal(ms)
        fleet.train_epoch(3, models=slice(0, 1))
        assert repo.version(later.step(3, ms).result()).base == "v3"


def test_blocking_checkpoints_return_ids(tmp_path):
    fleet = Fleet(4)
    with mmpack.Repository(tmp_path / "r") as repo:
        ckpt = mmpack.Checkpointer(repo, blocking=True, keep_last=1)
        assert [ckpt.step(e, fleet.modelset()) for e in range(3)] == ["v1", "v2", "v3"]
        assert [r.id for r in repo.versions()] == ["v3"]
        assert ckpt.save(2, fleet.modelset()) == "v4"  # a write-back outside the schedule


def test_a_failed_checkpoint_is_raised_once_by_the_next_call_and_the_chain_goes_on(tmp_path):
    store = FaultyStore(local.LocalStore(tmp_path / "r"))
    repo = mmpack.Repository(store=store)
    fleet = Fleet(6)
    ms = fleet.modelset()
    ckpt = mmpack.Checkpointer(repo, approach="update")
    ckpt.step(0, ms).result()
    store.arm(Fault(0, "ENOSPC", persistent=True))
    fleet.train_epoch(1)
    ckpt.step(1, ms)
    repo._saver.wait()  # the save fails; nobody has asked its future
    store.arm(None)
    fleet.train_epoch(2)
    with pytest.raises(OSError, match="No space left"):
        ckpt.step(2, ms)
    assert ckpt.step(2, ms).result() == "v2"
    assert repo.version("v2").base == "v1"  # on the newest saved checkpoint, not the failed one
    ckpt.close()
    repo.close()  # the failure was seen: nothing more to report
    assert mmpack.Repository(tmp_path / "r").recover("v2").equal(ms)


def test_checkpointer_arguments_are_checked(tmp_path):
    repo = mmpack.Repository(tmp_path / "r")
    for bad in ({"every": 0}, {"keep_last": 0}, {"name": "no spaces"}, {"gc_grace_seconds": -1}):
        with pytest.raises(InvalidArgumentError):
            mmpack.Checkpointer(repo, **bad)
    with pytest.raises(TypeError):
        mmpack.Checkpointer(str(tmp_path))
    with pytest.raises(InvalidArgumentError, match="epoch"):
        mmpack.Checkpointer(repo).step(-1, Fleet(2).modelset())
    old = tmp_path / "old"
    shutil.copytree(GOLDEN_DIR / "repo_format1", old)
    with pytest.raises(InvalidArgumentError, match="format 2"):
        mmpack.Checkpointer(mmpack.Repository(old), keep_last=2)
    repo.close()


@pytest.mark.parametrize("kill_at", [2, 5])
def test_a_loop_killed_by_sigkill_resumes_from_its_newest_complete_checkpoint(tmp_path, one_thread, kill_at):
    directory = str(tmp_path / "r")
    epochs = 8
    done = subprocess.run([sys.executable, DRIVER, "train", directory, str(epochs), str(kill_at)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == -signal.SIGKILL, done.stderr
    printed = dict(line.split()[1:] for line in done.stdout.splitlines() if line.startswith("epoch"))
    assert sorted(map(int, printed)) == list(range(kill_at + 1))
    fleet = Fleet(FLEET)
    ms = fleet.modelset()
    repo = mmpack.Repository(directory)
    start = mmpack.Checkpointer(repo, keep_last=3).resume(out=ms)
    assert 1 <= start <= kill_at, "the kill was to leave saves pending"
    assert digest(ms) == int(printed[str(start - 1)])  # what that epoch submitted, bit for bit
    assert len(repo.versions()) <= 3 + 1 and repo.verify().ok
    finished = train(fleet, range(start, epochs))[-1]
    uninterrupted = train(Fleet(FLEET), range(epochs))[-1]
    assert finished.equal(uninterrupted)
    repo.close()

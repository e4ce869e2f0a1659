"""Non-blocking saves: staging, order, dependencies, failures, waiting, and crashes with saves pending."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from concurrent.futures import Future

import numpy as np
import pytest
import torch
from faulty_store import Fault, FaultyStore
from golden_repositories import golden_history
from golden_sets import GOLDEN_DIR
from helpers import ffnn_models, mixed_models, randomized_cnns

import mmpack
from mmpack import ModelSet
from mmpack.errors import ArchitectureMismatchError, BackgroundSaveError, BaseSaveFailedError, InvalidArgumentError
from mmpack.repository import background
from mmpack.store import local

DRIVER = os.path.join(os.path.dirname(__file__), "training_driver.py")


def fleet(n: int = 40, seed: int = 0) -> ModelSet:
    return ModelSet.from_modules(ffnn_models(n, seed))


def hold_the_saver(repo: mmpack.Repository) -> threading.Event:
    """Occupy the repository's background saver, and one place of its pending saves, with a job
    that waits until the returned event is set (10 s at most)."""
    gate = threading.Event()
    repo._saver.reserve()
    repo._saver.submit(background.Job(lambda job, base: gate.wait(10)))
    return gate


def bump(ms: ModelSet, rows=slice(None), by: float = 1.0) -> None:
    """An optimizer step's worth of in-place change."""
    with torch.no_grad():
        for t in ms.tensors.values():
            if t.dtype == torch.bool:
                t[rows] = ~t[rows]
            else:
                t[rows] += by if t.dtype.is_floating_point else int(by)


def test_a_version_holds_the_values_at_submission_whatever_happens_to_the_tensors_after(tmp_path):
    ms = fleet()
    repo = mmpack.Repository(tmp_path / "r")
    expected, futures = [], []
    for step in range(4):
        approach = "baseline" if step == 0 else "update"
        base = futures[-1] if futures else None
        futures.append(repo.save(ms, approach=approach, base=base, blocking=False))
        expected.append(ms.select(range(len(ms))))
        bump(ms, slice(step * 5, step * 5 + 5))  # right after submission, while the save is pending
    assert all(isinstance(f, Future) for f in futures)
    ids = [f.result() for f in futures]
    assert ids == ["v1", "v2", "v3", "v4"]  # in submission order
    for vid, values in zip(ids, expected):
        assert repo.recover(vid).equal(values)
        np.testing.assert_array_equal(repo.hashes(vid), values.hashes())
    for vid, rows in (("v2", range(0, 5)), ("v3", range(5, 10))):  # only what changed was stored
        assert list(repo.version(vid).changes.models) == list(rows)
    repo.close()


@pytest.mark.parametrize("approach", ["baseline", "update", "auto"])
def test_every_kind_of_input_is_staged_before_save_returns(tmp_path, approach):
    repo = mmpack.Repository(tmp_path / "r")
    first = repo.save(mixed_models(6), approach="baseline")
    modules = mixed_models(6, seed=1)
    future = repo.save(modules, approach=approach, base=first, blocking=False)
    expected = ModelSet.from_modules(modules)
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                p.add_(1)
    assert repo.recover(future.result()).equal(expected)
    cnns = randomized_cnns(3)
    staged = ModelSet.from_modules(cnns)
    future = repo.save(staged, approach=approach, blocking=False)
    copy = staged.select(range(3))
    bump(staged)
    assert repo.recover(future.result()).equal(copy)
    repo.close()


def test_a_non_blocking_update_the_snapshot_policy_stores_in_full(tmp_path):
    repo = mmpack.Repository(tmp_path / "r", snapshots=mmpack.SnapshotPolicy(every=1))
    ms = fleet()
    first = repo.save(ms, blocking=False)
    bump(ms, slice(0, 3))
    second = repo.save(ms, approach="update", base=first, blocking=False)
    third_values = ms.select(range(len(ms)))
    bump(ms, slice(3, 6))
    third = repo.save(ms, approach="update", base=second, blocking=False)  # the policy stores this one full
    after = ms.select(range(len(ms)))
    bump(ms)
    third.result()
    assert [r.approach for r in repo.versions()] == ["baseline", "update", "baseline"]
    assert repo.recover(second.result()).equal(third_values)
    assert repo.recover(third.result()).equal(after)
    repo.close()


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_non_blocking_updates_with_compression_and_xor_deltas(tmp_path, compression):
    pytest.importorskip("zstandard")
    setting = None if compression is None else mmpack.Compression(xor=True)
    repo = mmpack.Repository(tmp_path / "r", compression=setting)
    ms = fleet()
    futures, expected = [repo.save(ms, blocking=False)], [ms.select(range(len(ms)))]
    for step in range(3):
        bump(ms, slice(step, step + 2), 0.5)
        futures.append(repo.save(ms, approach="update", base=futures[-1], blocking=False))
        expected.append(ms.select(range(len(ms))))
    for future, values in zip(futures, expected):
        assert repo.recover(future.result()).equal(values)
    assert repo.verify().ok
    repo.close()


def test_a_format_1_repository_takes_non_blocking_updates(tmp_path):
    root = tmp_path / "old"
    shutil.copytree(GOLDEN_DIR / "repo_format1", root)
    repo = mmpack.Repository(root)
    assert repo.format_version == 1
    ms = golden_history()[1]
    ms = ModelSet(ms.architecture, {n: t.clone() for n, t in ms.tensors.items()})
    bump(ms, slice(1, 2))
    future = repo.save(ms, approach="update", base="v2", blocking=False)
    expected = ms.select(range(len(ms)))
    bump(ms)
    assert repo.recover(future.result()).equal(expected)
    repo.close()


def test_bases_may_be_futures_done_or_pending_ids_or_tags(tmp_path):
    repo = mmpack.Repository(tmp_path / "r")
    ms = fleet()
    first = repo.save(ms, blocking=False)
    first.result()
    bump(ms, slice(0, 1))
    second = repo.save(ms, approach="update", base=first, blocking=False)  # a finished future
    repo.tag("good", second.result())
    bump(ms, slice(1, 2))
    third = repo.save(ms, approach="update", base="good", blocking=False)  # a tag
    bump(ms, slice(2, 3))
    fourth = repo.save(ms, approach="update", base=third)  # blocking, on a pending save: waits, in order
    assert fourth == "v4" and third.result() == "v3"
    assert [r.base for r in repo.versions()] == [None, "v1", "v2", "v3"]
    other = mmpack.Repository(tmp_path / "other")
    foreign = other.save(ms, blocking=False)
    with pytest.raises(InvalidArgumentError, match="did not return"):
        repo.save(ms, approach="update", base=foreign, blocking=False)
    with pytest.raises(InvalidArgumentError, match="did not return"):
        repo.save(ms, approach="update", base=Future())
    with pytest.raises(mmpack.VersionNotFoundError):
        repo.save(ms, approach="update", base="v99", blocking=False)
    with pytest.raises(ArchitectureMismatchError, match="pending base"):
        repo.save(ms.select(range(5)), approach="update", base=repo.save(ms, blocking=False), blocking=False)
    other.close()
    repo.close()


def test_a_failed_save_fails_its_dependents_and_nothing_else(tmp_path):
    store = FaultyStore(local.LocalStore(tmp_path / "r"))
    repo = mmpack.Repository(store=store, max_pending_saves=8)
    ms = fleet()
    first = repo.save(ms, blocking=False)
    first.result()
    gate = threading.Event()
    blocker = repo._saver.submit(background.Job(lambda job, base: gate.wait(10)))  # hold the worker
    repo._saver.reserve()  # the place the blocker took without reserving
    store.arm(Fault(0, "ENOSPC"))  # the next store call fails: the first write of `failing`
    failing = repo.save(ms, approach="baseline", blocking=False)
    bump(ms, slice(0, 1))
    dependent = repo.save(ms, approach="update", base=failing, blocking=False)
    bump(ms, slice(1, 2))
    grandchild = repo.save(ms, approach="update", base=dependent, blocking=False)
    independent = repo.save(ms, approach="update", base=first, blocking=False)
    gate.set()
    blocker.result()
    with pytest.raises(OSError, match="No space left"):
        failing.result()
    with pytest.raises(BaseSaveFailedError) as caught:
        dependent.result()
    assert isinstance(caught.value.__cause__, OSError)
    with pytest.raises(BaseSaveFailedError):
        grandchild.result()
    assert independent.result() == "v2"
    assert [r.id for r in repo.versions()] == ["v1", "v2"]
    with pytest.raises(BaseSaveFailedError):  # a blocking save on a failed one raises
        repo.save(ms, approach="update", base=failing)
    repo.close()  # every failure was seen: nothing left to report
    assert repo.verify().ok


def test_close_and_with_wait_for_pending_saves_and_report_failures_nobody_saw(tmp_path):
    ms = fleet()
    with mmpack.Repository(tmp_path / "a") as repo:
        futures = [repo.save(ms, blocking=False) for _ in range(3)]
    assert all(f.done() for f in futures) and [f.result() for f in futures] == ["v1", "v2", "v3"]

    store = FaultyStore(local.LocalStore(tmp_path / "b"))
    repo = mmpack.Repository(store=store)
    store.arm(Fault(0, "EIO", persistent=True))
    unseen = repo.save(ms, blocking=False)
    with pytest.raises(BackgroundSaveError, match="1 non-blocking save") as caught:
        repo.close()
    assert caught.value.failures[0][0] is unseen and isinstance(caught.value.__cause__, OSError)
    repo.close()  # reported once
    store.arm(None)
    with pytest.raises(BackgroundSaveError):
        with mmpack.Repository(store=store) as again:
            store.arm(Fault(0, "EIO", persistent=True))
            again.save(ms, blocking=False)
    store.arm(None)
    with pytest.warns(RuntimeWarning, match="non-blocking save"), pytest.raises(KeyError):
        with mmpack.Repository(store=store) as again:
            store.arm(Fault(0, "EIO", persistent=True))
            again.save(ms, blocking=False)
            raise KeyError("the block's own error wins")
    store.arm(None)
    repo = mmpack.Repository(store=store)
    assert repo.save(ms, blocking=False).result() == "v1"  # usable after close
    repo.close()


def test_pending_saves_are_bounded_and_prune_and_gc_queue_behind_them(tmp_path):
    repo = mmpack.Repository(tmp_path / "r", max_pending_saves=1)
    ms = fleet()
    gate = hold_the_saver(repo)
    started = threading.Event()

    def submit():
        started.set()
        repo.save(ms, blocking=False)  # waits for the place the blocker holds

    thread = threading.Thread(target=submit)
    thread.start()
    started.wait(5)
    thread.join(0.3)
    assert thread.is_alive()  # waiting, not staging
    gate.set()
    thread.join(10)
    for _ in range(3):
        bump(ms)
        repo.save(ms, blocking=False)
    pruned = repo.prune(keep_last=2, blocking=False)
    collected = repo.gc(grace_seconds=0, blocking=False)
    assert sorted(pruned.result().deleted) == ["v1", "v2"]
    assert collected.result().objects >= 2
    assert [r.id for r in repo.versions()] == ["v3", "v4"]
    assert repo.recover("v4").equal(ms)
    with pytest.raises(InvalidArgumentError):
        mmpack.Repository(tmp_path / "r", max_pending_saves=0)
    repo.close()


def test_saves_killed_with_saves_pending_leave_only_complete_versions(tmp_path):
    directory = str(tmp_path / "r")
    done = subprocess.run([sys.executable, DRIVER, "pending", directory, "6"], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == -signal.SIGKILL, done.stderr
    submitted = [line.split() for line in done.stdout.splitlines() if line.startswith("submitted")]
    assert len(submitted) == 6
    repo = mmpack.Repository(directory)
    records = repo.versions()
    assert 1 <= len(records) < 6, "the process was to die with saves pending"
    sys.path.insert(0, os.path.dirname(DRIVER))
    from training_driver import pending_values

    for k, record in enumerate(records):  # a prefix of the submissions, each complete and as submitted
        assert record.message == f"save {k}"
        assert repo.recover(record.id).equal(pending_values(k))
    assert repo.verify().ok
    repo.gc(grace_seconds=0)
    assert repo.verify().ok
    follow = repo.save(pending_values(0), approach="update", base=records[-1].id, blocking=False)
    assert follow.result() == f"v{len(records) + 1}"
    repo.close()


def test_saves_from_a_futures_callback_do_not_wait_for_themselves(tmp_path):
    repo = mmpack.Repository(tmp_path / "r", max_pending_saves=4)
    ms = fleet()
    gate = hold_the_saver(repo)  # keep a save queued behind the first
    first = repo.save(ms, blocking=False)
    later = repo.save(ms, blocking=False)
    seen = {}

    def callback(future):
        seen["id"] = repo.save(ms, approach="update", base=future)  # blocking, on the worker
        with pytest.raises(InvalidArgumentError, match="callback"):
            repo.save(ms, approach="update", base=later)

    first.add_done_callback(callback)
    gate.set()
    assert later.result() and repo._saver.wait() is None
    assert seen["id"] == "v2" and repo.version("v2").base == "v1"
    repo.close()

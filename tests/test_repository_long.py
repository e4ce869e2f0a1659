"""Long histories and shared repositories: a chain of any length recovers with the default
settings, and many threads may read one Repository at once."""

from __future__ import annotations

import contextlib
import inspect
import random
import sys
import threading

import numpy as np
import pytest
import torch
from helpers import ffnn_models

from mmpack import ModelSet, Repository
from mmpack import objects as object_store


def chain(tmp_path, length: int, n_models: int = 20, compression=None) -> tuple[Repository, list[ModelSet]]:
    """A Baseline then ``length`` Updates, each retraining one model's last layer, saved with the
    repository's default settings (no snapshot policy: one chain)."""
    repo = Repository(tmp_path / "repo", fsync=False, compression=compression)
    sets = [ModelSet.from_modules(ffnn_models(n_models))]
    vid = repo.save(sets[0])
    for step in range(length):
        tensors = {name: t.clone() for name, t in sets[-1].tensors.items()}
        tensors["fc4.weight"][step % n_models] += 1.0
        sets.append(ModelSet(sets[0].architecture, tensors))
        vid = repo.save(sets[-1], approach="update", base=vid)
    assert vid == f"v{length + 1}"
    return repo, sets


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_a_chain_longer_than_the_reader_cache_recovers(tmp_path, compression):
    length = object_store._IDLE_READERS + 16
    repo, sets = chain(tmp_path, length, compression=compression)
    newest = f"v{length + 1}"
    for fresh in (repo, Repository(repo.store.root)):
        assert fresh.recover(newest).equal(sets[-1])
        assert fresh.recover(newest, indices=[3, 19, 0]).equal(sets[-1].select([3, 19, 0]))
        assert fresh.recover(newest, strategy="recursive").equal(sets[-1])
    report = Repository(repo.store.root).verify()
    assert report.ok, str(report)


@contextlib.contextmanager
def recursion_limit_above_here(frames: int):
    """Allow only ``frames`` more frames than the caller's depth (pytest's own stack varies)."""
    depth = len(inspect.stack(0))
    previous = sys.getrecursionlimit()
    sys.setrecursionlimit(depth + frames)
    try:
        yield
    finally:
        sys.setrecursionlimit(previous)


@pytest.mark.parametrize("length", [150, pytest.param(1050, marks=pytest.mark.slow)])
def test_a_chain_deeper_than_the_recursion_limit_recovers_both_ways(tmp_path, length):
    """A chain deeper than the frames Python allows: 150 versions under a limit of 100 frames, and
    (slow) 1,050 versions under the default limit of 1,000."""
    repo, sets = chain(tmp_path, length, n_models=4)
    newest = f"v{length + 1}"
    fresh = Repository(repo.store.root)
    with recursion_limit_above_here(100) if length < sys.getrecursionlimit() else contextlib.nullcontext():
        assert fresh.recover(newest).equal(sets[-1])
        assert fresh.recover(newest, strategy="recursive").equal(sets[-1])
        assert np.array_equal(fresh.hashes(newest), sets[-1].hashes())


def test_a_recovery_holds_more_objects_than_one_native_read(tmp_path, monkeypatch):
    """Batches of open objects: a chain longer than the batch still moves every row once."""
    from mmpack.repository import executor

    monkeypatch.setattr(executor, "MAX_OPEN_OBJECTS", 3)
    repo, sets = chain(tmp_path, 10, compression="zstd")
    assert Repository(repo.store.root).recover("v11").equal(sets[-1])


def test_many_threads_share_one_repository(tmp_path, monkeypatch):
    """Readers evicted constantly (two idle kept) while eight threads recover at random: every result
    is bit-exact, no reader is closed under a read."""
    monkeypatch.setattr(object_store, "_IDLE_READERS", 2)
    repo, sets = chain(tmp_path, 12, compression="zstd")
    shared = Repository(repo.store.root)
    failures: list[BaseException] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(12):
                step = rng.randrange(len(sets))
                vid = f"v{step + 1}"
                if rng.random() < 0.5:
                    picked = rng.sample(range(20), 3)
                    assert shared.recover(vid, indices=picked).equal(sets[step].select(picked))
                else:
                    assert shared.recover(vid).equal(sets[step])
                if rng.random() < 0.2:
                    shared.close()  # releasing readers while others read must not break them
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            failures.append(exc)

    torch.set_num_threads(1)
    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, repr(failures[0])
    assert shared.verify().ok


def test_readers_in_use_survive_eviction_and_close(tmp_path, monkeypatch):
    """The object cache's promise, directly: a reader held by a ``with`` block stays open while other
    objects push it out of the cache and while the store is closed."""
    monkeypatch.setattr(object_store, "_IDLE_READERS", 1)
    repo, _ = chain(tmp_path, 4)
    records = repo.versions()
    objects = object_store.ObjectStore(repo.store)
    with objects.reader(records[0].objects[0]) as (source, header):
        for record in records[1:]:
            objects.header(record.objects[0])
        objects.close()
        assert len(source.read(0, 8, "the magic")) == 8
        assert objects.tail(records[0].objects[0], (source, header)).table.shape == (20, 7)

"""Versions written by many workers at once, on Dask (``distributed.LocalCluster``, 2 worker processes).

A version is opened once, its handle pickles to the workers, each worker writes the shards of its
slice and returns a receipt, and the coordinator commits one version from the receipts. A worker
killed mid-write, or a task that runs twice, never yields a partial or duplicated version: the
version is complete (the scheduler ran the slice again) or absent, and ``gc`` removes the shards of
the attempts no version names. Recovery spreads the same way.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from fleet_tasks import ARCHITECTURE, changed_slice, dying, make_slice, recover_hashes, write_slice, write_then_fail

import mmpack
from mmpack import ModelSet, Repository

distributed = pytest.importorskip("distributed")

N, SLICE = 120, 30
STARTS = list(range(0, N, SLICE))


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with distributed.Client(cluster) as client:
            client.wait_for_workers(2)
            yield client


def repository(path) -> Repository:
    return Repository(path, fsync=False, shard_bytes=8 * ARCHITECTURE.nbytes_per_model)


def whole(changed: bool = False) -> ModelSet:
    return (changed_slice if changed else make_slice)(0, N)


def leftovers(repo: Repository) -> set[str]:
    """Objects no version names, and temporaries."""
    named = {o.key for r in repo.versions() for o in r.objects}
    listed = set(repo.store.list("objects/"))
    hidden = {n for n in os.listdir(os.path.join(repo.store.root, "objects")) if n.startswith(".")}
    return (listed - named) | hidden


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_workers_write_one_version_and_recover_it_spread(client, tmp_path, compression):
    repo = repository(tmp_path / "repo")
    writer = repo.open_version(compression=compression)
    receipts = client.gather([client.submit(write_slice, writer.handle, a, SLICE, pure=False) for a in STARTS])
    v1 = writer.commit(receipts, message="written by two workers")
    assert {r.first for r in receipts} == set(STARTS) and len(repo.version(v1).shards) == len(STARTS) * -(-SLICE // 8)
    # An update cycle: each worker hashes its slice against v1's table and writes only its changed rows.
    writer = repo.open_version(approach="update", base=v1, compression=compression)
    futures = [client.submit(write_slice, writer.handle, a, SLICE, True, pure=False) for a in STARTS]
    v2 = writer.commit(client.gather(futures))
    fresh = Repository(repo.store.root)
    assert fresh.recover(v1).equal(whole()) and fresh.recover(v2).equal(whole(changed=True))
    record = fresh.version(v2)
    assert record.changes.models.tolist() == list(range(0, N, 3))
    assert sum(sum(fresh.objects.header(s.ref).layout.rows) for s in record.shards) == N // 3  # fc4.weight rows
    if compression:
        assert record.details["xor_base"] == v1
    handle = fresh.read_handle(v2)
    parts = client.gather([client.submit(recover_hashes, handle, a, b) for a, b in handle.slices(SLICE + 5)])
    assert np.array_equal(np.concatenate(parts), whole(changed=True).hashes())
    assert fresh.verify().ok and not leftovers(fresh)


def test_a_worker_killed_mid_write_yields_the_complete_version_after_its_retry(client, tmp_path):
    repo = repository(tmp_path / "repo")
    writer = repo.open_version()
    marker = str(tmp_path / "died")
    handles = [dying(writer.handle, marker) if a == SLICE else writer.handle for a in STARTS]
    receipts = client.gather([client.submit(write_slice, h, a, SLICE, pure=False) for h, a in zip(handles, STARTS)])
    assert os.path.exists(marker)  # a worker process died in the middle of writing a shard
    vid = writer.commit(receipts)
    assert repo.recover(vid).equal(whole())
    orphans = leftovers(repo)
    assert orphans  # the dead attempt's first shard and its half-written temporary
    report = repo.gc(grace_seconds=0)
    assert report.objects + report.temporaries == len(orphans) and not leftovers(repo)
    assert Repository(repo.store.root).recover(vid).equal(whole())
    client.wait_for_workers(2)


def test_a_task_that_runs_twice_gives_one_version_and_orphans_for_gc(client, tmp_path):
    repo = repository(tmp_path / "repo")
    v1 = repo.save(whole())
    writer = repo.open_version(approach="update", base=v1)
    marker = str(tmp_path / "failed once")
    futures = [client.submit(write_then_fail, writer.handle, a, SLICE, marker, True, retries=1, pure=False)
               for a in STARTS]
    receipts = client.gather(futures)
    vid = writer.commit(receipts)
    assert repo.recover(vid).equal(whole(changed=True)) and len(repo.versions()) == 2
    assert leftovers(repo)  # the first attempt's shards
    repo.gc(grace_seconds=0)
    assert not leftovers(repo) and repo.recover(vid, [0, N - 1]).equal(whole(changed=True).select([0, N - 1]))
    # Both attempts' receipts handed over (a coordinator that kept a lost result after all) are refused.
    again = repo.open_version(approach="update", base=v1)
    twice = [write_slice(again.handle, 0, N, True), write_slice(again.handle, 0, N, True)]
    with pytest.raises(mmpack.InvalidArgumentError, match="written twice"):
        again.commit(twice)
    assert len(repo.versions()) == 2


def test_a_slice_whose_worker_keeps_dying_leaves_no_version(tmp_path):
    dask = pytest.importorskip("dask")
    repo = repository(tmp_path / "repo")
    writer = repo.open_version(n_models=N)
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                      dashboard_address=":0") as cluster, distributed.Client(cluster) as client:
            handles = [dying(writer.handle, str(tmp_path / "died")) if a == 0 else writer.handle for a in STARTS]
            futures = [client.submit(write_slice, h, a, SLICE, pure=False) for h, a in zip(handles, STARTS)]
            with pytest.raises(distributed.scheduler.KilledWorker):
                client.gather(futures)
            done = [f.result() for f in futures if f.status == "finished"]
    with pytest.raises(mmpack.InvalidArgumentError, match="no receipt"):
        writer.commit(done)  # the coordinator cannot commit what it does not have
    assert repo.versions() == [] and leftovers(repo)
    repo.gc(grace_seconds=0)
    assert not leftovers(repo)


def test_workers_write_an_s3_repository(client, s3_server):
    repo = Repository(s3_server.url("fleet"), storage_options=s3_server.storage_options,
                      shard_bytes=8 * ARCHITECTURE.nbytes_per_model)
    writer = repo.open_version()
    vid = writer.commit(client.gather([client.submit(write_slice, writer.handle, a, SLICE, pure=False)
                                       for a in STARTS]))
    handle = repo.read_handle(vid)
    parts = client.gather([client.submit(recover_hashes, handle, a, b) for a, b in handle.slices(SLICE)])
    assert np.array_equal(np.concatenate(parts), whole().hashes())
    assert repo.recover(vid, [7, 100]).equal(whole().select([7, 100]))

"""Sharded versions: a version stored as several objects, each holding a contiguous range of models.

Full, Update and compressed versions shard; an Update shard holds only the changed rows of its
range; recovering some models opens only the shards that hold them; a version of one object is
the one-shard case and is written exactly as before (docs/REPOSITORY.md, "Shards").
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from forgery import read_record, write_record
from helpers import ffnn_models
from hypothesis import given
from hypothesis import strategies as st
from test_repository import retrain

from mmpack import IntegrityError, InvalidArgumentError, ModelSet, Repository, RepositoryError
from mmpack.approaches.base import FIRST_KEY
from mmpack.repository.catalog import tables as tables_module
from mmpack.store import LocalStore

N = 60


@pytest.fixture(scope="module")
def base_set() -> ModelSet:
    return ModelSet.from_modules(ffnn_models(N))


def row_bytes(ms: ModelSet) -> int:
    return ms.architecture.nbytes_per_model


def sharded(path, ms: ModelSet, models_per_shard: int, **options) -> Repository:
    return Repository(path, fsync=False, shard_bytes=models_per_shard * row_bytes(ms), **options)


def object_path(repo: Repository, key: str) -> str:
    return os.path.join(repo.store.root, *key.split("/"))


def commits(repo: Repository) -> list[dict]:
    log = os.path.join(repo.store.root, "catalog", "log")
    out = []
    for name in sorted(os.listdir(log)):
        with open(os.path.join(log, name), "rb") as f:
            out.append(json.loads(f.read().partition(b"\n")[0]))
    return out


class OpenCounter:
    """Which object keys a repository opens for reading."""

    def __init__(self, monkeypatch) -> None:
        self.keys: list[str] = []
        real = LocalStore.open_reader

        def counted(store, key):
            self.keys.append(key)
            return real(store, key)

        monkeypatch.setattr(LocalStore, "open_reader", counted)


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_a_set_larger_than_a_shard_is_stored_as_shards_that_tile_it(tmp_path, base_set, compression):
    repo = sharded(tmp_path / "repo", base_set, 7, compression=compression)
    vid = repo.save(base_set)
    record = repo.version(vid)
    assert [(s.first, s.stop) for s in record.shards] == [(a, min(a + 7, N)) for a in range(0, N, 7)]
    for shard in record.shards:
        header = repo.objects.header(shard.ref)
        assert header.n_models == shard.count
        assert header.metadata.get(FIRST_KEY, "0") == str(shard.first)
    fresh = Repository(repo.store.root)
    assert fresh.recover(vid).equal(base_set)
    wanted = [59, 0, 6, 7, 13, 14, 30, 7]  # across shard boundaries, unsorted, a duplicate
    assert fresh.recover(vid, wanted).equal(base_set.select(wanted))
    assert fresh.recover(vid, strategy="recursive").equal(base_set)
    assert np.array_equal(fresh.hashes(vid), base_set.hashes())
    assert fresh.verify().ok
    assert commits(repo)[-1]["format_version"] == 2


def test_recovering_some_models_opens_only_the_shards_that_hold_them(tmp_path, base_set, monkeypatch):
    repo = sharded(tmp_path / "repo", base_set, 10)
    vid = repo.save(base_set)
    record = repo.version(vid)
    counter = OpenCounter(monkeypatch)
    fresh = Repository(repo.store.root)
    assert fresh.recover(vid, [12, 47]).equal(base_set.select([12, 47]))
    opened = {k for k in counter.keys if k.startswith("objects/")}
    assert opened == {record.shards[1].ref.key, record.shards[4].ref.key}
    plan = fresh.plan(vid, [12, 47])
    assert [(r.object, r.dst_rows.tolist()) for r in plan.reads] == [(1, [0] * 7), (4, [1] * 7)]
    assert plan.reads[0].stored_rows.tolist() == [2] * 7 and plan.reads[1].stored_rows.tolist() == [7] * 7


def test_update_shards_hold_only_the_changed_rows_of_their_ranges(tmp_path, base_set):
    repo = sharded(tmp_path / "repo", base_set, 4)
    v1 = repo.save(base_set)
    full, partial = list(range(0, N, 3)), list(range(1, N, 5))
    changed = retrain(base_set, full, partial)
    v2 = repo.save(changed, approach="update", base=v1)
    record = repo.version(v2)
    assert len(record.shards) > 1
    model_bytes = row_bytes(base_set)
    stored_rows = 0
    for shard in record.shards:
        header = repo.objects.header(shard.ref)
        inside = (record.changes.models >= shard.first) & (record.changes.models < shard.stop)
        assert header.n_models == int(inside.sum()) > 0
        assert sum(header.layout.rows) == int(record.changes.masks[inside].sum())
        stored_rows += sum(header.layout.rows)
        assert sum(header.layout.tensor_lengths) <= 5 * model_bytes
    assert stored_rows == record.changes.n_pairs
    starts = [s.first for s in record.shards]
    assert starts == sorted(starts) and all(a.stop <= b.first for a, b in zip(record.shards, record.shards[1:]))
    fresh = Repository(repo.store.root)
    assert fresh.recover(v2).equal(changed)
    wanted = [N - 1, 0, 1, 2, 16, 17, 33]
    assert fresh.recover(v2, wanted).equal(changed.select(wanted))
    assert fresh.recover(v2, strategy="recursive").equal(changed)
    assert np.array_equal(fresh.hashes(v2), changed.hashes())
    assert np.array_equal(fresh.tables.table(v2, 10, 31), changed.hashes()[10:31])
    assert fresh.diff(v1, v2).models.tolist() == sorted(set(full) | set(partial))
    assert [c.version for c in fresh.history(3)] == [v1, v2]
    assert fresh.verify().ok


def test_an_update_that_changes_nothing_has_one_empty_object_as_before(tmp_path, base_set):
    repo = sharded(tmp_path / "repo", base_set, 4)
    v1 = repo.save(base_set)
    v2 = repo.save(base_set, approach="update", base=v1)
    record = repo.version(v2)
    assert len(record.objects) == 1 and record.objects[0].count is None
    assert repo.recover(v2, [5, 50]).equal(base_set.select([5, 50]))


def test_compressed_xor_updates_shard_against_a_sharded_full_version(tmp_path, base_set):
    repo = sharded(tmp_path / "repo", base_set, 5, compression="zstd")
    v1 = repo.save(base_set)
    v2_set = retrain(base_set, [2, 3, 29], list(range(30, N)))
    v2 = repo.save(v2_set, approach="update", base=v1)
    v3_set = retrain(v2_set, [40, 41], [0, 7, 8])
    v3 = repo.save(v3_set, approach="update", base=v2)
    assert repo.version(v3).details["xor_base"] == v1 and len(repo.version(v2).shards) > 1
    fresh = Repository(repo.store.root)
    for vid, expected in ((v2, v2_set), (v3, v3_set)):
        assert fresh.recover(vid).equal(expected)
        assert fresh.recover(vid, [41, 0, 31, 4, 5]).equal(expected.select([41, 0, 31, 4, 5]))
        assert fresh.recover(vid, strategy="recursive").equal(expected)
    assert fresh.verify().ok


def test_table_objects_shard_too_and_bound_the_derivation(tmp_path, base_set, monkeypatch):
    monkeypatch.setattr(tables_module, "TABLE_EVERY", 2)
    monkeypatch.setattr("mmpack.repository.saving.TABLE_EVERY", 2)
    repo = sharded(tmp_path / "repo", base_set, 8)
    vid, current = repo.save(base_set), base_set
    for cycle in range(4):
        current = retrain(current, list(range(cycle, N, 4)), [cycle + 1])
        vid = repo.save(current, approach="update", base=vid)
    with_tables = [r for r in repo.versions() if r.table_shards]
    assert with_tables and all([(s.first, s.stop) for s in r.table_shards] == [(s.first, s.stop) for s in
                                                                               repo.version("v1").shards]
                                for r in with_tables)
    fresh = Repository(repo.store.root)
    assert fresh.tables.depth_without_table(vid) < 2
    assert np.array_equal(fresh.hashes(vid), current.hashes())
    assert fresh.recover(vid).equal(current)
    assert fresh.verify().ok


def test_a_version_of_one_object_is_written_as_before(tmp_path, base_set):
    repo = Repository(tmp_path / "repo", fsync=False)  # the default shard is far larger than this set
    v1 = repo.save(base_set)
    v2 = repo.save(retrain(base_set, [1], [2]), approach="update", base=v1)
    assert all(len(repo.version(v).objects) == 1 for v in (v1, v2))
    assert repo.objects.header(repo.version(v1).objects[0]).metadata == {}
    assert [c["format_version"] for c in commits(repo)] == [1, 1]
    assert all("first" not in o for c in commits(repo) for e in c["entries"] for o in e["record"]["objects"])


def test_a_sharded_catalog_reads_through_its_checkpoints(tmp_path, base_set):
    repo = sharded(tmp_path / "repo", base_set, 9)
    v1 = repo.save(base_set)
    v2 = repo.save(retrain(base_set, list(range(0, N, 2)), []), approach="update", base=v1)
    for k in range(40):  # past the first checkpoint, which then holds the sharded records
        repo.tag("t", (v1, v2)[k % 2])
    fresh = Repository(repo.store.root)
    assert fresh.catalog.state.checkpoint >= 32
    for vid in (v1, v2):
        assert len(repo.version(vid).shards) > 1
        assert [(s.ref.key, s.first, s.stop, s.ref.table) for s in fresh.version(vid).shards] == [
            (s.ref.key, s.first, s.stop, s.ref.table) for s in repo.version(vid).shards]
    assert fresh.recover(v2).equal(repo.recover(v2))
    with open(os.path.join(repo.store.root, "catalog", "checkpoints", f"{fresh.catalog.state.checkpoint:020d}.json"),
              "rb") as f:
        assert json.loads(f.read().partition(b"\n")[0])["format_version"] == 2


def test_exchanged_shards_are_detected(tmp_path, base_set):
    repo = sharded(tmp_path / "repo", base_set, 10)
    vid = repo.save(base_set)
    one, two = (object_path(repo, s.ref.key) for s in repo.version(vid).shards[1:3])
    swapped = tmp_path / "swap"
    shutil.move(one, swapped)
    shutil.move(two, one)
    shutil.move(swapped, two)
    fresh = Repository(repo.store.root)
    with pytest.raises((IntegrityError, RepositoryError)):
        fresh.recover(vid, [15])
    assert not fresh.verify().ok


def test_a_record_whose_shards_overlap_or_leave_gaps_is_refused(tmp_path, base_set):
    repo = sharded(tmp_path / "repo", base_set, 10)
    vid = repo.save(base_set)
    record = read_record(repo.store.root, vid)
    for change in ({"first": 5}, {"count": 9}):
        edited = json.loads(json.dumps(record))
        edited["objects"][1].update(change)
        write_record(repo.store.root, vid, edited)
        with pytest.raises(RepositoryError, match="range|models"):
            Repository(repo.store.root).versions()
    write_record(repo.store.root, vid, record)
    assert Repository(repo.store.root).recover(vid, [15]).equal(base_set.select([15]))


def test_a_shard_whose_record_names_another_range_is_refused(tmp_path, base_set):
    repo = sharded(tmp_path / "repo", base_set, 10)
    vid = repo.save(base_set)
    record = read_record(repo.store.root, vid)
    record["objects"][1], record["objects"][2] = (dict(record["objects"][2], first=10, count=10),
                                                  dict(record["objects"][1], first=20, count=10))
    write_record(repo.store.root, vid, record)
    with pytest.raises(RepositoryError, match="other models"):
        Repository(repo.store.root).recover(vid, [12])


def test_gc_keeps_every_shard_and_prune_rewrites_sharded_chains(tmp_path, base_set):
    repo = sharded(tmp_path / "repo", base_set, 6)
    v1 = repo.save(base_set)
    v2_set = retrain(base_set, list(range(0, N, 2)), [])
    v2 = repo.save(v2_set, approach="update", base=v1)
    v3_set = retrain(v2_set, [1, 3], [])
    v3 = repo.save(v3_set, approach="update", base=v2)
    assert repo.gc(grace_seconds=0).objects == 0
    repo.prune(keep=[v1, v3])
    repo.gc(grace_seconds=0)
    fresh = Repository(repo.store.root)
    assert fresh.recover(v3).equal(v3_set) and fresh.recover(v1).equal(base_set)
    assert fresh.verify().ok


def test_shard_sizes_are_whole_bytes(tmp_path):
    for bad in (0, -1, 1.5, True, "1"):
        with pytest.raises(InvalidArgumentError):
            Repository(tmp_path / "repo", shard_bytes=bad)


def test_format_1_repositories_store_one_object_per_version(tmp_path, base_set):
    from mmpack.repository import catalog

    catalog.create(LocalStore(tmp_path / "old", fsync=False), 1)
    repo = sharded(tmp_path / "old", base_set, 5)
    vid = repo.save(base_set)
    assert repo.format_version == 1 and len(repo.version(vid).objects) == 1
    assert repo.recover(vid, [3, 44]).equal(base_set.select([3, 44]))


@given(n=st.integers(1, 40), per_shard=st.integers(1, 12), data=st.data())
def test_any_shard_size_recovers_any_models_bit_exactly(tmp_path_factory, base_set, n, per_shard, data):
    ms = base_set.select(range(n))
    repo = sharded(tmp_path_factory.mktemp("repo"), ms, per_shard)
    v1 = repo.save(ms)
    full = data.draw(st.lists(st.integers(0, n - 1), max_size=n, unique=True))
    changed = retrain(ms, full, data.draw(st.lists(st.integers(0, n - 1), max_size=n, unique=True)))
    v2 = repo.save(changed, approach="update", base=v1)
    wanted = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=3 * n))
    fresh = Repository(repo.store.root)
    assert fresh.recover(v1, wanted).equal(ms.select(wanted))
    assert fresh.recover(v2, wanted).equal(changed.select(wanted))
    assert fresh.recover(v2).equal(changed)

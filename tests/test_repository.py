"""Repository: versions, Baseline and Update, bounded recovery, verification, gc, errors."""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
import torch
from helpers import ffnn_models, mixed_models, randomized_cnns

import mmpack
from mmpack import (
    ArchitectureMismatchError,
    MMPackError,
    ModelSet,
    Repository,
    RepositoryError,
    SnapshotPolicy,
    VersionNotFoundError,
)
from mmpack.store import LocalStore
from mmpack.workloads import FFNN


def retrain(ms: ModelSet, full: list[int], partial: list[int], prefixes=("fc3", "fc4"), step: float = 0.01) -> ModelSet:
    """A copy of ``ms`` where ``full`` models changed every tensor and ``partial`` only some layers."""
    tensors = {name: t.clone() for name, t in ms.tensors.items()}
    for name, t in tensors.items():
        if t.dtype.is_floating_point:
            t[full] += step
            if name.startswith(prefixes):
                t[partial] -= step
    return ModelSet(ms.architecture, tensors)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(bytes(data))


@pytest.fixture
def repo(tmp_path):
    return Repository(tmp_path / "repo", fsync=False)


@pytest.mark.parametrize(
    "build", [lambda: ffnn_models(12), lambda: randomized_cnns(4), lambda: mixed_models(5)],
    ids=["ffnn48", "cnn-batchnorm", "fp16-bf16-fp64-int64"],
)
def test_baseline_round_trip_and_records(repo, build):
    models = build()
    vid = repo.save(models, message="initial")
    assert vid == "v1"
    ms = ModelSet.from_modules(models)
    assert repo.recover(vid).equal(ms)
    assert repo.recover(vid, indices=[len(ms) - 1, 0]).equal(ms.select([len(ms) - 1, 0]))
    [record] = repo.versions()
    assert (record.id, record.approach, record.base, record.n_models, record.message) == (
        "v1",
        "baseline",
        None,
        len(ms),
        "initial",
    )
    assert record.created.tzinfo is not None
    assert record.stored_bytes == repo.storage_bytes(vid) > ms.nbytes
    assert np.array_equal(repo.hashes(vid), ms.hashes())


def test_update_chain_stores_only_changes_and_recovers_every_version(repo):
    rng = np.random.default_rng(0)
    sets = [ModelSet.from_modules(ffnn_models(200))]
    ids = [repo.save(sets[0])]
    for _ in range(6):
        chosen = rng.choice(200, 20, replace=False)
        sets.append(retrain(sets[-1], list(chosen[:10]), list(chosen[10:])))
        ids.append(repo.save(sets[-1], approach="update", base=ids[-1]))
    for vid, expected in zip(ids, sets):
        assert repo.recover(vid).equal(expected)
        assert repo.recover(vid, strategy="recursive").equal(expected)
        assert repo.recover(vid, indices=[150, 3, 3]).equal(expected.select([150, 3, 3]))
    record = repo.version(ids[1])
    assert record.approach == "update" and record.base == ids[0]
    assert record.changes.n_pairs == 10 * 7 + 10 * 4  # fully retrained: 7 tensors; partially: fc3/fc4
    assert repo.storage_bytes(ids[1]) < 0.2 * repo.storage_bytes(ids[0])


def test_fresh_repository_object_recovers_from_disk_alone(repo, tmp_path):
    ms = ModelSet.from_modules(ffnn_models(30))
    v1 = repo.save(ms)
    changed = retrain(ms, [1, 2], [5])
    v2 = repo.save(changed, approach="update", base=v1)
    again = Repository(tmp_path / "repo")
    assert again.recover(v2).equal(changed)
    assert np.array_equal(again.hashes(v2), changed.hashes())


def test_update_of_modules_and_unchanged_sets(repo):
    models = ffnn_models(10)
    v1 = repo.save(models)
    v2 = repo.save(models, approach="update", base=v1)
    assert repo.version(v2).changes.n_pairs == 0
    assert repo.recover(v2).equal(ModelSet.from_modules(models))
    assert Repository(repo.store.root).recover(v2).equal(ModelSet.from_modules(models))  # decoded from disk
    with torch.no_grad():
        models[4].fc2.bias.add_(1.0)
    v3 = repo.save(models, approach="update", base=v2)
    assert repo.version(v3).changes.models.tolist() == [4]
    assert repo.recover(v3, indices=[4]).equal(ModelSet.from_modules(models).select([4]))


def test_update_without_base_stores_a_full_version(repo):
    vid = repo.save(ffnn_models(3), approach="update")
    record = repo.version(vid)
    assert record.approach == "baseline" and "without a base" in record.reason


def test_snapshot_policy_every_k(tmp_path):
    repo = Repository(tmp_path / "r", fsync=False, snapshots=SnapshotPolicy(every=2))
    ms = ModelSet.from_modules(ffnn_models(20))
    vid = repo.save(ms)
    approaches = []
    for step in range(5):
        ms = retrain(ms, [step], [])
        vid = repo.save(ms, approach="update", base=vid)
        approaches.append(repo.version(vid).approach)
    assert approaches == ["update", "update", "baseline", "update", "update"]
    assert "snapshot" in repo.version("v4").reason
    assert repo.recover(vid).equal(ms)


def test_snapshot_policy_by_chain_bytes(tmp_path):
    repo = Repository(tmp_path / "r", fsync=False, snapshots=SnapshotPolicy(max_chain_ratio=0.5))
    ms = ModelSet.from_modules(ffnn_models(20))
    vid = repo.save(ms)
    kinds = []
    for step in range(4):
        ms = retrain(ms, list(range(step * 5, step * 5 + 5)), [])  # a quarter of the set each time
        vid = repo.save(ms, approach="update", base=vid)
        kinds.append(repo.version(vid).approach)
    assert kinds == ["update", "update", "baseline", "update"]
    with pytest.raises(ValueError):
        SnapshotPolicy(every=0)


@pytest.mark.parametrize(
    "bad", ["v0", "", "1", "v1/../v2", "../versions/v1", "/etc/passwd", "V1", "v01", 5, None, "v1.json"]
)
def test_malformed_version_ids_are_not_found(repo, bad):
    repo.save(ffnn_models(2))
    for call in (repo.recover, repo.version, repo.storage_bytes):
        with pytest.raises(VersionNotFoundError) as info:
            call(bad)
        assert isinstance(info.value, KeyError)
    if bad is not None:  # base=None means "no base"
        with pytest.raises(VersionNotFoundError):
            repo.save(ffnn_models(2), approach="update", base=bad)


def test_unknown_versions_and_bad_arguments(repo):
    v1 = repo.save(ffnn_models(2))
    with pytest.raises(VersionNotFoundError, match="no version 'v9'"):
        repo.recover("v9")
    with pytest.raises(MMPackError, match="unknown approach 'diff'"):
        repo.save(ffnn_models(2), approach="diff")
    with pytest.raises(MMPackError, match="takes no provenance"):
        repo.save(ffnn_models(2), approach="update", base=v1, provenance={"x": 1})
    with pytest.raises(mmpack.ModelIndexError):
        repo.recover(v1, indices=[2])
    with pytest.raises(ValueError, match="strategy"):
        repo.recover(v1, strategy="fastest")
    with pytest.raises(TypeError):
        repo.save(ffnn_models(2), message=3)


def test_a_base_of_another_architecture_is_refused(repo):
    v1 = repo.save(ffnn_models(4))
    with pytest.raises(ArchitectureMismatchError, match="fc1.weight.*\\(69, 5\\).*\\(48, 5\\)"):
        repo.save([FFNN(69) for _ in range(4)], approach="update", base=v1)
    with pytest.raises(ArchitectureMismatchError, match="5 models cannot be stored on base v1 of 4"):
        repo.save(ffnn_models(5), approach="update", base=v1)
    assert [r.id for r in repo.versions()] == ["v1"]


def test_architecture_record_is_stored_once(repo):
    v1 = repo.save(ffnn_models(2))
    v2 = repo.save(ffnn_models(2, seed=3))
    v3 = repo.save(randomized_cnns(2))
    assert repo.version(v1).architecture_bytes > 0
    assert repo.version(v2).architecture_bytes == 0
    assert repo.version(v3).architecture_bytes > 0
    assert len(repo.catalog.state.architectures) == 2  # format 2: the catalog carries them


def test_a_directory_of_other_files_is_not_taken_over(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RepositoryError, match="not an mmpack repository"):
        Repository(tmp_path)
    with pytest.raises(TypeError):
        Repository()


class CountingStore(LocalStore):
    """A local store whose readers count the bytes they return and offer no file descriptor."""

    def __init__(self, root):
        super().__init__(root, fsync=False)
        self.bytes_read = 0

    def get(self, key):
        data = super().get(key)
        self.bytes_read += len(data)
        return data

    @contextlib.contextmanager
    def open_reader(self, key):
        with super().open_reader(key) as inner:
            yield _Counting(inner, self)


class _Counting:
    def __init__(self, inner, store):
        self._inner, self._store = inner, store

    def size(self):
        return self._inner.size()

    def descriptor(self):
        return None

    def read(self, offset, size, what):
        self._store.bytes_read += size
        return self._inner.read(offset, size, what)

    def read_into(self, offset, target, what):
        self._store.bytes_read += target.nbytes
        return self._inner.read_into(offset, target, what)

    def read_segments(self, offsets, lengths, dst, dst_index, dst_offsets, hashes=None, counts=None):
        counts = np.ones(len(lengths), np.uint64) if counts is None else counts
        self._store.bytes_read += int(np.sum(np.asarray(lengths, np.uint64) * counts))
        return self._inner.read_segments(offsets, lengths, dst, dst_index, dst_offsets, hashes, counts)


def test_recovering_a_few_models_reads_only_their_bytes(tmp_path):
    writer = Repository(tmp_path / "r", fsync=False)
    ms = ModelSet.from_modules(ffnn_models(500))
    vid = writer.save(ms)
    for step in range(3):
        ms = retrain(ms, list(range(step, 500, 7)), list(range(step + 3, 500, 11)))
        vid = writer.save(ms, approach="update", base=vid)
    store = CountingStore(tmp_path / "r")
    reader = Repository(store=store)
    reader.recover(vid)
    full = store.bytes_read
    store.bytes_read = 0
    assert reader.recover(vid, indices=[123]).equal(ms.select([123]))
    one = store.bytes_read
    per_model = ms.architecture.nbytes_per_model + 8 * len(ms.architecture)
    assert one < per_model + 4 * 4096  # the model's rows and hashes, plus manifests and headers
    assert full > 100 * one


def test_verify_passes_then_reports_each_kind_of_damage(repo):
    ms = ModelSet.from_modules(ffnn_models(50))
    v1 = repo.save(ms)
    v2 = repo.save(retrain(ms, [1, 2], [3]), approach="update", base=v1)
    v3 = repo.save(retrain(ms, [4], [5]), approach="update", base=v2)
    report = repo.verify()
    assert report.ok, str(report)
    assert report.versions == [v1, v2, v3] and report.objects == 3

    root = repo.store.root
    update_object = os.path.join(root, *repo.version(v2).objects[0].key.split("/"))
    data = bytearray(_read(update_object))
    data[-1000] ^= 0x04  # inside the hash table of v2
    _write(update_object, data)
    fresh = Repository(root)
    report = fresh.verify()
    assert not report.ok
    assert any(p.startswith(v2) for p in report.problems)
    assert not any(p.startswith(v1) for p in report.problems)


def test_verify_reports_missing_objects_and_damaged_manifests(repo):
    v1 = repo.save(ffnn_models(5))
    v2 = repo.save(ffnn_models(5, seed=1))
    os.unlink(os.path.join(repo.store.root, *repo.version(v1).objects[0].key.split("/")))
    report = Repository(repo.store.root).verify()
    assert [p.split(":")[0] for p in report.problems] == [v1] and "missing" in report.problems[0]
    # The catalog's HEAD is a copy of its newest commit, only a hint: damaged, it is passed over.
    head = os.path.join(repo.store.root, "catalog", "HEAD.json")
    _write(head, _read(head).replace(b'"message":""', b'"message":"x"'))
    assert Repository(repo.store.root).version(v2).message == ""
    commit = os.path.join(repo.store.root, "catalog", "log", f"{2:020d}.json")
    _write(commit, _read(commit).replace(b'"message":""', b'"message":"x"'))
    report = Repository(repo.store.root).verify()
    assert any("checksum" in p for p in report.problems), str(report)
    with pytest.raises(RepositoryError, match="checksum"):
        Repository(repo.store.root).recover(v2)


def test_recovery_of_a_corrupted_piece_raises_and_never_returns_wrong_weights(repo):
    ms = ModelSet.from_modules(ffnn_models(20))
    v1 = repo.save(ms)
    path = os.path.join(repo.store.root, *repo.version(v1).objects[0].key.split("/"))
    data = bytearray(_read(path))
    data[4096] ^= 0x01
    _write(path, data)
    fresh = Repository(repo.store.root)
    with pytest.raises(mmpack.IntegrityError):
        fresh.recover(v1)


def test_gc_removes_leftovers_but_nothing_referenced(repo):
    ms = ModelSet.from_modules(ffnn_models(5))
    v1 = repo.save(ms)
    root = repo.store.root
    orphan = repo.objects.new_key()
    repo.store.put(orphan, b"left by a crashed save")
    temporary = os.path.join(root, "objects", ".abc.mmpack.1.deadbeef.mmpack-tmp")
    _write(temporary, b"half")
    assert [k for k in repo.store.list("objects/")].count(orphan) == 1
    assert repo.gc().objects == 0  # younger than the grace period: may belong to a running save
    report = repo.gc(grace_seconds=0)
    assert (report.temporaries, report.objects) == (1, 1)
    assert not os.path.exists(temporary) and not repo.store.exists(orphan)
    assert repo.recover(v1).equal(ms)
    assert repo.verify().ok

"""Stores: the conformance suite on the local and in-memory backends, choosing a backend from a
location, range planning, and the claims that publish keys without conditional writes."""

from __future__ import annotations

import os
import threading
import time
import uuid

import numpy as np
import pytest
from helpers import ffnn_models
from hypothesis import example, given
from hypothesis import strategies as st

import mmpack
from mmpack import MissingDependencyError, MMPackError, Repository
from mmpack.store import FsspecStore, LocalStore, open_store
from mmpack.store.instrumented import instrument
from mmpack.store.publication import INTERNAL_PREFIX
from mmpack.store.remote_reader import plan_ranges
from mmpack.store.urls import protocol_of
from mmpack.testing import StoreTests

fsspec = pytest.importorskip("fsspec")


class TestLocalStore(StoreTests):
    @pytest.fixture
    def store(self, tmp_path):
        return LocalStore(tmp_path / "store", fsync=False)

    def test_clean_temporaries_removes_old_temporary_files(self, store):
        store.put("objects/a", b"1")
        leftover = os.path.join(store.root, "objects", ".a.1.deadbeef.mmpack-tmp")
        with open(leftover, "wb") as f:
            f.write(b"half")
        assert store.clean_temporaries(3600).removed == 0
        assert store.clean_temporaries(0) == mmpack.store.CleanupReport(1, 4)
        assert not os.path.exists(leftover)


@pytest.fixture
def memory_store():
    store = FsspecStore(f"memory://mmpack-{uuid.uuid4().hex}")
    fs = store.fs  # tests may instrument the store
    yield store
    if fs.exists(store.root):
        fs.rm(store.root, recursive=True)


class TestMemoryFsspecStore(StoreTests):
    """The fsspec backend on fsspec's in-memory file system, which has no conditional writes:
    put_if_absent goes through claims."""

    @pytest.fixture
    def store(self, memory_store):
        assert not memory_store.conditional_writes
        return memory_store


# -- choosing a backend ------------------------------------------------------------------


def test_local_paths_and_file_urls_open_local_stores(tmp_path):
    for location in (tmp_path / "a", str(tmp_path / "b"), f"file://{tmp_path}/c"):
        store = open_store(location, fsync=False)
        assert isinstance(store, LocalStore) and not store.fsync
    assert open_store(f"file://{tmp_path}/c").root == str(tmp_path / "c")
    with pytest.raises(MMPackError, match="storage_options apply to fsspec URLs"):
        open_store(tmp_path / "d", {"anon": True})
    with pytest.raises(TypeError):
        open_store(3)
    assert isinstance(open_store("odd::name", fsync=False), LocalStore)  # not a chained URL
    assert protocol_of("simplecache::s3://bucket/x") == "simplecache" and protocol_of("C:\\data") is None


def test_other_urls_open_fsspec_stores_and_repositories():
    url = f"memory://mmpack-{uuid.uuid4().hex}/cells"
    repo = Repository(url)
    assert isinstance(repo.store, FsspecStore) and repr(repo) == f"Repository(FsspecStore({url!r}))"
    ms = mmpack.ModelSet.from_modules(ffnn_models(4))
    vid = repo.save(ms)
    assert Repository(url).recover(vid, indices=[2]).equal(ms.select([2]))
    with pytest.raises(TypeError, match="storage_options"):
        Repository(store=repo.store, storage_options={})


def test_an_unknown_protocol_is_a_clear_error():
    with pytest.raises(MMPackError, match="cannot open 'nosuch://x'"):
        Repository("nosuch://x")


def test_a_missing_s3_backend_names_the_extra_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "s3fs", None)  # import s3fs now fails
    monkeypatch.delitem(sys.modules["fsspec.registry"]._registry, "s3", raising=False)  # forget the class
    with pytest.raises(MissingDependencyError, match=r'pip install "mmpack\[s3\]"') as info:
        Repository("s3://bucket/cells")
    assert isinstance(info.value, ImportError)


# -- planning ranged reads -----------------------------------------------------------------


def test_plan_ranges_merges_neighbours_and_splits_large_spans():
    starts, ends, owner = plan_ranges(np.array([0, 100, 10**9, 50]), np.array([10, 10, 10, 5]))
    assert starts.tolist() == [0, 10**9] and ends.tolist() == [110, 10**9 + 10] and owner.tolist() == [0, 0, 1, 0]
    rows = np.arange(0, 64 * 2**20, 1024)
    starts, ends, _ = plan_ranges(rows, np.full(len(rows), 1024), max_range=16 * 2**20)
    assert len(starts) == 4 and (ends - starts).max() <= 16 * 2**20


@given(
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 5000)), min_size=1, max_size=60),
    st.integers(0, 5000),
    st.integers(1, 10**5),
)
@example(segments=[(0, 1), (1, 0)], max_gap=0, max_range=1)  # an empty segment on a split
def test_plan_ranges_covers_every_segment_with_disjoint_sorted_ranges(segments, max_gap, max_range):
    offsets = np.array([o for o, _ in segments])
    lengths = np.array([n for _, n in segments])
    starts, ends, owner = plan_ranges(offsets, lengths, max_gap=max_gap, max_range=max_range)
    owner = owner.astype(np.intp)
    assert np.all(starts[owner] <= offsets) and np.all(offsets + lengths <= ends[owner])
    assert np.all(starts[1:] >= ends[:-1])  # never the same byte twice
    # Only a gap makes an empty range (an empty segment far from the others); a split never does.
    empty = np.flatnonzero(ends[1:] == starts[1:]) + 1
    assert np.all(starts[empty] > ends[empty - 1] + np.uint64(max_gap))


# -- claims (put_if_absent without conditional writes) -------------------------------------


def _claims(store, key):
    return store.fs.find(f"{store.root}/{INTERNAL_PREFIX}/claims/{key}")


def test_a_claimed_put_costs_a_constant_number_of_requests(memory_store):
    log = instrument(memory_store)
    assert memory_store.put_if_absent("versions/v1.json", b"m")
    assert log.requests == 5 and log.by_kind["pipe_file"] == 2  # claim, list, exists, write, unclaim
    assert _claims(memory_store, "versions/v1.json") == []


def test_a_live_claim_makes_writers_wait_and_a_stale_one_is_ignored(memory_store):
    key = "versions/v3.json"
    other = f"{memory_store.root}/{INTERNAL_PREFIX}/claims/{key}/someone"
    memory_store.fs.pipe_file(other, b"{}")
    released = threading.Timer(0.3, memory_store.fs.rm_file, args=(other,))
    released.start()
    started = time.monotonic()
    assert memory_store.put_if_absent(key, b"mine")
    assert time.monotonic() - started >= 0.3  # waited for the other writer to finish or give up
    released.join()

    memory_store.lease_seconds = 0.2
    dead = f"{memory_store.root}/{INTERNAL_PREFIX}/claims/versions/v4.json/killed"
    memory_store.fs.pipe_file(dead, b"{}")  # a writer killed while holding its claim
    time.sleep(0.3)
    assert memory_store.put_if_absent("versions/v4.json", b"mine")
    assert _claims(memory_store, key) == [] and _claims(memory_store, "versions/v4.json") == []  # removed on the way


def test_clean_temporaries_removes_only_claims_older_than_the_lease(memory_store):
    claim = f"{memory_store.root}/{INTERNAL_PREFIX}/claims/versions/v1.json/dead"
    memory_store.fs.pipe_file(claim, b"{}")
    assert memory_store.clean_temporaries(0).removed == 0  # younger than the lease: may be live
    memory_store.lease_seconds = 0.05
    time.sleep(0.1)
    assert memory_store.clean_temporaries(0) == mmpack.store.CleanupReport(1, 2)
    assert memory_store.list("") == []


def test_conditional_writes_are_refused_where_unsupported():
    with pytest.raises(MMPackError, match="conditional writes are implemented for S3 only"):
        FsspecStore("memory://x", conditional_writes=True)
    with pytest.raises(ValueError):
        FsspecStore("memory://x", lease_seconds=0)


def test_stores_pickle_for_the_workers_of_a_cluster(tmp_path):
    import pickle

    local = pickle.loads(pickle.dumps(LocalStore(tmp_path / "x", fsync=False)))
    local.put("objects/a", b"1")
    assert local.get("objects/a") == b"1" and not local.fsync
    remote = FsspecStore(f"memory://pickled-{uuid.uuid4().hex}")
    remote.put("objects/b", b"2")
    copy = pickle.loads(pickle.dumps(remote))
    assert copy.get("objects/b") == b"2" and copy.url == remote.url
    assert copy.put_if_absent("objects/c", b"3") and not copy.put_if_absent("objects/c", b"4")

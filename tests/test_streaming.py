"""Sets that are never whole in memory: versions saved from a stream of slices, recovered as one,
read lazily from a repository, and files mapped by ``mmpack.load(path, mmap=True)``.

Streams round-trip bit for bit whatever the slice sizes, including slices that cut across shards;
a stream's memory is one slice plus small metadata, measured in children whose address space is
capped (``tests/limited.py``); lazy sets read only what is touched and report corruption when the
damaged piece is touched or verified.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from helpers import ffnn_models, mixed_models
from limited import run_limited
from test_repository import retrain

import mmpack
from mmpack import IntegrityError, InvalidArgumentError, ModelSet, Repository, RepositoryError
from mmpack.fileformat import read_header

N = 90
SHARD = 8  # models per shard in these tests


@pytest.fixture(scope="module")
def base_set() -> ModelSet:
    return ModelSet.from_modules(ffnn_models(N))


def repository(path, ms: ModelSet, **options) -> Repository:
    return Repository(path, fsync=False, shard_bytes=SHARD * ms.architecture.nbytes_per_model, **options)


def stream(ms: ModelSet, size: int, order=None):
    """``(first, slice)`` pairs of ``size`` models; ``order``: the slices' order (default ascending)."""
    starts = list(range(0, len(ms), size))
    for first in order(starts) if order else starts:
        yield first, ms.select(range(first, min(first + size, len(ms))))


def joined(parts) -> ModelSet:
    parts = list(parts)
    assert [first for first, _ in parts] == sorted(first for first, _ in parts)
    first_set = parts[0][1]
    return ModelSet(first_set.architecture, {n: torch.cat([p.tensors[n] for _, p in parts])
                                             for n in first_set.architecture.names})


@pytest.mark.parametrize("size", [1, 7, SHARD, 13, N])
@pytest.mark.parametrize("compression", [None, "zstd"])
def test_streamed_versions_round_trip_at_any_slice_size(tmp_path, base_set, size, compression):
    repo = repository(tmp_path / "repo", base_set, compression=compression)
    v1 = repo.save_stream(stream(base_set, size))
    changed = retrain(base_set, list(range(0, N, 9)), list(range(4, N, 11)))
    v2 = repo.save_stream(stream(changed, size), approach="update", base=v1)
    fresh = Repository(repo.store.root)
    for vid, expected in ((v1, base_set), (v2, changed)):
        assert fresh.recover(vid).equal(expected)
        for read_size in (5, SHARD, 31):  # slices that cut across shards and stream slices
            assert joined(fresh.recover_stream(vid, read_size)).equal(expected)
        wanted = [N - 1, 0, 12, 13, 14, 44]
        assert fresh.recover(vid, wanted).equal(expected.select(wanted))
    record = fresh.version(v1)
    assert all(s.count <= min(size, SHARD) for s in record.shards)
    assert {s.first for s in record.shards} >= set(range(0, N, size))  # no shard spans two slices
    assert np.array_equal(fresh.hashes(v2), changed.hashes())
    assert fresh.verify().ok


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_a_streamed_update_that_changes_nothing_recovers_its_base(tmp_path, base_set, compression):
    repo = repository(tmp_path / "repo", base_set, compression=compression)
    v1 = repo.save(base_set)
    v2 = repo.save_stream(stream(base_set, 25), approach="update", base=v1)
    record = repo.version(v2)
    assert len(record.objects) == 1 and len(record.changes.models) == 0
    assert Repository(repo.store.root).recover(v2).equal(base_set) and repo.verify().ok


def test_slices_may_come_in_any_order_and_as_modules(tmp_path, base_set):
    repo = repository(tmp_path / "repo", base_set)
    vid = repo.save_stream(stream(base_set, 20, order=lambda s: s[::-1]))
    assert repo.recover(vid).equal(base_set)
    modules = ffnn_models(N)
    vid = repo.save_stream(((a, modules[a:a + 30]) for a in range(0, N, 30)), approach="update", base=vid)
    assert repo.recover(vid).equal(ModelSet.from_modules(modules))


def test_a_stream_that_fails_leaves_no_version_and_no_objects(tmp_path, base_set):
    repo = repository(tmp_path / "repo", base_set)
    v1 = repo.save(base_set)
    objects = set(repo.store.list("objects/"))

    def broken():
        yield from stream(base_set, 30)
        raise RuntimeError("the trainer died")

    with pytest.raises(RuntimeError, match="trainer"):
        repo.save_stream(broken(), approach="update", base=v1)
    missing = ((a, base_set.select(range(a, a + 10))) for a in (0, 10, 30))
    with pytest.raises(InvalidArgumentError, match="models 20 to 29 have no receipt"):
        repo.save_stream(missing, approach="update", base=v1)
    twice = ((a, base_set.select(range(a, a + 45))) for a in (0, 30, 45))
    with pytest.raises(InvalidArgumentError, match="written twice"):
        repo.save_stream(twice)
    with pytest.raises(InvalidArgumentError, match="pairs"):
        repo.save_stream([base_set])
    assert [r.id for r in repo.versions()] == [v1] and set(repo.store.list("objects/")) == objects


def test_a_stream_past_its_base_or_of_another_architecture_is_refused(tmp_path, base_set):
    repo = repository(tmp_path / "repo", base_set)
    v1 = repo.save(base_set)
    with pytest.raises(InvalidArgumentError, match="beyond"):
        repo.save_stream([(80, base_set.select(range(20)))], approach="update", base=v1)
    with pytest.raises(mmpack.ArchitectureMismatchError):
        repo.save_stream([(0, ModelSet.from_modules(mixed_models(2)))], approach="update", base=v1)


def test_only_baseline_and_update_versions_are_written_in_slices(tmp_path, base_set):
    repo = repository(tmp_path / "repo", base_set)
    v1 = repo.save(base_set)
    for approach in ("provenance", "auto"):
        with pytest.raises(InvalidArgumentError, match="baseline or update"):
            repo.open_version(approach, base=v1)
    with pytest.raises(InvalidArgumentError, match="slice_models"):
        repo.recover_stream(v1, 0)


def test_a_writer_commits_once_and_only_its_own_receipts(tmp_path, base_set):
    repo = repository(tmp_path / "repo", base_set)
    writer, other = repo.open_version(), repo.open_version()
    receipts = [writer.write(a, base_set.select(range(a, a + 45))) for a in (0, 45)]
    stranger = other.write(0, base_set.select(range(45)))
    with pytest.raises(InvalidArgumentError, match="another open version"):
        writer.commit([*receipts, stranger])
    vid = writer.commit(receipts + receipts[:1])  # the same receipt twice counts once
    with pytest.raises(RepositoryError, match="committed already"):
        writer.commit(receipts)
    with pytest.raises(TypeError):
        pickle.dumps(writer)
    assert repo.recover(vid).equal(base_set)
    copy = pickle.loads(pickle.dumps(writer.handle))
    assert (copy.token, copy.store.root) == (writer.handle.token, repo.store.root)


def test_read_handles_pickle_and_recover_their_slice(tmp_path, base_set):
    repo = repository(tmp_path / "repo", base_set)
    vid = repo.save(base_set)
    handle = pickle.loads(pickle.dumps(repo.read_handle(vid)))
    assert handle.slices(40) == [(0, 40), (40, 80), (80, N)]
    assert handle.recover(range(35, 50)).equal(base_set.select(range(35, 50)))


_STREAM_SETUP = """
import numpy as np, tempfile, torch, mmpack
from mmpack.workloads import ffnn48

SLICE, SLICES = {slice_models}, {slices}
architecture = mmpack.Architecture.from_module(ffnn48())

def make(k):
    g = torch.Generator().manual_seed(k)
    tensors = {{s.name: torch.randn((SLICE, *s.shape), generator=g) for s in architecture.tensors}}
    return mmpack.ModelSet(architecture, tensors)

def fleet(count):
    for k in range(count):
        part = make(k)
        yield k * SLICE, part
        del part  # the generator holds one slice

root = tempfile.mkdtemp(dir={tmp!r})
repo = mmpack.Repository(root, fsync=False, shard_bytes=8 << 20)
warm = repo.save_stream(fleet(2))  # first use of every path, before the cap is measured from
for _ in repo.recover_stream(warm, SLICE):
    pass
"""


def _slice_bytes(slice_models: int) -> int:
    return slice_models * ModelSet.from_modules(ffnn_models(1)).architecture.nbytes_per_model


@pytest.mark.parametrize("direction", ["save", "recover"])
def test_a_stream_holds_one_slice_whatever_the_set(tmp_path, direction):
    """12 slices of 32 MB go through a child whose address space may grow by 6 slices beyond what it
    used after saving and recovering a 2-slice stream (the whole set would need 12), and whose peak
    resident memory may grow by 3. glibc's allocator is told to map every block of 1 MiB or more
    (``MALLOC_MMAP_THRESHOLD_``), so freed slices leave the process at once: by default it raises
    that threshold as blocks are freed and keeps up to twice that much freed memory in its heap, and
    the peak then says more about the allocator than about what mmpack holds."""
    slice_models, slices = 1600, 12
    code = _STREAM_SETUP.format(slice_models=slice_models, slices=slices, tmp=str(tmp_path)) + """
big = None if {save} else repo.save_stream(fleet(SLICES))

def read():
    if {save}:
        repo.save_stream(fleet(SLICES))
        return
    for k, (first, part) in enumerate(repo.recover_stream(big, SLICE)):
        assert first == k * SLICE and np.array_equal(part.hashes(), make(k).hashes())
        del part
""".format(save=direction == "save")
    outcome = run_limited(code, budget_bytes=6 * _slice_bytes(slice_models), timeout=300,
                          env={"MALLOC_MMAP_THRESHOLD_": str(1 << 20)})
    assert outcome.outcome == "ok", (outcome, outcome.detail)
    assert outcome.peak_over_start_kib * 1024 < 3 * _slice_bytes(slice_models), outcome


# -- lazy sets ------------------------------------------------------------------------------------


def corrupt_row(path, model: int, tensor: int, first_model: int = 0) -> None:
    """Flip a bit of (model, tensor) in a stacked object (whose first model is ``first_model``)."""
    with open(path, "rb") as f:
        header = read_header(mmpack._io.FileReader(f))
    spec = header.architecture.tensors[tensor]
    at = header.data_start + header.layout.tensor_offsets[tensor] + (model - first_model) * spec.nbytes + 1
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x10]))


def test_a_lazy_version_reads_only_what_is_touched_and_reports_corruption_there(tmp_path, base_set):
    repo = repository(tmp_path / "repo", base_set)
    v1 = repo.save(base_set)
    changed = retrain(base_set, [3, 50], [60])
    v2 = repo.save(changed, approach="update", base=v1)
    shard = repo.version(v1).shards[2]  # models 16 to 23
    corrupt_row(os.path.join(repo.store.root, *shard.ref.key.split("/")), 17, 1, shard.first)
    lazy = Repository(repo.store.root).recover_lazy(v2)
    assert len(lazy) == N and lazy.loaded == () and lazy.nbytes == changed.nbytes
    assert lazy.select([3, 60, 40]).equal(changed.select([3, 60, 40]))
    assert torch.equal(lazy.tensors["fc4.weight"], changed.tensors["fc4.weight"])
    assert lazy.loaded == ("fc4.weight",)
    with pytest.raises(IntegrityError, match="model 17 tensor #1"):
        lazy.select([16, 17])
    with pytest.raises(IntegrityError):
        lazy.tensors[changed.architecture.names[1]]
    with pytest.raises(IntegrityError):
        lazy.verify()
    with pytest.raises(TypeError):
        pickle.dumps(lazy)
    healthy = Repository(repo.store.root).recover_lazy(v1)
    assert torch.equal(healthy.tensors["fc4.bias"], base_set.tensors["fc4.bias"])


def test_a_lazy_version_verifies_and_equals_the_set(tmp_path, base_set):
    repo = repository(tmp_path / "repo", base_set, compression="zstd")
    vid = repo.save(base_set)
    lazy = repo.recover_lazy(vid)
    lazy.verify()
    assert lazy.equal(base_set) and np.array_equal(lazy.hashes(), base_set.hashes())
    assert joined(lazy.slices(25)).equal(base_set)


def test_a_mapped_file_is_checked_when_loaded_and_its_rows_when_touched(tmp_path, base_set):
    path = tmp_path / "fleet.mmpack"
    mmpack.save(base_set, path)
    mapped = mmpack.load(path, mmap=True)
    assert mapped.equal(base_set)
    mapped.verify()
    assert mapped.select([5, 2, 5]).equal(base_set.select([5, 2, 5]))
    mapped.tensors["fc1.weight"][0] += 1  # a private mapping: the file is unchanged
    assert mmpack.load(path).equal(base_set)
    corrupt_row(path, 7, 3)
    damaged = mmpack.load(path, mmap=True)  # rows are not read at load
    assert damaged.select([6, 8]).equal(base_set.select([6, 8]))
    with pytest.raises(IntegrityError, match="model 7 tensor #3"):
        damaged.select([7])
    with pytest.raises(IntegrityError, match="model 7 tensor #3"):
        damaged.verify()


def test_mapping_refuses_what_it_cannot_map(tmp_path, base_set):
    mmpack.save(base_set, tmp_path / "small.mmpack", compression="zstd")
    with pytest.raises(mmpack.FormatError, match="compressed"):
        mmpack.load(tmp_path / "small.mmpack", mmap=True)
    with pytest.raises(InvalidArgumentError):
        mmpack.load(tmp_path / "small.mmpack", indices=[1], mmap=True)
    with open(tmp_path / "cut.mmpack", "wb") as f:
        mmpack.save(base_set, f)
    with open(tmp_path / "cut.mmpack", "r+b") as f:
        f.truncate(os.path.getsize(tmp_path / "cut.mmpack") - 1)
    with pytest.raises(IntegrityError, match="truncated"):
        mmpack.load(tmp_path / "cut.mmpack", mmap=True)

"""Compressed versions in a repository: Baseline and Update objects, XOR deltas, recovery, verification."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from helpers import ffnn_models, mixed_models, randomized_cnns

from mmpack import Compression, CompressionError, ModelSet, Repository, RepositoryError, SnapshotPolicy
from mmpack.repository import planner


def fine_tune(ms: ModelSet, full: list[int], partial: list[int], seed: int, prefixes=("fc3", "fc4")) -> ModelSet:
    """Small relative changes, as fine-tuning makes: signs and exponents mostly survive."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: t.clone() for name, t in ms.tensors.items()}
    for name, t in tensors.items():
        if not t.dtype.is_floating_point:
            t[full] += 1
            continue
        rows = full + (partial if name.startswith(prefixes) else [])
        if rows:
            noise = torch.randn(t[rows].shape, generator=generator, dtype=torch.float32).to(t.dtype)
            t[rows] = t[rows] * (1 + (1e-3 * noise))
    return ModelSet(ms.architecture, tensors)


def _chain(repo: Repository, ms: ModelSet, cycles: int, **save) -> tuple[list[str], list[ModelSet]]:
    rng = np.random.default_rng(0)
    sets, ids = [ms], [repo.save(ms, **save)]
    for cycle in range(cycles):
        chosen = rng.choice(len(ms), max(2, len(ms) // 5), replace=False).tolist()
        half = len(chosen) // 2
        sets.append(fine_tune(sets[-1], chosen[:half], chosen[half:], seed=cycle))
        ids.append(repo.save(sets[-1], approach="update", base=ids[-1], **save))
    return ids, sets


def _check_every_version(repo: Repository, ids: list[str], sets: list[ModelSet]) -> None:
    for vid, expected in zip(ids, sets):
        picks = [len(expected) - 1, 0, 0, len(expected) // 2]
        assert repo.recover(vid).equal(expected)
        assert repo.recover(vid, strategy="recursive").equal(expected)
        assert repo.recover(vid, indices=picks).equal(expected.select(picks))
    fresh = Repository(repo.store.root, fsync=False)
    assert fresh.recover(ids[-1]).equal(sets[-1])
    assert fresh.recover(ids[-1], indices=[1]).equal(sets[-1].select([1]))
    report = repo.verify()
    assert report.ok, str(report)


@pytest.mark.parametrize(
    "build", [lambda: ffnn_models(60), lambda: randomized_cnns(12), lambda: mixed_models(10)],
    ids=["ffnn48", "cnn-batchnorm", "fp16-bf16-fp64-int64"],
)
def test_compressed_chain_with_xor_deltas_recovers_every_version(tmp_path, build):
    repo = Repository(tmp_path / "r", fsync=False, compression="zstd")
    ids, sets = _chain(repo, ModelSet.from_modules(build()), cycles=4)
    _check_every_version(repo, ids, sets)
    records = repo.versions()
    assert records[0].details["compression"] == "zstd-3" and "xor_base" not in records[0].details
    assert all(r.details["compression"] == "zstd-3" and r.details["xor_base"] == ids[0] for r in records[1:])


@pytest.mark.parametrize("codec", ["rans", "zstd"])
def test_compression_stores_less_and_xor_less_still(tmp_path, codec):
    ms = ModelSet.from_modules(ffnn_models(200))
    sizes = {}
    for name, setting in [("raw", None), ("zstd", Compression(codec, xor=False)), ("xor", Compression(codec))]:
        repo = Repository(tmp_path / name, fsync=False, compression=setting)
        ids, sets = _chain(repo, ms, cycles=1)
        sizes[name] = [repo.storage_bytes(v) for v in ids]
        assert repo.recover(ids[-1]).equal(sets[-1])
    assert sizes["zstd"][0] < 0.95 * sizes["raw"][0]
    assert sizes["zstd"][1] < sizes["raw"][1]
    assert sizes["xor"][1] < 0.9 * sizes["zstd"][1]  # fine-tuned rows: high bytes XOR to zeros


def test_save_overrides_the_repository_default(tmp_path):
    ms = ModelSet.from_modules(ffnn_models(30))
    repo = Repository(tmp_path / "a", fsync=False, compression="zstd")
    v1 = repo.save(ms, compression=None)
    v2 = repo.save(fine_tune(ms, [1], [2], 0), approach="update", base=v1)
    assert "compression" not in repo.version(v1).details
    assert repo.version(v2).details["xor_base"] == v1  # a raw full version is a fine XOR reference
    assert repo.recover(v2).equal(fine_tune(ms, [1], [2], 0))
    plain = Repository(tmp_path / "b", fsync=False)
    w1 = plain.save(ms, compression=Compression(codec="zstd", level=9))
    w2 = plain.save(fine_tune(ms, [3], [], 1), approach="update", base=w1)
    assert plain.version(w1).details["compression"] == "zstd-9"
    assert "compression" not in plain.version(w2).details  # a raw delta on a compressed full version
    assert plain.recover(w2).equal(fine_tune(ms, [3], [], 1))
    with pytest.raises(CompressionError, match="unknown compression"):
        plain.save(ms, compression="brotli")
    with pytest.raises(CompressionError):
        Repository(tmp_path / "c", compression="gzip")


def test_xor_can_be_turned_off(tmp_path):
    repo = Repository(tmp_path / "r", fsync=False, compression=Compression(xor=False))
    ids, sets = _chain(repo, ModelSet.from_modules(ffnn_models(40)), cycles=2)
    assert all("xor_base" not in r.details for r in repo.versions())
    _check_every_version(repo, ids, sets)


def test_after_a_snapshot_deltas_xor_against_the_new_full_version(tmp_path):
    repo = Repository(tmp_path / "r", fsync=False, compression="zstd", snapshots=SnapshotPolicy(every=2))
    ids, sets = _chain(repo, ModelSet.from_modules(ffnn_models(40)), cycles=5)
    kinds = [(r.approach, r.details.get("xor_base")) for r in repo.versions()]
    assert kinds == [("baseline", None), ("update", "v1"), ("update", "v1"), ("baseline", None),
                     ("update", "v4"), ("update", "v4")]
    _check_every_version(repo, ids, sets)


def test_a_model_updated_in_every_cycle_still_decodes_from_two_reads(tmp_path):
    repo = Repository(tmp_path / "r", fsync=False, compression="zstd")
    ms = ModelSet.from_modules(ffnn_models(30))
    ids, sets = [repo.save(ms)], [ms]
    for cycle in range(4):
        sets.append(fine_tune(sets[-1], [7], [8], seed=cycle))
        ids.append(repo.save(sets[-1], approach="update", base=ids[-1]))
    _check_every_version(repo, ids, sets)


def test_an_xor_base_other_than_the_full_version_is_refused(tmp_path):
    repo = Repository(tmp_path / "r", fsync=False, compression="zstd")
    ids, _ = _chain(repo, ModelSet.from_modules(ffnn_models(20)), cycles=2)
    chain = repo.chain(ids[-1])
    forged = dataclasses.replace(chain[0], details={**chain[0].details, "xor_base": ids[1]})
    with pytest.raises(RepositoryError, match="not its chain's full version"):
        planner.xor_base(forged, [forged, *chain[1:]])


def test_a_damaged_compressed_object_is_reported_by_verify(tmp_path):
    repo = Repository(tmp_path / "r", fsync=False, compression="zstd")
    ids, _ = _chain(repo, ModelSet.from_modules(ffnn_models(40)), cycles=1)
    key = repo.version(ids[1]).objects[0].key
    path = tmp_path / "r" / key
    blob = bytearray(path.read_bytes())
    header = repo.objects.header(repo.version(ids[1]).objects[0])
    at = header.data_start + header.layout.tensor_offsets[1] + 3
    blob[at] ^= 0xFF
    path.write_bytes(bytes(blob))
    fresh = Repository(tmp_path / "r", fsync=False)
    report = fresh.verify()
    assert not report.ok and any(ids[1] in p for p in report.problems)

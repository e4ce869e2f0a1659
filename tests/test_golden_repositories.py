"""Repositories written by released formats must keep reading: every version, bit for bit."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from golden_repositories import N_MODELS, RETRAINED, TAG_MOVES, golden_history, golden_train
from golden_sets import GOLDEN_DIR

import mmpack
from mmpack import Repository

TRAINING = {"golden_repositories:golden_train": golden_train}
FORMATS = ["repo_format1", "repo_format2", "repo_format2_shards"]
RECORDS = [  # id, approach, base, message
    ("v1", "baseline", None, "golden baseline"),
    ("v2", "update", "v1", "golden update"),
    ("v3", "update", "v2", "golden xor update"),
    ("v4", "provenance", "v3", "golden provenance"),
    ("v5", "baseline", None, "golden compressed baseline"),
]


@pytest.fixture(params=FORMATS)
def golden(request, tmp_path, monkeypatch):
    """A copy of a golden repository (reading must not need write access, but stay safe), as the
    working directory: the provenance version's datasets are referenced by relative paths."""
    copy = tmp_path / request.param
    shutil.copytree(GOLDEN_DIR / request.param, copy)
    monkeypatch.chdir(copy)
    return Repository(copy)


def test_records_read_as_written(golden):
    records = golden.versions()
    assert [(r.id, r.approach, r.base, r.message) for r in records] == RECORDS
    assert all(r.n_models == N_MODELS for r in records)
    assert records[2].details["xor_base"] == "v1" and records[2].details["compression"] == "zstd-3"
    assert records[3].details["retrained"] == len(RETRAINED)
    assert records[1].changes.models.tolist() == [1, 4, 9]


@pytest.mark.parametrize("position", range(5))
def test_every_version_recovers_bit_exactly(golden, position):
    expected = golden_history()[position]
    vid = RECORDS[position][0]
    assert golden.recover(vid, training=TRAINING).equal(expected)
    assert golden.recover(vid, [11, 2, 4], training=TRAINING).equal(expected.select([11, 2, 4]))
    assert golden.recover(vid, strategy="recursive", training=TRAINING).equal(expected)
    assert np.array_equal(golden.hashes(vid), expected.hashes())


def test_verify_passes(golden):
    report = golden.verify(training=TRAINING)
    assert report.ok, str(report)
    assert report.versions == [r[0] for r in RECORDS] and not report.not_retrained


def test_verify_without_retraining_checks_the_provenance_records(golden):
    report = golden.verify()
    assert report.ok and report.not_retrained == ["v4"], str(report)


def test_the_golden_repository_still_reads_after_a_save(golden):
    """A new save into an old repository must not disturb the versions already there."""
    vid = golden.save(golden_history()[4], approach="update", base="v5")
    assert golden.recover(vid).equal(golden_history()[4])
    assert Repository(golden.store.root).recover("v3").equal(golden_history()[2])
    assert isinstance(golden.version("v1"), mmpack.VersionRecord)


@pytest.mark.parametrize("name", ["repo_format2", "repo_format2_shards"])
def test_the_format_2_golden_repository_reads_its_tags_and_their_log(name):
    repo = Repository(GOLDEN_DIR / name, create=False)
    assert repo.format_version == 2
    assert repo.tags() == {"production": "v5" if TAG_MOVES % 2 == 0 else "v3"}
    log = repo.tag_log()
    assert len(log) == TAG_MOVES + 2
    assert [(m.name, m.before, m.after, m.message) for m in log[:2]] == [
        ("production", None, "v3", "move 0"), ("production", "v3", "v5", "move 1")]
    assert [(m.name, m.before, m.after, m.message) for m in log[-2:]] == [
        ("canary", None, "v4", ""), ("canary", "v4", None, "rolled back")]
    assert repo.catalog.state.checkpoint == 32  # read through a checkpoint past the first
    assert [c.version for c in repo.history(2)] == ["v1", "v4", "v5"]
    assert repo.diff("v1", "v2").models.tolist() == [1, 4, 9]


def test_the_sharded_golden_repository_holds_shards_and_reads_them_alone():
    repo = Repository(GOLDEN_DIR / "repo_format2_shards", create=False)
    shards = {r.id: [(s.first, s.stop) for s in r.shards] for r in repo.versions()}
    assert shards["v1"] == shards["v5"] == [(m, m + 1) for m in range(N_MODELS)]  # a shard per model
    assert shards["v2"] == [(0, 9), (9, N_MODELS)] and shards["v3"] == [(0, 11), (11, N_MODELS)]
    assert len(shards["v4"]) == 1  # a provenance document holds every model
    assert repo.plan("v1", [3]).reads[0].object == 3
    assert repo.recover("v3", [11, 5]).equal(golden_history()[2].select([11, 5]))

"""approach="auto": every branch of the decision, the cost model, and the records it leaves."""

from __future__ import annotations

import math

import pytest
from helpers import ffnn_models
from test_repository_compression import fine_tune

import mmpack
from mmpack import (
    Estimate,
    FastestRecovery,
    MMPackError,
    ModelSet,
    Repository,
    SmallestUnder,
    SnapshotPolicy,
    Throughputs,
)
from mmpack.approaches import APPROACHES, Baseline
from mmpack.approaches.advisor import measured_throughputs

# Fixed speeds make the decisions independent of the machine: 1 GB/s reads, 0.5 GB/s decoding.
FAST_OPEN = Throughputs(1e9, 5e8, 1e-4)
SLOW_OPEN = Throughputs(1e9, 5e8, 0.5)  # an object store where each object costs half a second


@pytest.fixture
def models() -> ModelSet:
    return ModelSet.from_modules(ffnn_models(100))


def _repo(tmp_path, throughputs=FAST_OPEN, **kwargs) -> Repository:
    return Repository(tmp_path / "r", fsync=False, throughputs=throughputs, **kwargs)


def test_without_a_base_only_baseline_can_store_the_set(tmp_path, models):
    repo = _repo(tmp_path)
    vid = repo.save(models, approach="auto")
    record = repo.version(vid)
    assert record.approach == "baseline"
    assert "update unavailable" in record.reason and "smallest storage" in record.reason
    assert set(record.details["estimates"]) == {"baseline"}
    assert repo.recover(vid).equal(models)


def test_smallest_storage_picks_update_on_a_base(tmp_path, models):
    repo = _repo(tmp_path)
    v1 = repo.save(models)
    changed = fine_tune(models, [1, 2], [3], 0)
    v2 = repo.save(changed, approach="auto", base=v1)
    record = repo.version(v2)
    assert record.approach == "update" and "update stores the least" in record.reason
    estimates = record.details["estimates"]
    assert estimates["update"]["stored_bytes"] < estimates["baseline"]["stored_bytes"]
    assert estimates["update"]["recover_seconds"] > estimates["baseline"]["recover_seconds"]
    assert record.details["policy"] == "smallest storage"
    assert repo.recover(v2).equal(changed)


def test_fastest_recovery_picks_baseline(tmp_path, models):
    repo = _repo(tmp_path, policy=FastestRecovery())
    v1 = repo.save(models)
    v2 = repo.save(fine_tune(models, [1], [], 0), approach="auto", base=v1)
    record = repo.version(v2)
    assert record.approach == "baseline" and "baseline recovers fastest" in record.reason


def test_smallest_under_a_time_bound_follows_the_chain_cost(tmp_path, models):
    # Each object costs 0.5 s to open: a baseline recovers in ~0.5 s, an update on it in ~1 s,
    # an update on that in ~1.5 s. Under 1.2 s, the chain may grow by one delta, then snapshots.
    repo = _repo(tmp_path, throughputs=SLOW_OPEN)
    policy = SmallestUnder(seconds=1.2)
    ids, kinds = [repo.save(models)], []
    current = models
    for cycle in range(3):
        current = fine_tune(current, [cycle], [], cycle)
        ids.append(repo.save(current, approach="auto", base=ids[-1], policy=policy))
        kinds.append(repo.version(ids[-1]).approach)
    assert kinds == ["update", "baseline", "update"]
    assert "of those recovering within 1.2 s" in repo.version(ids[1]).reason
    assert "baseline stores the least of those recovering within 1.2 s" in repo.version(ids[2]).reason
    assert repo.recover(ids[-1]).equal(current)


def test_when_nothing_meets_the_bound_the_fastest_is_taken(tmp_path, models):
    repo = _repo(tmp_path, throughputs=SLOW_OPEN)
    v1 = repo.save(models)
    v2 = repo.save(fine_tune(models, [1], [], 0), approach="auto", base=v1, policy=SmallestUnder(0.1))
    record = repo.version(v2)
    assert record.approach == "baseline" and "no approach recovers within 0.1 s" in record.reason


def test_the_snapshot_policy_still_applies_after_the_advisor(tmp_path, models):
    repo = _repo(tmp_path, snapshots=SnapshotPolicy(every=1))
    v1 = repo.save(models)
    v2 = repo.save(fine_tune(models, [1], [], 0), approach="update", base=v1)
    v3 = repo.save(fine_tune(models, [2], [], 1), approach="auto", base=v2)
    record = repo.version(v3)
    assert record.approach == "baseline"
    assert (
        record.reason.startswith("auto (smallest storage): update stores the least")
        and "then snapshot" in record.reason
    )


def test_compression_enters_the_estimates(tmp_path, models):
    raw = _repo(tmp_path / "raw")
    packed = _repo(tmp_path / "packed", compression="zstd")
    r1 = raw.version(raw.save(models, approach="auto"))
    p1 = packed.version(packed.save(models, approach="auto"))
    raw_estimate, packed_estimate = r1.details["estimates"]["baseline"], p1.details["estimates"]["baseline"]
    assert packed_estimate["stored_bytes"] < 0.95 * raw_estimate["stored_bytes"]
    assert packed_estimate["recover_seconds"] > raw_estimate["recover_seconds"]  # decoding costs time
    # The estimate of the bytes is close to what was stored.
    assert abs(packed_estimate["stored_bytes"] - p1.stored_bytes) < 0.1 * p1.stored_bytes


class _ProvenanceStandIn(Baseline):
    """A test-only approach that needs provenance: it shows that 'provenance available' is a
    real input to the decision (the real Provenance approach plugs in the same way)."""

    name = "provenance"
    takes_provenance = True

    def estimate(self, request, model):
        if request.provenance is None:
            return None
        return Estimate(stored_bytes=1_000, recover_seconds=3600.0)


def test_an_approach_that_needs_provenance_is_chosen_only_when_it_is_given(tmp_path, models, monkeypatch):
    monkeypatch.setitem(APPROACHES, "provenance", _ProvenanceStandIn())
    repo = _repo(tmp_path)
    v1 = repo.save(models)
    changed = fine_tune(models, [1], [], 0)
    v2 = repo.save(changed, approach="auto", base=v1)
    assert repo.version(v2).approach == "update" and "provenance unavailable" in repo.version(v2).reason
    v3 = repo.save(changed, approach="auto", base=v2, provenance={"data": "cells-2024"})
    assert repo.version(v3).approach == "provenance" and "provenance stores the least" in repo.version(v3).reason
    v4 = repo.save(changed, approach="auto", base=v2, provenance={"data": "cells-2024"}, policy=SmallestUnder(60))
    assert repo.version(v4).approach == "update"  # retraining takes an hour: too slow for 60 s


def test_bad_policies_and_throughputs_are_refused(tmp_path, models):
    repo = _repo(tmp_path)
    with pytest.raises(MMPackError, match="policy must be"):
        repo.save(models, approach="auto", policy="fast")
    with pytest.raises(MMPackError, match="positive number of seconds"):
        SmallestUnder(0)
    with pytest.raises(MMPackError, match="positive"):
        Throughputs(0, 1, 1)
    with pytest.raises(MMPackError, match="unknown approach 'automatic'"):
        repo.save(models, approach="automatic")


def test_measured_throughputs_are_plausible():
    measured = measured_throughputs()
    assert measured is measured_throughputs()  # once per process
    assert measured.read_bytes_per_s > 1e8 and measured.decode_bytes_per_s > 1e7
    assert 0 < measured.per_object_seconds < 0.1


def test_policies_choose_by_their_rule():
    estimates = {"a": Estimate(10, 5.0), "b": Estimate(90, 1.0), "c": Estimate(100, 0.5)}
    assert SmallestUnder(math.inf).choose(estimates)[0] == "a"
    assert SmallestUnder(2.0).choose(estimates)[0] == "b"
    assert SmallestUnder(0.1).choose(estimates)[0] == "c"
    assert FastestRecovery().choose(estimates)[0] == "c"
    assert mmpack.SmallestUnder(3).describe() == "smallest storage recovering within 3 s"

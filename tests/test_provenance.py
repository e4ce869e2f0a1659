"""The Provenance approach: tiny versions, verified retraining, executors, and every failure cause."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
import pytest

from mmpack import ModelSet, Provenance, ProvenanceError, ProvenanceMismatchError, Repository
from mmpack.approaches import provenance as provenance_approach
from mmpack.workloads import battery
from mmpack.workloads.battery import BatteryFleet, TrainingConfig

N_CELLS = 24
FINETUNE = "mmpack.workloads.battery:finetune"


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """v1 baseline, v2 provenance, v3 provenance on v2, v4 update on v3, v5 provenance on v4."""
    root = tmp_path_factory.mktemp("provenance")
    fleet = BatteryFleet(N_CELLS, root / "data", initial_steps=10, config=TrainingConfig(steps=8))
    sets = [fleet.initial_models()[0]]
    repo = Repository(root / "repo", fsync=False)
    ids = [repo.save(sets[0])]
    provenances = [None]
    for cycle in (1, 2):
        ms, prov = fleet.update_cycle(sets[-1], cycle, fraction=0.25)
        sets.append(ms)
        provenances.append(prov)
        ids.append(repo.save(ms, approach="provenance", base=ids[-1], provenance=prov))
    ms, _ = fleet.update_cycle(sets[-1], 3, fraction=0.25)
    sets.append(ms)
    provenances.append(None)
    ids.append(repo.save(ms, approach="update", base=ids[-1]))
    ms, prov = fleet.update_cycle(sets[-1], 4, fraction=0.25)
    sets.append(ms)
    provenances.append(prov)
    ids.append(repo.save(ms, approach="provenance", base=ids[-1], provenance=prov))
    return {"root": root, "repo": repo, "ids": ids, "sets": sets, "provenances": provenances, "fleet": fleet}


def test_provenance_versions_are_tiny_and_recorded(history):
    repo, ids = history["repo"], history["ids"]
    record = repo.version(ids[1])
    assert (record.approach, record.base) == ("provenance", ids[0])
    assert record.details["function"] == FINETUNE
    assert repo.storage_bytes(ids[1]) < 0.2 * repo.storage_bytes(ids[0])
    assert np.array_equal(repo.hashes(ids[2]), history["sets"][2].hashes())


@pytest.mark.parametrize("step", [1, 2, 3, 4])
def test_recovery_retrains_and_is_bit_exact(history, step):
    fresh = Repository(history["root"] / "repo")
    vid, expected = history["ids"][step], history["sets"][step]
    assert fresh.recover(vid, allow_import=True).equal(expected)
    assert fresh.recover(vid, allow_import=True, strategy="recursive").equal(expected)


def test_recovering_selected_models_retrains_only_those(history):
    calls = []

    def counting(models, datasets, kinds, config, model_ids):
        calls.append(list(model_ids))
        return battery.finetune(models, datasets, kinds, config, model_ids)

    provenance = history["provenances"][1]
    retrained = int(provenance.models()[1])
    untouched = next(i for i in range(N_CELLS) if i not in provenance.updates)
    fresh = Repository(history["root"] / "repo")
    got = fresh.recover(history["ids"][1], indices=[untouched, retrained], training={FINETUNE: counting})
    assert got.equal(history["sets"][1].select([untouched, retrained]))
    assert calls == [[retrained]]


def _spawning_pool() -> ProcessPoolExecutor:
    # Forking a process that has run torch's thread pool can deadlock the child: spawn.
    return ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"))


@pytest.mark.parametrize("make_executor", [lambda: ThreadPoolExecutor(2), _spawning_pool], ids=["threads", "processes"])
def test_results_are_bit_exact_whatever_the_executor(history, make_executor):
    with make_executor() as executor:
        fresh = Repository(history["root"] / "repo")
        assert fresh.recover(history["ids"][4], allow_import=True, executor=executor).equal(history["sets"][4])


def test_recovery_on_a_dask_cluster(history):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with distributed.Client(cluster) as client:
            fresh = Repository(history["root"] / "repo")
            got = fresh.recover(history["ids"][2], allow_import=True, executor=client.get_executor())
    assert got.equal(history["sets"][2])


def test_training_code_is_not_imported_without_consent(history):
    with pytest.raises(ProvenanceError, match="allow_import=True"):
        Repository(history["root"] / "repo").recover(history["ids"][1])


def test_saving_refuses_changed_models_without_provenance(history):
    fleet, repo = history["fleet"], history["repo"]
    ms, prov = fleet.update_cycle(history["sets"][0], 7, fraction=0.25)
    dropped = int(prov.models()[0])
    partial = Provenance(prov.function, prov.source_hash, prov.config,
                         {m: entry for m, entry in prov.updates.items() if m != dropped}, prov.environment)
    with pytest.raises(ProvenanceError, match=f"model {dropped} differs from base .* no provenance entry"):
        repo.save(ms, approach="provenance", base=history["ids"][0], provenance=partial)
    with pytest.raises(ProvenanceError, match="needs provenance="):
        repo.save(ms, approach="provenance", base=history["ids"][0])
    with pytest.raises(ProvenanceError, match="JSON"):
        Provenance(prov.function, prov.source_hash, {"bad": object()}, prov.updates)


@pytest.fixture
def isolated(history, tmp_path):
    """A fresh repository with one provenance version whose datasets this test may damage."""
    fleet = BatteryFleet(12, tmp_path / "data", initial_steps=5, config=TrainingConfig(steps=5))
    ms, _ = fleet.initial_models()
    repo = Repository(tmp_path / "repo", fsync=False)
    v1 = repo.save(ms)
    ms2, prov = fleet.update_cycle(ms, 1, fraction=0.5)
    v2 = repo.save(ms2, approach="provenance", base=v1, provenance=prov)
    return {"repo": repo, "v2": v2, "expected": ms2, "prov": prov, "root": tmp_path}


def test_a_changed_dataset_is_named(isolated):
    victim = int(isolated["prov"].models()[0])
    path = isolated["prov"].updates[victim][0].path
    data = np.load(path)
    data[0, 0] += 1
    np.save(path, data)
    with pytest.raises(ProvenanceMismatchError, match=f"model {victim}: dataset content hash differs"):
        Repository(isolated["root"] / "repo").recover(isolated["v2"], allow_import=True)
    report = Repository(isolated["root"] / "repo").verify(allow_import=True)
    assert not report.ok and "content hash differs" in str(report)


def test_a_missing_dataset_is_named(isolated):
    victim = int(isolated["prov"].models()[-1])
    os.unlink(isolated["prov"].updates[victim][0].path)
    with pytest.raises(ProvenanceMismatchError, match=f"model {victim}: dataset missing"):
        Repository(isolated["root"] / "repo").recover(isolated["v2"], indices=[victim], allow_import=True)


def _slightly_different(models, datasets, kinds, config, model_ids):
    """Training as it would come out on another machine: same code path, other rounding."""
    out = battery.finetune(models, datasets, kinds, config, model_ids)
    return ModelSet(
        out.architecture, {n: t + (t * 1e-7 if t.dtype.is_floating_point else 0) for n, t in out.tensors.items()}
    )


def test_a_changed_environment_is_named_as_the_likely_cause(isolated, monkeypatch):
    real = provenance_approach.Provenance.environment_differences
    monkeypatch.setattr(
        provenance_approach.Provenance, "environment_differences",
        lambda self, current=None: real(self, {**self.environment, "torch": "9.9.9"}),
    )
    with pytest.raises(ProvenanceMismatchError, match="environment differs.*torch: recorded .*, now '9.9.9'"):
        Repository(isolated["root"] / "repo").recover(isolated["v2"], training={FINETUNE: _slightly_different})


def test_a_changed_training_source_is_named_as_the_likely_cause(isolated, monkeypatch):
    monkeypatch.setattr(provenance_approach, "source_hash", lambda fn: "0" * 16)
    with pytest.raises(ProvenanceMismatchError, match="training function source changed"):
        Repository(isolated["root"] / "repo").recover(isolated["v2"], training={FINETUNE: _slightly_different})


def test_verify_without_retraining_says_so(isolated):
    report = Repository(isolated["root"] / "repo").verify()
    assert report.ok and report.not_retrained == [isolated["v2"]]
    assert "not retrained" in str(report)
    assert Repository(isolated["root"] / "repo").verify(allow_import=True).ok


def test_the_advisor_weighs_provenance_when_it_is_given(isolated):
    from mmpack import FastestRecovery, SmallestUnder

    repo, prov, expected = isolated["repo"], isolated["prov"], isolated["expected"]
    assert prov.training_seconds is not None and prov.training_seconds > 0
    smallest = repo.save(expected, approach="auto", base="v1", provenance=prov)
    assert repo.version(smallest).approach == "provenance"
    assert "provenance" in repo.version(smallest).reason
    quick = repo.save(
        expected,
        approach="auto",
        base="v1",
        provenance=prov,
        policy=SmallestUnder(seconds=1e-6 + prov.training_seconds / 1000),
    )
    assert repo.version(quick).approach in ("update", "baseline")
    fastest = repo.save(expected, approach="auto", base="v1", provenance=prov, policy=FastestRecovery())
    assert repo.version(fastest).approach != "provenance"
    without = repo.save(expected, approach="auto", base="v1")
    assert repo.version(without).approach == "update"
    assert repo.recover(smallest, allow_import=True).equal(expected)

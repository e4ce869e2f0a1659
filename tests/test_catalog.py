"""Repository format 2: the catalog (commits, checkpoints, HEAD), tags and their log, per-model
history, diffs, prune, gc of the catalog, upgrades from format 1, and metadata that grows with
the change, not with the set."""

from __future__ import annotations

import os
import shutil
import threading
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from golden_repositories import golden_history, golden_train
from golden_sets import GOLDEN_DIR
from helpers import ffnn_models
from test_repository import retrain

from mmpack import (
    InvalidArgumentError,
    MMPackError,
    ModelSet,
    Repository,
    RepositoryError,
    TagConflictError,
    VersionNotFoundError,
)
from mmpack.repository.catalog import format2

N = 16


def history_of(repo: Repository, cycles: int, n: int = N) -> list[ModelSet]:
    """v1 a Baseline, then ``cycles`` Updates, each retraining two models (one fully)."""
    sets = [ModelSet.from_modules(ffnn_models(n))]
    vid = repo.save(sets[0], message="initial")
    for cycle in range(cycles):
        sets.append(retrain(sets[-1], [cycle % n], [(cycle + 5) % n]))
        vid = repo.save(sets[-1], approach="update", base=vid, message=f"cycle {cycle + 1}")
    return sets


@pytest.fixture
def repo(tmp_path):
    return Repository(tmp_path / "repo", fsync=False)


# -- the catalog ------------------------------------------------------------------------------


def test_a_new_repository_is_format_2_and_reads_back_through_a_fresh_catalog(repo):
    sets = history_of(repo, 3)
    assert repo.format_version == 2
    fresh = Repository(repo.store.root)
    assert [r.id for r in fresh.versions()] == ["v1", "v2", "v3", "v4"]
    assert [r.message for r in fresh.versions()] == ["initial", "cycle 1", "cycle 2", "cycle 3"]
    for k, expected in enumerate(sets):
        assert fresh.recover(f"v{k + 1}").equal(expected)
    assert sorted(os.listdir(os.path.join(repo.store.root, "catalog", "log"))) == [
        f"{k:020d}.json" for k in range(1, 5)
    ]


def test_commits_past_a_checkpoint_are_read_from_it(repo):
    count = format2.CHECKPOINT_EVERY * 2 + 5
    sets = history_of(repo, count - 1, n=6)
    checkpoints = sorted(os.listdir(os.path.join(repo.store.root, "catalog", "checkpoints")))
    # 32 and 64: the writer that started checkpoint 64 removed what no reader needs (checkpoint 0,
    # commits 1-32), so the catalog's size does not grow with history.
    assert checkpoints == [f"{32:020d}.json", f"{64:020d}.json"]
    log = sorted(os.listdir(os.path.join(repo.store.root, "catalog", "log")))
    assert log[0] == f"{33:020d}.json" and len(log) == count - 32
    fresh = Repository(repo.store.root)
    assert len(fresh.versions()) == count
    assert fresh.catalog.state.checkpoint == 2 * format2.CHECKPOINT_EVERY
    assert fresh.recover(f"v{count}").equal(sets[-1])
    assert fresh.recover("v3").equal(sets[2])


def test_a_stale_or_missing_head_is_only_a_hint(repo):
    sets = history_of(repo, 2)
    head = os.path.join(repo.store.root, "catalog", "HEAD.json")
    with open(head, "rb") as f:
        old = f.read()
    repo.save(retrain(sets[-1], [1], []), approach="update", base="v3")
    with open(head, "wb") as f:
        f.write(old)  # a writer that died between its commit and HEAD
    assert Repository(repo.store.root).versions()[-1].id == "v4"
    os.unlink(head)
    assert Repository(repo.store.root).versions()[-1].id == "v4"


def test_two_catalogs_in_one_process_see_each_others_versions(tmp_path):
    a = Repository(tmp_path / "repo", fsync=False)
    b = Repository(tmp_path / "repo", fsync=False)
    sets = history_of(a, 1)
    assert b.recover("v2").equal(sets[1])  # b looks again when it does not know an id
    b.save(sets[1], approach="update", base="v2")
    assert a.versions()[-1].id == "v3" and a.version("v3").base == "v2"


def test_concurrent_writers_in_threads_get_distinct_versions(tmp_path):
    root = tmp_path / "repo"
    base = ModelSet.from_modules(ffnn_models(N))
    Repository(root, fsync=False).save(base)
    made: dict[str, ModelSet] = {}
    lock = threading.Lock()

    def work(seed: int) -> None:
        repo = Repository(root, fsync=False)
        for step in range(4):
            ms = retrain(base, [seed], [(seed + step) % N], step=0.01 * (step + 1))
            vid = repo.save(ms, approach="update", base="v1")
            with lock:
                made[vid] = ms

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    repo = Repository(root)
    assert sorted(made, key=lambda v: int(v[1:])) == [f"v{k}" for k in range(2, 18)]
    for vid, ms in made.items():
        assert repo.recover(vid).equal(ms)


# -- tags -------------------------------------------------------------------------------------


def test_tags_name_versions_everywhere_and_every_move_is_logged(repo):
    sets = history_of(repo, 3)
    repo.tag("production", "v2", message="first release")
    repo.tag("canary", "v4")
    assert repo.tags() == {"canary": "v4", "production": "v2"}
    assert repo.recover("production").equal(sets[1])
    assert repo.recover("canary", indices=[3]).equal(sets[3].select([3]))
    assert repo.version("production").id == "v2" and repo.verify("production").ok
    assert np.array_equal(repo.hashes("production"), sets[1].hashes())
    v5 = repo.save(sets[3], approach="update", base="canary")
    assert repo.version(v5).base == "v4"
    repo.tag("production", "v4", expected="v2", message="promoted")
    with pytest.raises(TagConflictError, match="on v4, not on v2"):
        repo.tag("production", "v3", expected="v2")
    repo.untag("canary")
    moves = [(m.name, m.before, m.after, m.message) for m in Repository(repo.store.root).tag_log()]
    assert moves == [("production", None, "v2", "first release"), ("canary", None, "v4", ""),
                     ("production", "v2", "v4", "promoted"), ("canary", "v4", None, "")]
    assert all(m.time.tzinfo is not None for m in repo.tag_log())
    assert Repository(repo.store.root).tags() == {"production": "v4"}
    assert [r.id for r in repo.versions()] == ["v1", "v2", "v3", "v4", "v5"]  # tags never change versions


@pytest.mark.parametrize("name", ["", "v12", "-x", ".x", "a b", "x" * 129, "tag/1", 7])
def test_bad_tag_names_are_refused(repo, name):
    history_of(repo, 0)
    with pytest.raises(InvalidArgumentError):
        repo.tag(name, "v1")
    assert repo.tags() == {}


def test_tags_on_missing_versions_and_missing_tags_are_not_found(repo):
    history_of(repo, 0)
    with pytest.raises(VersionNotFoundError):
        repo.tag("x", "v9")
    with pytest.raises(VersionNotFoundError):
        repo.untag("nothing")
    with pytest.raises(VersionNotFoundError, match="no version or tag 'prod'"):
        repo.recover("prod")


def test_concurrent_compare_and_swap_moves_never_lose_one(tmp_path):
    """Threads each move the tag one step forward, from where they read it: every successful move is
    in the log, in order, and no two moved it from the same place."""
    root = tmp_path / "repo"
    history_of(Repository(root, fsync=False), 3)
    Repository(root, fsync=False).tag("live", "v1")
    successes = []

    def work() -> None:
        repo = Repository(root, fsync=False)
        for _ in range(6):
            current = repo.tags()["live"]
            target = f"v{int(current[1:]) % 4 + 1}"
            try:
                repo.tag("live", target, expected=current)
                successes.append((current, target))
            except TagConflictError:
                pass

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log = Repository(root).tag_log()[1:]
    assert sorted(successes) == sorted((m.before, m.after) for m in log)
    assert all(a.after == b.before for a, b in zip(log, log[1:]))


def test_format_1_repositories_need_an_upgrade_for_tags_and_prune(tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(GOLDEN_DIR / "repo_format1", root)
    repo = Repository(root)
    assert repo.format_version == 1
    with pytest.raises(RepositoryError, match="upgrade"):
        repo.tag("production", "v1")
    with pytest.raises(RepositoryError, match="upgrade"):
        repo.prune(keep_last=1)


# -- upgrade ----------------------------------------------------------------------------------


def test_an_upgraded_format_1_repository_keeps_every_version(tmp_path, monkeypatch):
    root = tmp_path / "repo"
    shutil.copytree(GOLDEN_DIR / "repo_format1", root)
    monkeypatch.chdir(root)  # the provenance version's datasets are relative to it
    before = [(r.id, r.approach, r.base, r.message) for r in Repository(root).versions()]
    repo = Repository(root)
    assert repo.upgrade() and not repo.upgrade()
    fresh = Repository(root)
    assert fresh.format_version == 2
    assert [(r.id, r.approach, r.base, r.message) for r in fresh.versions()] == before
    training = {"golden_repositories:golden_train": golden_train}
    for k, expected in enumerate(golden_history()):
        assert fresh.recover(f"v{k + 1}", training=training).equal(expected)
    v6 = fresh.save(golden_history()[4], approach="update", base="v5")
    fresh.tag("production", v6)
    assert v6 == "v6" and Repository(root).recover("production").equal(golden_history()[4])
    assert Repository(root).verify(training=training).ok


# -- history and diffs --------------------------------------------------------------------------


def test_history_lists_the_versions_that_changed_a_model(repo):
    sets = history_of(repo, 6)
    names = sets[0].architecture.names
    changes = repo.history(5)
    # v1 created it; cycle 1 retrained model 0 fully and model 5 partially (fc3, fc4); cycle 6
    # retrained model 5 fully.
    assert [c.version for c in changes] == ["v1", "v2", "v7"]
    assert changes[0].tensors == names
    assert changes[1].tensors == tuple(n for n in names if n.startswith(("fc3", "fc4")))
    assert changes[2].tensors == names and changes[2].message == "cycle 6"
    assert [c.version for c in repo.history(15)] == ["v1"]
    with pytest.raises(InvalidArgumentError):
        repo.history(-1)


def test_a_full_version_saved_on_a_base_records_what_changed(tmp_path):
    from mmpack import SnapshotPolicy

    repo = Repository(tmp_path / "repo", fsync=False, snapshots=SnapshotPolicy(every=1))
    sets = history_of(repo, 2)
    assert [r.approach for r in repo.versions()] == ["baseline", "update", "baseline"]
    assert [c.version for c in repo.history(6)] == ["v1", "v3"]
    assert repo.recover("v3").equal(sets[2])


def test_diff_names_models_and_tensors_from_hashes(repo):
    sets = history_of(repo, 3)
    diff = repo.diff("v1", "v4")
    assert diff.models.tolist() == [0, 1, 2, 5, 6, 7]
    assert diff.tensors[0] == sets[0].architecture.names
    assert diff.pairs == 3 * 7 + 3 * 4
    assert len(repo.diff("v2", "v2")) == 0


def test_update_metadata_grows_with_the_change_not_with_the_set(tmp_path):
    """A version that changes one tensor of 20 models costs the same whatever the set's size."""
    added = {}
    for n in (100, 2000):
        repo = Repository(tmp_path / f"r{n}", fsync=False)
        ms = ModelSet.from_modules(ffnn_models(n))
        repo.save(ms)
        tensors = {name: t.clone() for name, t in ms.tensors.items()}
        tensors["fc4.weight"][:20] += 1.0
        vid = repo.save(ModelSet(ms.architecture, tensors), approach="update", base="v1")
        rows = 20 * ms.architecture.tensors[ms.architecture.index("fc4.weight")].nbytes
        added[n] = repo.storage_bytes(vid) - rows
    assert abs(added[100] - added[2000]) < 8  # the count of models is written in the record
    assert added[2000] < 16 * 1024


# -- prune and gc -------------------------------------------------------------------------------


def test_prune_keeps_what_is_named_and_kept_versions_recover_after_gc(repo):
    sets = history_of(repo, 8)
    repo.tag("production", "v4")
    dry = repo.prune(keep_last=2, dry_run=True)
    assert dry.dry_run and set(dry.deleted) == {"v1", "v2", "v3", "v5", "v6", "v7"}
    assert [r.id for r in repo.versions()] == [f"v{k}" for k in range(1, 10)]  # a dry run changes nothing
    report = repo.prune(keep_last=2, message="keep the last two and production")
    assert report.deleted == dry.deleted and set(report.rewritten) == {"v4", "v8", "v9"}
    assert report.freed_bytes > 0
    repo.gc(grace_seconds=0)
    fresh = Repository(repo.store.root)
    assert [r.id for r in fresh.versions()] == ["v4", "v8", "v9"]
    assert fresh.version("v4").approach == "baseline" and fresh.version("v8").base == "v4"
    assert fresh.version("v9").base == "v8"
    for vid in ("v4", "v8", "v9"):
        assert fresh.recover(vid).equal(sets[int(vid[1:]) - 1])
        assert fresh.recover(vid, strategy="recursive").equal(sets[int(vid[1:]) - 1])
    assert fresh.verify().ok
    assert fresh.tags() == {"production": "v4"}
    assert fresh.save(sets[-1], approach="update", base="v9") == "v10"  # ids are never reused
    referenced = {ref.key for r in fresh.versions() for ref in r.objects}
    assert set(fresh.store.list("objects/")) == referenced


def test_prune_by_date_and_untagged(repo):
    sets = history_of(repo, 3)
    cut = repo.version("v3").created
    repo.tag("old", "v1")
    report = repo.prune(newer_than=cut, keep_tagged=False)
    assert report.deleted == ("v1", "v2") and repo.tags() == {}
    assert [m.after for m in repo.tag_log()][-1] is None
    assert repo.recover("v4").equal(sets[3])


def test_prune_refuses_to_delete_everything_and_bad_arguments(repo):
    history_of(repo, 2)
    with pytest.raises(InvalidArgumentError, match="every version"):
        repo.prune(keep_last=0)
    with pytest.raises(InvalidArgumentError):
        repo.prune(keep_last=-1)
    with pytest.raises(InvalidArgumentError):
        repo.prune(newer_than=datetime.now())  # naive times are ambiguous
    with pytest.raises(VersionNotFoundError):
        repo.prune(keep=["v9"])
    assert repo.prune(newer_than=datetime.now(timezone.utc) - timedelta(days=1)).deleted == ()


def test_gc_compacts_the_catalog_log_a_writer_could_not(repo, monkeypatch):
    """Writers remove old catalog documents as they go; when that fails (here: every delete
    refused), gc removes them."""
    real_delete = type(repo.store).delete
    monkeypatch.setattr(type(repo.store), "delete", lambda self, key: (_ for _ in ()).throw(OSError(5, "EIO")))
    sets = history_of(repo, format2.CHECKPOINT_EVERY * 3, n=4)
    monkeypatch.setattr(type(repo.store), "delete", real_delete)
    log = os.path.join(repo.store.root, "catalog", "log")
    before = len(os.listdir(log))
    report = repo.gc(grace_seconds=0)
    assert report.catalog > 0 and len(os.listdir(log)) < before
    fresh = Repository(repo.store.root)
    assert len(fresh.versions()) == len(sets) and fresh.recover(f"v{len(sets)}").equal(sets[-1])


def test_plans_are_values(repo):
    history_of(repo, 2)
    plan = repo.plan("v3", [5, 0])
    assert plan.models.tolist() == [0, 5] and plan.order.tolist() == [1, 0]
    assert [r.version for r in plan.reads] == ["v2", "v1"]  # v3 changed models 1 and 6 only
    assert plan.pieces == 14 and "RecoveryPlan(v3, 2 models: 14 pieces" in repr(plan)


def test_a_damaged_catalog_is_a_typed_error(repo):
    history_of(repo, 2)
    for name in os.listdir(os.path.join(repo.store.root, "catalog", "log")):
        path = os.path.join(repo.store.root, "catalog", "log", name)
        with open(path, "r+b") as f:
            f.seek(5)
            f.write(b"#")
    os.unlink(os.path.join(repo.store.root, "catalog", "HEAD.json"))
    with pytest.raises(MMPackError, match="checksum"):
        Repository(repo.store.root).versions()
    report = Repository(repo.store.root).verify()
    assert not report.ok and "cannot list" in report.problems[0]

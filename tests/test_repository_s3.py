"""Repositories on S3 (moto's server on loopback, through s3fs): round trips of every approach,
range reads, request counts, verify and gc, killed saves and concurrent writers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from helpers import ffnn_models, mixed_models, randomized_cnns
from test_repository import retrain

from mmpack import ModelSet, Repository
from mmpack.store import FsspecStore
from mmpack.store.instrumented import instrument
from mmpack.store.publication import INTERNAL_PREFIX
from mmpack.store.remote_reader import READ_AHEAD

pytest.importorskip("s3fs")

DRIVER = os.path.join(os.path.dirname(__file__), "crash_driver.py")
sys.path.insert(0, os.path.dirname(__file__))
from crash_driver import models_for  # noqa: E402


def _repository(s3_server, url=None, **store_options) -> Repository:
    url = url or s3_server.url()
    if store_options:
        return Repository(store=FsspecStore(url, s3_server.storage_options, **store_options))
    return Repository(url, storage_options=s3_server.storage_options)


@pytest.mark.parametrize(
    "build", [lambda: ffnn_models(30), lambda: randomized_cnns(4), lambda: mixed_models(5)],
    ids=["ffnn48", "cnn-batchnorm", "fp16-bf16-fp64-int64"],
)
def test_every_approach_round_trips_bit_exactly(s3_server, build):
    repo = _repository(s3_server)
    sets = [ModelSet.from_modules(build())]
    ids = [repo.save(sets[0])]
    for step in range(2):
        sets.append(retrain(sets[-1], [step], [step + 2], prefixes=("fc", "conv", "w", "inner")))
        ids.append(repo.save(sets[-1], approach="update", base=ids[-1]))
    sets.append(sets[-1])
    ids.append(repo.save(sets[-1], approach="baseline"))
    assert [r.approach for r in repo.versions()] == ["baseline", "update", "update", "baseline"]
    fresh = Repository(repo.store.url, storage_options=s3_server.storage_options)
    last = len(sets[0]) - 1
    for vid, expected in zip(ids, sets):
        assert fresh.recover(vid).equal(expected)
        assert fresh.recover(vid, indices=[last, 0, last]).equal(expected.select([last, 0, last]))
        assert fresh.recover(vid, strategy="recursive").equal(expected)
        assert np.array_equal(fresh.hashes(vid), expected.hashes())
    report = fresh.verify()
    assert report.ok and report.objects == 4, str(report)


def test_recovering_one_model_fetches_only_its_ranges(s3_server):
    writer = _repository(s3_server)
    ms = ModelSet.from_modules(ffnn_models(300))
    vid = writer.save(ms)
    for step in range(2):
        ms = retrain(ms, list(range(step, 300, 7)), list(range(step + 3, 300, 11)))
        vid = writer.save(ms, approach="update", base=vid)
    reader = Repository(writer.store.url, storage_options=s3_server.storage_options)
    log = instrument(reader.store)
    assert reader.recover(vid, indices=[123]).equal(ms.select([123]))
    per_model = ms.architecture.nbytes_per_model + 8 * len(ms.architecture)
    # The catalog (HEAD, a listing of the commits after it, checkpoint 0), the head and tail of
    # each object the model's pieces come from, then its rows: no request fetches a whole object.
    assert log.bytes_received < 3 * READ_AHEAD + 3 * 4096 + 2 * per_model + 7 * 2 * 65536
    assert set(log.by_kind) == {"get_object", "list_objects_v2"} and log.by_kind["list_objects_v2"] == 1
    assert log.requests <= 25
    one = log.bytes_received
    log.reset()
    assert reader.recover(vid).equal(ms)
    assert log.bytes_received > 20 * one


def test_a_save_costs_the_same_few_requests_whatever_the_number_of_models(s3_server):
    counts = {}
    for n in (10, 300):
        repo = _repository(s3_server)
        ms = ModelSet.from_modules(ffnn_models(n))
        v1 = repo.save(ms)  # the first save also writes the architecture record
        log = instrument(repo.store)
        v2 = repo.save(retrain(ms, [1], [2]), approach="update", base=v1)
        update = dict(log.by_kind)
        log.reset()
        repo.save(ms)
        counts[n] = (update, dict(log.by_kind))
        assert repo.recover(v2).equal(retrain(ms, [1], [2]))
    assert counts[10] == counts[300]
    # the data object, the commit (a create-only PUT) and HEAD; no listing: the writer tries the
    # commit after the newest it knows, and lists only if another writer took that number
    assert counts[10] == ({"put_object": 3},) * 2


def test_verify_reports_damage_and_gc_removes_leftovers(s3_server):
    repo = _repository(s3_server)
    ms = ModelSet.from_modules(ffnn_models(20))
    v1 = repo.save(ms)
    v2 = repo.save(retrain(ms, [3], [4]), approach="update", base=v1)
    orphan = repo.objects.new_key()
    repo.store.put(orphan, b"left by a killed save")
    assert repo.gc().objects == 0  # younger than the grace period
    assert repo.gc(grace_seconds=0).objects == 1 and not repo.store.exists(orphan)
    assert repo.verify().ok

    key = repo.version(v2).objects[0].key
    damaged = bytearray(repo.store.get(key))
    damaged[-100] ^= 1  # inside the hash table
    repo.store.put(key, bytes(damaged))
    report = Repository(repo.store.url, storage_options=s3_server.storage_options).verify()
    assert [p.split(":")[0] for p in report.problems] == [v2]


# -- killed saves and concurrent writers, with real processes --------------------------------


LEASE = 1.0
# Writes with conditional PUTs: catalog checkpoint 0, the probe (2), marker, v1 object, v1 commit,
# HEAD, v2 object, v2 commit, HEAD. With claims, a claim comes before each key published once:
# checkpoint 0, claim, marker, v1 object, claim, v1 commit, HEAD, v2 object, claim, v2 commit, HEAD.
CRASHES = [
    "crash:conditional:3:after", "crash:conditional:5:during", "crash:conditional:6:before",
    "crash:conditional:6:after", "crash:conditional:99:after",  # 99: no kill, both versions saved
    f"crash:claims={LEASE}:6:after", f"crash:claims={LEASE}:7:after",  # a stale claim, with and without its key
]
SAVERS = [f"save:conditional:{seed}:3" for seed in range(3)]
# The maintenance after a history of five versions (crash_driver.py maintain): writes and deletes
# of two tag moves, a prune and a gc, killed at some of them (the local test kills at every one).
MAINTENANCE = [f"maintain:conditional:{n}:{phase}" for n, phase in
               ((1, "after"), (2, "during"), (4, "after"), (5, "before"), (7, "after"), (9, "after"), (12, "before"))]


@pytest.fixture(scope="module", autouse=True)
def forked(s3_server):
    """The crash scenarios and the concurrent savers, each a forked child of one driver process
    (see crash_driver.py), started with the module so that they run while its other tests do.
    Yields the driver's URL and a function that waits for the outcomes."""
    url = s3_server.url("forked")
    _repository(s3_server, f"{url}/shared").save(models_for(99, 0))  # v1, the savers' shared base
    env = dict(os.environ, MMPACK_TEST_STORAGE_OPTIONS=json.dumps(s3_server.storage_options))
    process = subprocess.Popen(
        [sys.executable, DRIVER, "remote", url, *CRASHES, *SAVERS, *MAINTENANCE],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    found: dict[str, dict] = {}

    def outcomes() -> dict[str, dict]:
        if not found:
            out, err = process.communicate(timeout=300)
            assert process.returncode == 0, err[-3000:]
            for line in out.splitlines():
                outcome = json.loads(line)
                assert outcome["status"] == 0, (outcome, err[-3000:])
                found[outcome["task"]] = outcome
            assert list(found) == CRASHES + SAVERS + MAINTENANCE
        return found

    yield url, outcomes
    if process.poll() is None:
        process.kill()
        process.communicate()


def _assert_consistent(repo: Repository) -> list[str]:
    """Every listed version verifies; gc then leaves only referenced objects and no claims."""
    report = repo.verify()
    assert report.ok, str(report)
    repo.gc(grace_seconds=0)
    referenced = {ref.key for record in repo.versions() for ref in record.objects}
    assert set(repo.store.list("objects/")) == referenced
    assert repo.store.fs.find(f"{repo.store.root}/{INTERNAL_PREFIX}") == []
    return [record.id for record in repo.versions()]


def _published(keys: list[str], phase: str) -> tuple[list[str], list[str]]:
    """Versions that must exist, and those that may, when the last of ``keys`` was interrupted
    (each commit of these saves publishes one version: commit n is version vn)."""
    commit = lambda k: k.startswith("catalog/log/")  # noqa: E731
    done = [k for k in keys[:-1] if commit(k)]
    last = [keys[-1]] if keys and commit(keys[-1]) else []
    must = done + (last if phase == "after" else [])
    may = must + (last if phase == "during" else [])
    names = lambda ks: [f"v{int(k[len('catalog/log/') : -len('.json')])}" for k in ks]  # noqa: E731
    return names(must), names(may)


def test_a_save_killed_at_any_write_leaves_a_consistent_repository(s3_server, forked):
    url, outcomes = forked
    found = outcomes()
    time.sleep(LEASE + 1.1)  # claims of killed writers expire (S3 times have whole seconds)
    for task in CRASHES:
        outcome = found[task]
        _, mode, n, phase = task.split(":")
        keys = outcome["lines"]
        assert outcome["signal"] == (signal.SIGKILL if int(n) <= len(keys) else 0), outcome
        location = f"{url}/crash-{mode.replace('=', '')}-{n}-{phase}"
        if mode == "conditional":
            repo = _repository(s3_server, location)
        else:
            repo = _repository(s3_server, location, conditional_writes=False, lease_seconds=LEASE)
        ids = _assert_consistent(repo)
        must, may = _published(keys, phase)
        assert ids in (must, may), outcome
        for step, vid in enumerate(ids):
            assert repo.recover(vid).equal(models_for(0, step))
        # The next writer is not blocked by what the killed one left (a claim delays it one lease at most).
        assert repo.save(models_for(0, 5)) == f"v{len(ids) + 1}"


def test_concurrent_processes_all_succeed_with_distinct_versions(s3_server, forked):
    url, outcomes = forked
    found = outcomes()
    lines = [line.split() for task in SAVERS for line in found[task]["lines"]]
    ids = [vid for vid, _, _ in lines]
    assert len(ids) == len(set(ids)) == 9
    repo = _repository(s3_server, f"{url}/shared")
    assert sorted(_assert_consistent(repo), key=lambda v: int(v[1:])) == sorted(["v1", *ids], key=lambda v: int(v[1:]))
    for vid, seed, step in lines:
        assert repo.recover(vid).equal(models_for(int(seed), int(step))), vid


def test_concurrent_writers_with_claims_all_succeed_with_distinct_versions(s3_server):
    url = s3_server.url("claims")
    ms = ModelSet.from_modules(ffnn_models(8))

    def writer(seed):
        repo = _repository(s3_server, url, conditional_writes=False)
        mine = retrain(ms, [seed], [])
        return [(repo.save(mine), seed) for _ in range(2)]

    with ThreadPoolExecutor(3) as pool:
        saved = [pair for result in pool.map(writer, range(3)) for pair in result]
    ids = [vid for vid, _ in saved]
    assert sorted(ids, key=lambda v: int(v[1:])) == [f"v{i}" for i in range(1, 7)]
    repo = _repository(s3_server, url, conditional_writes=False)
    for vid, seed in saved:
        assert repo.recover(vid).equal(retrain(ms, [seed], []))


def test_tag_prune_and_gc_killed_on_s3_leave_every_kept_version(s3_server, forked):
    url, outcomes = forked
    found = outcomes()
    for task in MAINTENANCE:
        outcome = found[task]
        assert outcome["signal"] == signal.SIGKILL, outcome
        _, mode, n, phase = task.split(":")
        repo = _repository(s3_server, f"{url}/maintain-{mode.replace('=', '')}-{n}-{phase}")
        ids = [r.id for r in repo.versions()]
        assert ids in (["v1", "v2", "v3", "v4", "v5"], ["v4", "v5"]), (task, ids)
        for vid in ids:
            assert repo.recover(vid).equal(models_for(0, int(vid[1:]) - 1)), (task, vid)
        assert repo.tags() in ({"production": "v3"}, {"production": "v5"}, {"production": "v5", "canary": "v4"})
        assert _assert_consistent(repo) == ids

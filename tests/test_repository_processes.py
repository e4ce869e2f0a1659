"""Crash safety and concurrent writers, with real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

import mmpack
from mmpack import _io

DRIVER = os.path.join(os.path.dirname(__file__), "crash_driver.py")
sys.path.insert(0, os.path.dirname(__file__))
from crash_driver import models_for  # noqa: E402


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, DRIVER, *args], capture_output=True, text=True, timeout=300)


def _assert_consistent(directory: str) -> list[str]:
    """Every listed version recovers and verifies; gc then leaves no leftovers."""
    repo = mmpack.Repository(directory, fsync=False)
    report = repo.verify()
    assert report.ok, str(report)
    repo.gc(grace_seconds=0)
    leftovers = [name for _, _, names in os.walk(directory) for name in names if _io.is_temporary_name(name)]
    assert leftovers == []
    referenced = {ref.key for record in repo.versions() for ref in record.objects}
    assert set(repo.store.list("objects/")) == referenced
    return [record.id for record in repo.versions()]


# Store writes of the driver's two saves: catalog checkpoint 0, marker, v1 object, v1 commit,
# HEAD, v2 object, v2 commit, HEAD. Killing at each, in each phase, covers every moment of a save.
CRASH_POINTS = [(n, phase) for n in range(1, 9) for phase in ("before", "during", "after")]
PUBLISHED_BY = (("v1", 4), ("v2", 7))  # the write whose completion makes each version exist


def test_a_save_killed_at_any_moment_leaves_a_consistent_repository(tmp_path):
    def scenario(point):
        n, phase = point
        directory = str(tmp_path / f"{n}-{phase}")
        result = _run("crash", directory, str(n), phase)
        return point, directory, result

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(scenario, CRASH_POINTS))
    for (n, phase), directory, result in outcomes:
        assert result.returncode == -signal.SIGKILL, (n, phase, result.stderr[-2000:])
        if not os.path.exists(os.path.join(directory, "repository.json")):
            assert n <= 2  # killed while creating the repository itself
            continue
        ids = _assert_consistent(directory)
        assert ids == _published_after(n, phase), (n, phase, ids)
        repo = mmpack.Repository(directory, fsync=False)
        for step, vid in enumerate(ids):
            assert repo.recover(vid).equal(models_for(0, step))


def _published_after(n: int, phase: str) -> list[str]:
    """Versions that exist when write n was interrupted in ``phase``."""
    return [vid for vid, write in PUBLISHED_BY if write < n or (write == n and phase == "after")]


def test_saves_killed_at_random_times_leave_a_consistent_repository(tmp_path):
    directory = str(tmp_path / "random")
    for delay in (0.3, 0.6, 0.9, 1.2, 1.5, 2.0):
        process = subprocess.Popen(
            [sys.executable, DRIVER, "save", directory, "3", "5"], stdout=subprocess.PIPE, text=True
        )
        try:
            process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        finally:
            process.stdout.close()
        if os.path.exists(os.path.join(directory, "repository.json")):
            _assert_consistent(directory)


def test_concurrent_writers_all_succeed_and_every_version_recovers(tmp_path):
    directory = str(tmp_path / "shared")
    repo = mmpack.Repository(directory, fsync=False)
    repo.save(models_for(99, 0))  # v1, the shared base
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda seed: _run("save", directory, str(seed), "4"), range(4)))
    lines = []
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
        lines += [line.split() for line in result.stdout.splitlines()]
    ids = [vid for vid, _, _ in lines]
    assert len(ids) == len(set(ids)) == 16
    assert sorted(_assert_consistent(directory), key=lambda v: int(v[1:])) == ["v1"] + sorted(
        ids, key=lambda v: int(v[1:])
    )
    fresh = mmpack.Repository(directory, fsync=False)
    for vid, seed, step in lines:
        assert fresh.recover(vid).equal(models_for(int(seed), int(step))), vid


MAINTENANCE_CALLS = 13  # store writes and deletes of crash_driver.py's maintenance (tag, tag, prune, gc)


def _maintenance_points(slow: bool) -> list[tuple[int, str]]:
    phases = ("before", "during", "after") if slow else ("after",)
    points = [(n, phase) for n in range(1, MAINTENANCE_CALLS + 1) for phase in phases]
    return points if slow else points + [(n, "before") for n in range(1, MAINTENANCE_CALLS + 1, 3)]


@pytest.mark.parametrize("slow", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["some", "every"])
def test_tag_prune_and_gc_killed_at_any_moment_leave_every_kept_version(tmp_path, slow):
    """Killed at each store write or delete of a tag move, a prune and a gc: the repository is
    either before or after each step, and every version it lists recovers bit-exactly."""
    complete = subprocess.run([sys.executable, DRIVER, "maintain", str(tmp_path / "whole"), "999", "after"],
                              capture_output=True, text=True, timeout=300)
    assert complete.stdout.split() == ["calls", str(MAINTENANCE_CALLS)], complete.stderr[-2000:]

    def scenario(point):
        n, phase = point
        directory = str(tmp_path / f"{n}-{phase}")
        return point, directory, _run("maintain", directory, str(n), phase)

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(scenario, _maintenance_points(slow)))
    for (n, phase), directory, result in outcomes:
        assert result.returncode == -signal.SIGKILL, (n, phase, result.stderr[-2000:])
        repo = mmpack.Repository(directory, fsync=False)
        ids = [r.id for r in repo.versions()]
        assert ids in (["v1", "v2", "v3", "v4", "v5"], ["v4", "v5"]), (n, phase, ids)
        for vid in ids:
            assert repo.recover(vid).equal(models_for(0, int(vid[1:]) - 1)), (n, phase, vid)
        tags = repo.tags()
        assert tags in ({"production": "v3"}, {"production": "v5"}, {"production": "v5", "canary": "v4"}), tags
        assert ids == ["v1", "v2", "v3", "v4", "v5"] or tags == {"production": "v5", "canary": "v4"}
        assert _assert_consistent(directory) == ids

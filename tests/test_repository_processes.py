"""Crash safety and concurrent writers, with real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

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
        process = subprocess.Popen([sys.executable, DRIVER, "save", directory, "3", "5"], stdout=subprocess.PIPE, text=True)
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
    assert sorted(_assert_consistent(directory), key=lambda v: int(v[1:])) == ["v1"] + sorted(ids, key=lambda v: int(v[1:]))
    fresh = mmpack.Repository(directory, fsync=False)
    for vid, seed, step in lines:
        assert fresh.recover(vid).equal(models_for(int(seed), int(step))), vid

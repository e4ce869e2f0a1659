"""Subprocess side of test_repository_faults.py: saves that run out of room for real.

    python full_disk_driver.py tmpfs MOUNT    MOUNT is an empty tmpfs (the test mounts one in a user
                                              namespace). Saves v1, then for a range of free space
                                              around what a compressed save needs, fills the disk to
                                              leave exactly that much, saves, and prints one JSON
                                              line per level.
    python full_disk_driver.py fsize DIR      saves v1 into a repository in DIR, then limits the size
                                              of any file this process writes (RLIMIT_FSIZE, SIGXFSZ
                                              ignored: writes past it are cut short, then fail) below
                                              the next version's object, and tries raw and compressed
                                              saves and a single-file save; prints one JSON line each
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import sys

import torch

import mmpack
from mmpack.workloads import ffnn48, make_models

torch.set_num_threads(1)
PAGE = 4096


def free_bytes(path: str) -> int:
    info = os.statvfs(path)
    return info.f_bavail * info.f_frsize


def snapshot(root: str) -> dict[str, int]:
    return {os.path.join(d, n): os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(root) for n in names}


def pages(n: int) -> int:
    return -(-n // PAGE)


def tmpfs(mount: str) -> None:
    base = mmpack.ModelSet.from_modules(make_models(ffnn48, 150, seed=0))
    changed = mmpack.ModelSet(base.architecture, {n: t + 0.25 for n, t in base.tensors.items()})
    small = mmpack.ModelSet(base.architecture, {n: t.clone() for n, t in base.tensors.items()})
    for t in small.tensors.values():
        t[3] += 1.0
    root = os.path.join(mount, "repo")
    repo = mmpack.Repository(root)
    v1 = repo.save(base)
    # What the compressed save of ``changed`` writes, measured by doing it once and removing it.
    scratch = mmpack.Repository(os.path.join(mount, "scratch"))
    vid = scratch.save(changed, compression="zstd")
    object_pages = pages(scratch.version(vid).objects[0].bytes)
    manifest_pages = pages(scratch.version(vid).manifest_bytes)
    shutil.rmtree(os.path.join(mount, "scratch"))
    filler = os.path.join(mount, "filler")
    near = range(object_pages - 3, object_pages + manifest_pages + 3)
    for free in sorted({object_pages // 2, object_pages - 32, object_pages - 16, object_pages - 8, *near}):
        with open(filler, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, free_bytes(mount) - free * PAGE)
        before, space = snapshot(root), free_bytes(mount)
        level = {"free_pages": free, "object_pages": object_pages}
        try:
            repo.save(changed, compression="zstd")
            level["saved"] = True
        except mmpack.MMPackError as exc:
            level.update(saved=False, type=type(exc).__name__, errno=getattr(exc, "errno", None), message=str(exc))
            level["unchanged"] = snapshot(root) == before
            level["space_back"] = free_bytes(mount) == space
            level["failed_at"] = (
                "manifest" if "catalog/log/" in str(exc) else "object" if "objects/" in str(exc) else "?"
            )
            if level["failed_at"] == "manifest":  # the case: the failed save's object must not hold the space
                level["next_small_save"] = bool(repo.save(small, approach="update", base=v1))
        os.unlink(filler)
        print(json.dumps(level), flush=True)
        if level["saved"]:
            break
    report = mmpack.Repository(root).verify()
    assert report.ok, str(report)
    assert repo.gc(grace_seconds=0).objects == 0


def fsize(directory: str) -> None:
    base = mmpack.ModelSet.from_modules(make_models(ffnn48, 150, seed=0))
    big = mmpack.ModelSet.from_modules(make_models(ffnn48, 150, seed=1))
    root = os.path.join(directory, "repo")
    repo = mmpack.Repository(root)
    repo.save(base)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limit = 2**20  # above any manifest, below the 3 MB object of every save below (v1 was written before)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    before = snapshot(root)
    for name, save in (
        ("raw", lambda: repo.save(big)),
        ("zstd", lambda: repo.save(big, compression="zstd")),
        ("update", lambda: repo.save(big, approach="update", base="v1")),
        ("file", lambda: mmpack.save(big, os.path.join(directory, "one.mmpack"))),
    ):
        outcome = {"save": name}
        try:
            save()
            outcome["saved"] = True
        except OSError as exc:
            outcome.update(saved=False, type=type(exc).__name__, errno=exc.errno, message=str(exc))
        outcome["unchanged"] = snapshot(root) == before and not os.path.exists(os.path.join(directory, "one.mmpack"))
        print(json.dumps(outcome), flush=True)
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    report = mmpack.Repository(root).verify()
    assert report.ok, str(report)


if __name__ == "__main__":
    {"tmpfs": tmpfs, "fsize": fsize}[sys.argv[1]](sys.argv[2])

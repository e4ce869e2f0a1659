"""Subprocess side of the crash and concurrency tests (test_repository_processes.py, test_repository_s3.py).

    python crash_driver.py crash DIR PUTS PHASE   save v1 (baseline) then v2 (update) into DIR, SIGKILLing
                                                  this process at store write number PUTS, PHASE being
                                                  'before' (nothing written), 'during' (half the bytes in
                                                  the temporary file) or 'after' (published, not returned)
    python crash_driver.py save DIR SEED COUNT    save COUNT versions of the models made from SEED: a
                                                  baseline, then updates on it, then one update on v1;
                                                  print one 'vid seed step' line per version
    python crash_driver.py remote URL TASK...    against an fsspec URL (storage options, as JSON, in
                                                  MMPACK_TEST_STORAGE_OPTIONS): build one S3 client, then
                                                  run every TASK at once, each in a forked child (one
                                                  interpreter start for all); print one JSON line per
                                                  task with its exit signal and output lines. TASK is
                                                  crash:MODE:N:PHASE (the crash scenario in URL/MODE-N-PHASE;
                                                  output: the keys of the writes begun; PHASE 'during'
                                                  kills the child while its PUT is in flight) or
                                                  save:MODE:SEED:COUNT (the save command on URL/shared).
                                                  MODE is 'conditional', or 'claims=LEASE' to publish
                                                  with claims
    python crash_driver.py maintain DIR N PHASE  save v1-v5 and tag v3 'production' (unharmed), then
                                                  move that tag, tag v4 'canary', prune to the last two
                                                  and the tagged, and gc, SIGKILLing this process at
                                                  store write or delete number N of those (PHASE as for
                                                  crash); print 'calls K' if it was not killed. The
                                                  remote TASK maintain:MODE:N:PHASE does the same in
                                                  URL/maintain-MODE-N-PHASE
    python crash_driver.py open LOCATION N START CALL
                                                  open LOCATION (a fresh path, or a URL with storage
                                                  options as for 'remote') from N forked children at
                                                  once, each starting within START seconds and
                                                  waiting up to CALL s before each store call; print
                                                  one JSON line: how many failed, and their errors
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback

import torch

import mmpack
from mmpack import _io
from mmpack.store import FsspecStore, local
from mmpack.workloads import ffnn48, make_models

torch.set_num_threads(1)


def models_for(seed: int, step: int) -> mmpack.ModelSet:
    """Deterministic models: seed picks the set, step perturbs a seed-dependent tenth of it."""
    base = mmpack.ModelSet.from_modules(make_models(ffnn48, 40, seed))
    tensors = {n: t.clone() for n, t in base.tensors.items()}
    for t in tensors.values():
        t[(seed + step) % 40 :: 10] += 0.5 * step
    return mmpack.ModelSet(base.architecture, tensors)


def crash(directory: str, kill_at: int, phase: str) -> None:
    calls = 0
    publish = _io.publish_atomically

    def dying_publish(path, write, **kwargs):
        nonlocal calls
        calls += 1
        if calls != kill_at:
            return publish(path, write, **kwargs)
        if phase == "before":
            os.kill(os.getpid(), signal.SIGKILL)

        def half_then_die(f):
            if phase == "during":
                write(_Half(f))
                os.kill(os.getpid(), signal.SIGKILL)
            write(f)

        publish(path, half_then_die, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)  # phase "after": published, the caller never learns it

    local._io = _PatchedIO(dying_publish)
    _two_saves(mmpack.Repository(directory))


def maintain(directory: str, kill_at: int, phase: str) -> None:
    repo = mmpack.Repository(directory)
    _history(repo)
    calls = 0
    publish, delete = _io.publish_atomically, local.LocalStore.delete

    def dying_publish(path, write, **kwargs):
        nonlocal calls
        calls += 1
        if calls != kill_at:
            return publish(path, write, **kwargs)
        if phase == "before":
            os.kill(os.getpid(), signal.SIGKILL)

        def half_then_die(f):
            if phase == "during":
                write(_Half(f))
                os.kill(os.getpid(), signal.SIGKILL)
            write(f)

        publish(path, half_then_die, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)

    def dying_delete(self, key):
        nonlocal calls
        calls += 1
        if calls == kill_at and phase != "after":
            os.kill(os.getpid(), signal.SIGKILL)
        delete(self, key)
        if calls == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    local._io = _PatchedIO(dying_publish)
    local.LocalStore.delete = dying_delete
    _maintenance(repo)
    print("calls", calls, flush=True)


def _history(repo: mmpack.Repository) -> None:
    vid = repo.save(models_for(0, 0))
    for step in range(1, 5):
        vid = repo.save(models_for(0, step), approach="update", base=vid)
    repo.tag("production", "v3")


def _maintenance(repo: mmpack.Repository) -> None:
    repo.tag("production", "v5", expected="v3", message="promoted")
    repo.tag("canary", "v4")
    repo.prune(keep_last=2)
    repo.gc(grace_seconds=0)


def _two_saves(repo: mmpack.Repository) -> None:
    v1 = repo.save(models_for(0, 0))
    repo.save(models_for(0, 1), approach="update", base=v1)


_storage_options: dict | None = None


def open_repository(location: str, mode: str = "conditional") -> mmpack.Repository:
    """A repository at a path, or at a URL whose storage options the environment holds."""
    if "MMPACK_TEST_STORAGE_OPTIONS" not in os.environ:
        return mmpack.Repository(location)
    options = _storage_options or json.loads(os.environ["MMPACK_TEST_STORAGE_OPTIONS"])
    if mode == "conditional":
        return mmpack.Repository(location, storage_options=options)
    lease = float(mode.removeprefix("claims="))
    return mmpack.Repository(store=FsspecStore(location, options, conditional_writes=False, lease_seconds=lease))


def remote(url: str, tasks: list[str]) -> None:
    # Building an S3 client loads botocore's service models (~0.5 s of CPU). The children share a
    # session that has loaded them once, here.
    from aiobotocore.session import AioSession

    global _storage_options
    _storage_options = {**json.loads(os.environ["MMPACK_TEST_STORAGE_OPTIONS"]), "session": AioSession()}
    FsspecStore(url, _storage_options).exists("warm-up")
    children = []
    for task in tasks:
        reading, writing = os.pipe()
        child = os.fork()
        if child == 0:
            os.close(reading)
            report = os.fdopen(writing, "w", buffering=1)
            kind, mode, *args = task.split(":")
            try:
                if kind in ("crash", "maintain"):
                    where = f"{url}/{kind}-{mode.replace('=', '')}-{args[0]}-{args[1]}"
                    _crash_remotely(where, mode, int(args[0]), args[1], report, kind == "maintain")
                else:
                    save(f"{url}/shared", int(args[0]), int(args[1]), mode, report)
                report.flush()
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        os.close(writing)
        children.append((task, child, os.fdopen(reading)))
    for task, child, pipe in children:
        with pipe:
            lines = pipe.read().splitlines()
        _, status = os.waitpid(child, 0)
        killed = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
        failed = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 0
        print(json.dumps({"task": task, "signal": killed, "status": failed, "lines": lines}), flush=True)


def _crash_remotely(location: str, mode: str, kill_at: int, phase: str, report, maintenance: bool = False) -> None:
    calls = 0
    write, remove = FsspecStore._write, FsspecStore._remove
    if maintenance:  # the history is made unharmed; the kill comes during the maintenance
        _history(open_repository(location, mode))

    def dying_write(self, path, content, **kwargs):
        nonlocal calls
        calls += 1
        report.write(path[len(self.root) + 1 :] + "\n")
        if calls != kill_at:
            return write(self, path, content, **kwargs)
        if phase == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        if phase == "during":  # the request is on its way when the process dies
            threading.Thread(target=write, args=(self, path, content), kwargs=kwargs, daemon=True).start()
            time.sleep(0.002)
            os.kill(os.getpid(), signal.SIGKILL)
        write(self, path, content, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)  # phase "after": written, the caller never learns it

    def dying_remove(self, path):
        nonlocal calls
        calls += 1
        report.write("delete " + path[len(self.root) + 1 :] + "\n")
        if calls == kill_at and phase != "after":
            os.kill(os.getpid(), signal.SIGKILL)
        remove(self, path)
        if calls == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    FsspecStore._write = dying_write
    if maintenance:
        FsspecStore._remove = dying_remove
        _maintenance(open_repository(location, mode))
    else:
        _two_saves(open_repository(location, mode))


def open_concurrently(location: str, n: int, start: float, call: float) -> None:
    import random

    from mmpack.store import open_store

    options = None
    if "MMPACK_TEST_STORAGE_OPTIONS" in os.environ:
        from aiobotocore.session import AioSession

        options = {**json.loads(os.environ["MMPACK_TEST_STORAGE_OPTIONS"]), "session": AioSession()}
        open_store(location, options).exists("warm-up")  # one S3 client, shared by the children
    go_read, go_write = os.pipe()
    ready_read, ready_write = os.pipe()
    children = []
    for _ in range(n):
        reading, writing = os.pipe()
        child = os.fork()
        if child == 0:
            os.close(go_write)
            store = open_store(location, options, fsync=False)
            store.exists("warm-up")  # a child's first request builds its connections: not part of the race
            os.write(ready_write, b".")
            os.read(go_read, 1)  # every child waits for the start, then takes its own time
            random.seed(os.getpid())
            time.sleep(random.uniform(0, start))
            try:
                mmpack.Repository(store=_Jittery(store, call))
                os.write(writing, b"ok")
            except BaseException as exc:
                os.write(writing, f"{type(exc).__name__}: {exc}".encode()[:4000])
            os._exit(0)
        os.close(writing)
        children.append((child, reading))
    os.close(go_read)
    for _ in range(n):
        os.read(ready_read, 1)
    os.close(go_write)  # start
    errors = []
    for child, reading in children:
        with os.fdopen(reading, "rb") as pipe:
            said = pipe.read().decode()
        os.waitpid(child, 0)
        if said != "ok":
            errors.append(said)
    print(json.dumps({"failed": len(errors), "errors": sorted(set(errors))}), flush=True)


class _Jittery:
    """A store that waits a random moment before each call: openers interleave in every order."""

    def __init__(self, store, most: float):
        self._store, self._most = store, most

    def __repr__(self) -> str:
        return repr(self._store)

    def __getattr__(self, name):
        import random

        attribute = getattr(self._store, name)
        if not callable(attribute):
            return attribute

        def call(*args, **kwargs):
            time.sleep(random.uniform(0, self._most))
            return attribute(*args, **kwargs)

        return call


class _Half:
    """A file that accepts the first half of what is written to it, then stops the process."""

    def __init__(self, f):
        self._f = f
        self._written = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self._written > 0:
            os.kill(os.getpid(), signal.SIGKILL)
        self._f.write(view[: max(1, len(view) // 2)])
        self._f.flush()
        self._written += 1
        return len(view)


class _PatchedIO:
    def __init__(self, publish):
        self.publish_atomically = publish

    def __getattr__(self, name):
        return getattr(_io, name)


def save(directory: str, seed: int, count: int, mode: str = "conditional", out=sys.stdout) -> None:
    repo = open_repository(directory, mode)
    vid = repo.save(models_for(seed, 0))
    print(vid, seed, 0, file=out, flush=True)
    for step in range(1, count - 1):
        vid = repo.save(models_for(seed, step), approach="update", base=vid)
        print(vid, seed, step, file=out, flush=True)
    shared = repo.save(models_for(seed, count), approach="update", base="v1")
    print(shared, seed, count, file=out, flush=True)


if __name__ == "__main__":
    command, directory, *rest = sys.argv[1:]
    if command == "crash":
        crash(directory, int(rest[0]), rest[1])
    elif command == "remote":
        remote(directory, rest)
    elif command == "maintain":
        maintain(directory, int(rest[0]), rest[1])
    elif command == "open":
        open_concurrently(directory, int(rest[0]), float(rest[1]), float(rest[2]))
    else:
        save(directory, int(rest[0]), int(rest[1]))

"""Saves behind the caller (``repo.save(..., blocking=False)``).

A non-blocking save is split where the caller's tensors stop mattering:

1. **Staging**, on the caller's thread: a private host copy of the set
   (:func:`stage`), a plain copy at memcpy speed into buffers reused from
   earlier saves. From then on the caller may change its tensors in place
   (an optimizer step) without touching the version.
2. **Hashing, writing and publishing**, on one worker thread per repository
   (:class:`Saver`), in the order the saves were submitted: a save whose base
   is a pending save runs after it, and fails with
   :class:`~mmpack.BaseSaveFailedError` if it failed.

Staging buffers come from a small pool (:class:`StagingPool`) and go back
when their save ends, so a loop that checkpoints every epoch copies into
memory it already touched. At most ``max_pending`` saves wait at once; a
further one waits for the oldest before staging, which bounds the memory
held by pending saves. A process killed with saves pending leaves only the
versions published before: publication is the last step of a save.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from mmpack import packing
from mmpack.architecture import Architecture
from mmpack.errors import BackgroundSaveError, BaseSaveFailedError
from mmpack.modelset import ModelSet
from mmpack.staging import is_host

U64 = np.uint64


class SaveFuture(Future):
    """The :class:`concurrent.futures.Future` of a non-blocking save (or of maintenance queued behind
    saves): its result is the version id. Asking for its result or exception marks its failure as
    seen; ``repo.close()`` raises :class:`~mmpack.BackgroundSaveError` for failures nobody saw."""

    def __init__(self) -> None:
        super().__init__()
        self._seen = False

    def result(self, timeout: float | None = None) -> Any:
        self._seen = True
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._seen = True
        return super().exception(timeout)

    def _outcome(self) -> tuple[Any, BaseException | None]:
        """(result, exception) of a finished future, without marking it seen."""
        exc = super().exception(0)
        return (None if exc is not None else super().result(0)), exc


@dataclass(eq=False)
class Job:
    """One queued call: ``run(job, base_id)`` on the worker. ``base`` is None, a version id, or the
    job of a save submitted before (its id is known once it has run)."""

    run: Callable[[Job, str | None], Any]
    base: str | Job | None = None
    models: ModelSet | Sequence[nn.Module] | None = None
    hashes: np.ndarray | None = None
    release: Callable[[], None] | None = None
    architecture: Architecture | None = None  # of the staged set (what a save built on this one checks)
    n_models: int = 0
    future: SaveFuture = field(default_factory=SaveFuture)


class Saver:
    """One worker thread running jobs in submission order (see the module's docstring)."""

    def __init__(self, max_pending: int) -> None:
        self._slots = threading.BoundedSemaphore(max_pending)
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._owned: weakref.WeakKeyDictionary[SaveFuture, Job] = weakref.WeakKeyDictionary()
        self._queued: set[SaveFuture] = set()
        self._failed: list[SaveFuture] = []  # kept until close() has reported those nobody saw

    def reserve(self) -> None:
        """Wait until fewer than ``max_pending`` jobs are queued and take a place; call before staging."""
        self._slots.acquire()

    def unreserve(self) -> None:
        """Give back a place taken by :meth:`reserve` when no job was submitted (staging failed)."""
        self._slots.release()

    def submit(self, job: Job) -> SaveFuture:
        """Queue ``job`` (its place reserved); its future."""
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="mmpack-save")
            self._owned[job.future] = job
            self._queued.add(job.future)
            self._executor.submit(self._work, job)
        return job.future

    def owns(self, future: object) -> bool:
        with self._lock:
            return isinstance(future, SaveFuture) and future in self._owned

    def base(self, future: SaveFuture) -> str | Job:
        """What a save naming ``future`` (one of this saver's) as its base builds on: the version id
        if it has been saved, else its job."""
        with self._lock:
            job = self._owned[future]
        if future.done():
            vid, failure = future._outcome()
            if failure is None:
                return vid
        return job

    @staticmethod
    def on_worker() -> bool:
        """Whether this thread is a saver's worker."""
        return threading.current_thread().name.startswith("mmpack-save")

    @property
    def pending(self) -> int:
        """Jobs queued and not finished; 0 on the worker itself (from a job or a future's callback,
        where waiting behind the queue would wait for oneself)."""
        if self.on_worker():
            return 0
        with self._lock:
            return len(self._queued)

    def _work(self, job: Job) -> None:
        result, failure = None, None
        try:
            base_id = job.base
            if isinstance(job.base, Job):
                base_id, failed = job.base.future._outcome()  # ran before this one: same worker, in order
                if failed is not None:
                    raise BaseSaveFailedError(f"the save this one builds on failed: {failed}") from failed
            result = job.run(job, base_id)
        except BaseException as exc:  # handed to whoever asks the future; close() reports it otherwise
            failure = exc
        # What the job held goes back first (its staged copy to the pool, its place in the queue), so
        # that whoever wakes on the future finds them free; it leaves the queue last, so wait() sees it.
        release = job.release
        with self._lock:
            job.models = job.hashes = job.release = None
            if failure is not None:
                self._failed.append(job.future)
        if release is not None:
            release()
        self._slots.release()
        if failure is not None:
            job.future.set_exception(failure)
        else:
            job.future.set_result(result)
        with self._lock:
            self._queued.discard(job.future)

    def wait(self) -> None:
        """Return once every job submitted so far has finished."""
        with self._lock:
            futures = list(self._queued)
        for future in futures:
            Future.exception(future)  # waits, without marking a failure seen

    def close(self) -> list[tuple[SaveFuture, BaseException]]:
        """Wait for every job and stop the worker (a later submit starts another); the failures
        nobody has seen, reported once."""
        self.wait()
        with self._lock:
            executor, self._executor = self._executor, None
            failed, self._failed = self._failed, []
        if executor is not None:
            executor.shutdown(wait=True)
        unseen = [(f, f._outcome()[1]) for f in failed if not f._seen]
        for future, _ in unseen:
            future._seen = True
        return unseen


def unseen_failures_error(failures: list[tuple[SaveFuture, BaseException]]) -> BackgroundSaveError:
    first = failures[0][1]
    error = BackgroundSaveError(
        f"{len(failures)} non-blocking save(s) failed and nobody asked their futures; the first: "
        f"{type(first).__name__}: {first}", failures,
    )
    error.__cause__ = first
    return error


# -- staging -------------------------------------------------------------------------------------


class StagingPool:
    """Host sets for staging, kept for the next save of the same shape (at most ``limit`` idle)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._idle: dict[tuple[str, int], list[dict[str, torch.Tensor]]] = {}
        self._lock = threading.Lock()

    def take(self, architecture: Architecture, n_models: int) -> tuple[dict[str, torch.Tensor], Callable[[], None]]:
        """Stacked host tensors for a set of this shape, and the function that gives them back."""
        key = (architecture.fingerprint(), n_models)
        with self._lock:
            idle = self._idle.get(key)
            tensors = idle.pop() if idle else None
        if tensors is None:
            tensors = {s.name: packing.empty_stacked(n_models, s) for s in architecture.tensors}

        def give_back() -> None:
            with self._lock:
                idle = self._idle.setdefault(key, [])
                if sum(map(len, self._idle.values())) < self._limit:
                    idle.append(tensors)

        return tensors, give_back

    def clear(self) -> None:
        with self._lock:
            self._idle.clear()


@dataclass
class Staged:
    """What a staged save holds: its private host copy, its hashes if the copy computed them, and
    how to give the buffers back."""

    models: ModelSet
    hashes: np.ndarray | None
    release: Callable[[], None] | None


def stage(models: ModelSet | Sequence[nn.Module], pool: StagingPool) -> Staged:
    """A private host copy of ``models`` (a ModelSet on any device, or modules), into buffers from
    ``pool``: modules are stacked (:meth:`ModelSet.from_modules`, a copy already); a set is copied
    as it is, at memcpy speed, and hashed later by the save (hashing in the same pass cost the
    caller about 1.4 memcpys, docs/DESIGN-NOTES.md)."""
    if not isinstance(models, ModelSet):
        if isinstance(models, nn.Module):
            raise TypeError("expected a ModelSet or a list of modules; wrap a single module as [module]")
        models = ModelSet.from_modules(models)  # a fresh copy already
        if is_host(models.device):
            return Staged(models, None, None)
    tensors, release = pool.take(models.architecture, len(models))
    try:
        if not is_host(models.device):
            models._download(None, tensors)  # through pinned buffers, chunk by chunk
        else:
            for spec in models.architecture.tensors:
                if spec.nbytes:
                    source, target = models.tensors[spec.name], tensors[spec.name]
                    packing.copy_bytes(packing.byte_view(source), packing.byte_view(target))
    except BaseException:
        release()
        raise
    return Staged(ModelSet._trusted(models.architecture, tensors, len(models)), None, release)

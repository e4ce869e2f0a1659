"""Checkpointer: a training loop's checkpoints in a repository, one call per epoch and one to resume."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import Future

import torch
from torch import nn

from mmpack.errors import BaseSaveFailedError, InvalidArgumentError
from mmpack.modelset import ModelSet
from mmpack.repository import Repository

__all__ = ["Checkpointer"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class Checkpointer:
    """Checkpointer(repo, every=1, approach="auto", keep_last=None, *, name="checkpoint", blocking=False,
    policy=None, gc_grace_seconds=3600.0)

    Checkpoints of a training loop, saved into ``repo`` every ``every``
    epochs by :meth:`step` and found again by :meth:`resume`:

    * **A chain of bases.** Each checkpoint is stored with ``approach``
      (``"auto"``: the repository's policy picks Baseline or Update per
      version, see ``Repository.save``) on the previous one, which may still be
      pending.
    * **Non-blocking.** With ``blocking=False`` (the default) the loop pays
      only for the staging copy; writing runs behind it, in order. A save
      that failed is raised by the next call (:meth:`step`, :meth:`wait` or
      :meth:`close`), and the chain restarts from the newest saved checkpoint.
    * **Retention.** With ``keep_last``, after each checkpoint the repository
      is pruned to its newest ``keep_last`` versions plus the tagged ones
      (tag a checkpoint to keep it: ``repo.tag("best", vid)``), then
      garbage-collected of objects older than ``gc_grace_seconds``; both run
      behind the saves. Needs repository format 2. Give the checkpointer a
      repository of its own: retention counts every version in it.
    * **Resuming.** Each version's message records the checkpointer's
      ``name`` and the epoch (``"checkpoint epoch 12"``); :meth:`resume` finds
      the newest such version, which is complete whatever happened to the
      process that saved it (``kill -9`` included), writes it into the
      loop's tensors and returns the epoch to continue from.

    Example::

        ckpt = mmpack.Checkpointer(mmpack.Repository("run.repo"), keep_last=3)
        start = ckpt.resume(out=ms)            # 0 on a fresh repository
        for epoch in range(start, epochs):
            train_one_epoch(ms)                # updates ms's tensors in place
            ckpt.step(epoch, ms)
        ckpt.close()                           # waits for the last saves
    """

    def __init__(
        self,
        repo: Repository,
        every: int = 1,
        approach: str = "auto",
        keep_last: int | None = None,
        *,
        name: str = "checkpoint",
        blocking: bool = False,
        policy=None,
        gc_grace_seconds: float = 3600.0,
    ) -> None:
        if not isinstance(repo, Repository):
            raise TypeError(f"repo must be a mmpack.Repository, not {type(repo).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise InvalidArgumentError(f"every must be a positive number of epochs, not {every!r}")
        if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
            raise InvalidArgumentError(f"keep_last must be a positive integer or None, not {keep_last!r}")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidArgumentError(f"name must be letters, digits, '.', '_' or '-' (at most 100), not {name!r}")
        grace_ok = isinstance(gc_grace_seconds, (int, float)) and math.isfinite(gc_grace_seconds)
        if not grace_ok or gc_grace_seconds < 0:
            raise InvalidArgumentError(f"gc_grace_seconds must be finite and at least 0, not {gc_grace_seconds!r}")
        if keep_last is not None and repo.format_version < 2:
            raise InvalidArgumentError("keep_last prunes, which needs repository format 2: run repo.upgrade() first")
        self.repo = repo
        self.every = every
        self.approach = approach
        self.keep_last = keep_last
        self.name = name
        self.blocking = blocking
        self.policy = policy
        self.gc_grace_seconds = float(gc_grace_seconds)
        self._message = re.compile(rf"{re.escape(name)} epoch (\d+)")
        self._base: str | Future | None = None  # what the next checkpoint is stored on
        self._saved: str | None = None  # the newest checkpoint known to be saved
        self._pending: list[Future] = []  # saves, prunes and gcs queued, in order
        self._reported: list[BaseException] = []
        self.restored: ModelSet | None = None

    # -- the loop ---------------------------------------------------------------------------------

    def latest(self) -> tuple[int, str] | None:
        """``(epoch, version id)`` of the newest checkpoint saved in the repository, or None."""
        for record in reversed(self.repo.versions()):
            found = self._message.fullmatch(record.message)
            if found is not None:
                return int(found.group(1)), record.id
        return None

    def resume(self, out: ModelSet | Mapping[str, torch.Tensor] | None = None, *,
               device: torch.device | str | None = None) -> int:
        """ckpt.resume(out) -> epoch to start from

        Write the newest checkpoint into ``out`` (the loop's :class:`ModelSet`
        or its stacked tensors, in place; see ``Repository.recover``) and
        return the epoch after it; 0, with ``out`` untouched, if the
        repository holds none. The next checkpoint builds on it. Without
        ``out``, :attr:`restored` holds the checkpoint as a new set (on
        ``device``).

        Example::

            start = ckpt.resume(out=ms)
        """
        self.wait()
        self.restored = None
        found = self.latest()
        if found is None:
            self._base = self._saved = None
            return 0
        epoch, vid = found
        recovered = self.repo.recover(vid, out=out, device=device)
        if out is None:
            self.restored = recovered
        self._base = self._saved = vid
        return epoch + 1

    def step(self, epoch: int, models: ModelSet | Sequence[nn.Module]) -> Future | str | None:
        """ckpt.step(epoch, models) -> Future of the version id (or the id, if blocking), or None

        Call once per epoch, after it: every ``every`` epochs (when
        ``(epoch + 1) % every == 0``) ``models`` are saved as that epoch's
        checkpoint. Raises the failure of an earlier save or retention, if
        one failed since the last call.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise InvalidArgumentError(f"epoch must be a non-negative integer, not {epoch!r}")
        self._raise_failures()
        if (epoch + 1) % self.every:
            return None
        return self.save(epoch, models)

    def save(self, epoch: int, models: ModelSet | Sequence[nn.Module]) -> Future | str:
        """Save ``models`` as the checkpoint of ``epoch`` now, whatever ``every`` says (after a
        fine-tuned subset was written back into the set, say)."""
        self._raise_failures()
        saved = self.repo.save(models, approach=self.approach, base=self._base, message=f"{self.name} epoch {epoch}",
                               policy=self.policy, blocking=self.blocking)
        self._base = saved
        if self.blocking:
            self._saved = saved
        else:
            self._pending.append(saved)
            saved.add_done_callback(self._on_saved)
        if self.keep_last is not None:
            self._retain()
        return saved

    def _on_saved(self, future: Future) -> None:
        if not future.cancelled() and Future.exception(future) is None:
            self._saved = Future.result(future)

    def _retain(self) -> None:
        pruned = self.repo.prune(keep_last=self.keep_last, blocking=self.blocking)
        collected = self.repo.gc(grace_seconds=self.gc_grace_seconds, blocking=self.blocking)
        if not self.blocking:
            self._pending += [pruned, collected]

    def _raise_failures(self) -> None:
        """Raise the first failure among the finished saves and retentions, in the order they were
        queued; saves that failed only because a reported one did are not raised again."""
        while self._pending and self._pending[0].done():
            failure = self._pending.pop(0).exception()
            if failure is None:
                continue
            root = failure
            while isinstance(root, BaseSaveFailedError) and root.__cause__ is not None:
                root = root.__cause__
            if any(root is seen for seen in self._reported):
                continue
            self._reported.append(root)
            # The chain goes on from the newest checkpoint that was saved, not from the failed one.
            self._base = self._saved
            raise failure

    def wait(self) -> None:
        """Wait for the pending checkpoints and their retention; raise the first failure."""
        for future in list(self._pending):
            Future.exception(future)
        self._raise_failures()

    def close(self) -> None:
        """:meth:`wait`. The repository stays open (its owner closes it)."""
        self.wait()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        if exc_type is None:
            self.wait()
        else:
            for future in list(self._pending):
                Future.exception(future)

"""A store wrapper that fails on command: the n-th call raises, before or after it took effect."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass

from mmpack.store import Store

WRITES = {"put", "put_if_absent"}


@dataclass(frozen=True)
class Fault:
    """Call number ``call`` (0-based, counted from :meth:`FaultyStore.arm`) fails with ``kind``.

    ``when="before"``: the call does nothing; ``"after"``: it takes effect and its answer is lost (an
    S3 response that never came, a ``link(2)`` that succeeded inside a call that then failed).
    ``persistent``: every later write fails the same way too (a disk that stays full).
    """

    call: int
    kind: str  # "ENOSPC", "EROFS", "EIO" or "vanished"
    when: str = "before"
    persistent: bool = False

    def error(self, key: str) -> OSError:
        if self.kind == "vanished":
            return FileNotFoundError(errno.ENOENT, "No such file or directory (injected)", key)
        code = getattr(errno, self.kind)
        return OSError(code, f"{os.strerror(code)} (injected)", key)


class FaultyStore(Store):
    """Every call of the store interface goes to ``inner``, except the one :class:`Fault` names.

    ``log`` records ``(method, key, outcome)`` per call: ``"ok"``, or the fault's ``when``.

    Example::

        store = FaultyStore(LocalStore(path))
        repo = mmpack.Repository(store=store)
        store.arm(Fault(3, "ENOSPC", persistent=True))
        repo.save(models)  # the fourth call and every write after it find the disk full
    """

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.remote = inner.remote
        self.fault: Fault | None = None
        self.calls = 0
        self.log: list[tuple[str, str, str]] = []

    def __repr__(self) -> str:
        return f"FaultyStore({self.inner!r})"

    def arm(self, fault: Fault | None) -> None:
        self.fault, self.calls, self.log = fault, 0, []

    def _run(self, method: str, key: str, action):
        number, self.calls = self.calls, self.calls + 1
        fault = self.fault
        failing = fault is not None and (
            number == fault.call or (fault.persistent and method in WRITES and number > fault.call)
        )
        if not failing:
            result = action()
            self.log.append((method, key, "ok"))
            return result
        if fault.when == "after":
            with contextlib.suppress(Exception):
                action()
        self.log.append((method, key, fault.when))
        raise fault.error(key)

    def get(self, key):
        return self._run("get", key, lambda: self.inner.get(key))

    @contextlib.contextmanager
    def open_reader(self, key) -> Iterator:
        stack = contextlib.ExitStack()
        reader = self._run("open_reader", key, lambda: stack.enter_context(self.inner.open_reader(key)))
        with stack:
            yield reader

    def put(self, key, data):
        return self._run("put", key, lambda: self.inner.put(key, data))

    def put_if_absent(self, key, data):
        return self._run("put_if_absent", key, lambda: self.inner.put_if_absent(key, data))

    def exists(self, key):
        return self._run("exists", key, lambda: self.inner.exists(key))

    def list(self, prefix):
        return self._run("list", prefix, lambda: self.inner.list(prefix))

    def size(self, key):
        return self._run("size", key, lambda: self.inner.size(key))

    def modified(self, key):
        return self._run("modified", key, lambda: self.inner.modified(key))

    def delete(self, key):
        return self._run("delete", key, lambda: self.inner.delete(key))

    def clean_temporaries(self, older_than):
        return self._run("clean_temporaries", "", lambda: self.inner.clean_temporaries(older_than))

    def get_range(self, key, offset, length):
        return self._run("get_range", key, lambda: self.inner.get_range(key, offset, length))

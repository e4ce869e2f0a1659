"""What a remote repository costs: count a store's requests and add network latency to each.

``instrument(store, latency=0.02)`` makes every request an
:class:`~mmpack.store.fsspec_store.FsspecStore` sends count in a
:class:`RequestLog`, and wait ``latency`` seconds first, as a round trip to
a distant server would. It answers "how many requests does saving or
recovering cost, and what does it take at 20 ms per request" against an
in-memory file system or a local S3 server, which the benchmarks
(``bench/store_latency.py``) and the request-count tests use.

On S3 file systems the hook sits below s3fs, on each HTTP request it
sends, so concurrent requests wait their latency concurrently, as they
would on a network. On other fsspec file systems it wraps the few calls the
store makes, each one request; ``cat_ranges`` counts one request per range,
and waits one latency per ``concurrency`` ranges (aiobotocore keeps 10
connections by default).
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from mmpack.store.fsspec_store import FsspecStore


@dataclass
class RequestLog:
    """Requests a store sent, by kind (``"get_object"``, ``"cat_ranges"``...), and payload bytes.

    Example::

        log = instrument(store)
        repo.recover("v3", indices=[7])
        print(log.requests, dict(log.by_kind), log.bytes_received)
    """

    requests: int = 0
    by_kind: Counter = field(default_factory=Counter)
    bytes_sent: int = 0
    bytes_received: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, kind: str, count: int = 1, sent: int = 0, received: int = 0) -> None:
        with self._lock:
            self.requests += count
            self.by_kind[kind] += count
            self.bytes_sent += sent
            self.bytes_received += received

    def reset(self) -> None:
        """Start counting from zero."""
        with self._lock:
            self.requests = self.bytes_sent = self.bytes_received = 0
            self.by_kind = Counter()


def instrument(store: FsspecStore, latency: float = 0.0, *, concurrency: int = 10) -> RequestLog:
    """instrument(store, latency=0.0) -> RequestLog

    Count every request ``store`` sends from now on, delaying each by
    ``latency`` seconds. Only this store is affected: it gets a file system
    object of its own (on S3 that builds a new client, ~0.5 s).

    Example::

        store = FsspecStore("memory://bench")
        log = instrument(store, latency=0.020)
        repo = mmpack.Repository(store=store)
        repo.save(models)
        print(log.requests)
    """
    if not isinstance(store, FsspecStore):
        raise TypeError(f"instrument() takes an FsspecStore, not {type(store).__name__}")
    if latency < 0 or concurrency < 1:
        raise ValueError("latency must be >= 0 and concurrency >= 1")
    log = RequestLog()
    if store._s3 is not None:
        # fsspec shares S3 file systems between equal options: hook a private one.
        store.fs = type(store.fs)(**store.fs.storage_options, skip_instance_cache=True)
        store._s3 = type(store._s3)(store.fs)
        _hook_s3(store.fs, log, latency)
    else:
        store.fs = _CountingFileSystem(store.fs, log, latency, concurrency)
    return log


def _hook_s3(fs: Any, log: RequestLog, latency: float) -> None:
    send = fs._call_s3

    async def counted(method: str, *args: Any, **kwargs: Any) -> Any:
        if latency:
            await asyncio.sleep(latency)
        body = kwargs.get("Body")
        sent = len(body) if hasattr(body, "__len__") else 0
        try:
            response = await send(method, *args, **kwargs)
        except BaseException:
            log.add(method, sent=sent)  # a refused request (404, 412) was still sent
            raise
        received = response.get("ContentLength", 0) if method == "get_object" and isinstance(response, dict) else 0
        log.add(method, sent=sent, received=received)
        return response

    fs._call_s3 = counted  # s3fs sends every request through this method


class _CountingFileSystem:
    """An fsspec file system whose calls count as requests and wait ``latency`` first."""

    def __init__(self, inner: Any, log: RequestLog, latency: float, concurrency: int) -> None:
        self._inner = inner
        self._log = log
        self._latency = latency
        self._concurrency = concurrency

    def __getattr__(self, name: str) -> Any:
        # Only the calls below are requests; anything else the store would call unaccounted.
        if name in {"protocol", "sep", "invalidate_cache", "_strip_protocol"}:
            return getattr(self._inner, name)
        raise AttributeError(f"the counting file system does not wrap {name!r}")

    def _wait(self, rounds: int = 1) -> None:
        if self._latency:
            time.sleep(self._latency * rounds)

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        self._wait()
        self._log.add("info")
        return self._inner.info(path, **kwargs)

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> Any:
        self._wait()
        self._log.add("ls")
        return self._inner.ls(path, detail=detail, **kwargs)

    def find(self, path: str, **kwargs: Any) -> Any:
        self._wait()
        self._log.add("find")
        return self._inner.find(path, **kwargs)

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        self._wait()
        self._log.add("cat_file")
        data = self._inner.cat_file(path, start=start, end=end, **kwargs)
        self._log.add("cat_file", 0, received=len(data))
        return data

    def cat_ranges(self, paths: list[str], starts: list[int], ends: list[int], **kwargs: Any) -> list[Any]:
        self._wait(math.ceil(len(paths) / self._concurrency))
        self._log.add("cat_ranges", len(paths))
        found = self._inner.cat_ranges(paths, starts, ends, **kwargs)
        self._log.add("cat_ranges", 0, received=sum(len(b) for b in found if isinstance(b, bytes)))
        return found

    def pipe_file(self, path: str, value: bytes, **kwargs: Any) -> None:
        self._wait()
        self._log.add("pipe_file", sent=len(value))
        self._inner.pipe_file(path, value, **kwargs)

    def rm_file(self, path: str) -> None:
        self._wait()
        self._log.add("rm_file")
        self._inner.rm_file(path)

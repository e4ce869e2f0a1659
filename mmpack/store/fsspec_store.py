"""Stores on object storage through fsspec: ``s3://bucket/prefix``, ``gcs://...``, ``memory://...``.

An object store offers whole-object PUTs (atomic: a reader sees the old
object or the new one), ranged GETs, and listings. That is all a repository
needs, plus one create-only write to publish a key exactly once. The store
itself is here; its companions, each with one job:

* ``filesystems``: which fsspec file system a URL names, with which options;
* ``publication``: creating a key exactly once (conditional PUTs, or claims);
* ``remote_reader``: range reads of one object, merged into few requests;
* ``s3``: the S3 requests fsspec's generic interface lacks.

fsspec is imported lazily: local repositories never need it.
"""

from __future__ import annotations

import contextlib
import errno
import io
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from mmpack.errors import IntegrityError, MMPackError, RepositoryError, StorageError
from mmpack.store import publication
from mmpack.store.base import CleanupReport, Data, SizedWriter, Store, Writer, check_key, storage_errors
from mmpack.store.filesystems import filesystem_for, is_s3, mtime
from mmpack.store.publication import INTERNAL_PREFIX
from mmpack.store.remote_reader import RemoteReader
from mmpack.store.s3 import Content, S3Client


class FsspecStore(Store):
    """FsspecStore(url, storage_options=None, *, conditional_writes=None, lease_seconds=60.0)

    Objects under an fsspec URL (``s3://bucket/prefix``; ``storage_options``
    go to the file system, e.g. ``{"endpoint_url": ...}`` or credentials).
    ``mmpack.Repository(url, storage_options=...)`` makes one for any URL
    that is not a local path.

    * ``put`` is one PUT of the whole object (objects over 5 GiB go up in
      parts; an interrupted upload is invisible and ``clean_temporaries``
      aborts it). Nothing is ever written in place.
    * ``put_if_absent`` is atomic and create-only. With
      ``conditional_writes=None`` the store probes once, at its first
      ``put_if_absent``, whether the server refuses a second create-only
      PUT of one key (S3 ``If-None-Match: *``), and uses it if so. Otherwise
      (any other file system, or ``conditional_writes=False``) it uses
      claims: correct when listings are strongly consistent and no writer
      stalls for more than ``lease_seconds`` between claiming a key and
      writing it. A writer killed while holding a claim delays the next
      write of that key by at most ``lease_seconds``. All writers of one
      repository must use the same method: leave the default.
    * Readers fetch only the byte ranges asked for, merged into few ranged
      GETs that run concurrently; ``buffer()`` is None.
    * Listings are always fetched fresh; fsspec's listing cache is off.

    Example::

        store = FsspecStore("s3://models/cells", {"endpoint_url": "http://127.0.0.1:9000"})
        repo = mmpack.Repository(store=store)
        # the same, shorter:
        repo = mmpack.Repository("s3://models/cells", storage_options={"endpoint_url": "http://127.0.0.1:9000"})
    """

    remote = True

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        *,
        conditional_writes: bool | None = None,
        lease_seconds: float = 60.0,
        filesystem: Any = None,
    ) -> None:
        if filesystem is None:
            self.fs, root = filesystem_for(url, storage_options)
        else:
            if storage_options:
                raise TypeError("pass storage_options or a filesystem, not both")
            self.fs, root = filesystem, filesystem._strip_protocol(url)
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        self.url = url
        self.root = root.rstrip("/")
        self.lease_seconds = float(lease_seconds)
        self._s3 = S3Client(self.fs) if is_s3(self.fs) else None
        if self._s3 is not None and not self.root.strip("/"):
            raise MMPackError(f"{url!r} names no bucket: S3 repositories live at s3://bucket/prefix")
        if conditional_writes and self._s3 is None:
            raise MMPackError(
                f"conditional writes are implemented for S3 only; {url!r} uses claims (conditional_writes=None)"
            )
        self._conditional = conditional_writes
        self._probe_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"FsspecStore({self.url!r})"

    def __getstate__(self) -> dict[str, Any]:
        # Pickles to workers of a cluster: the file system pickles by its options (fsspec), the
        # lock and the S3 client are made again there; the probe's answer travels along.
        state = dict(self.__dict__)
        del state["_probe_lock"], state["_s3"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._probe_lock = threading.Lock()
        self._s3 = S3Client(self.fs) if is_s3(self.fs) else None

    @property
    def conditional_writes(self) -> bool:
        """Whether ``put_if_absent`` uses the server's create-only PUT (probing it on first use)."""
        if self._conditional is None:
            with self._probe_lock:
                if self._conditional is None:
                    self._conditional = publication.probe_conditional_writes(self)
        return self._conditional

    def _path(self, key: str) -> str:
        return f"{self.root}/{check_key(key)}"

    # -- the store interface ----------------------------------------------------

    def get(self, key: str) -> bytes:
        return self._read(self._path(key))

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        data = self._read(self._path(key), offset, offset + length)
        if len(data) != length:
            raise IntegrityError(f"{key} ends inside the range of {length} bytes at offset {offset}")
        return data

    @contextlib.contextmanager
    def open_reader(self, key: str) -> Iterator[RemoteReader]:
        yield RemoteReader(self, self._path(key))

    def put(self, key: str, data: Data | Writer) -> None:
        self._write(self._path(key), _materialize(data))

    def put_if_absent(self, key: str, data: Data) -> bool:
        path, content = self._path(key), _materialize(data)
        if self.conditional_writes:
            return publication.create_conditionally(self, path, content)
        return publication.create_with_claim(self, key, path, content)

    def exists(self, key: str) -> bool:
        try:
            return self._info(self._path(key))["type"] == "file"
        except FileNotFoundError:
            return False

    def list(self, prefix: str) -> list[str]:
        folder = prefix.strip("/")
        if folder:
            check_key(folder)
        base = f"{self.root}/{folder}" if folder else self.root
        start = len(self.root) + 1
        keys = (info["name"][start:] for info in self._list_files(base))
        return sorted(k for k in keys if not k.rsplit("/", 1)[-1].startswith("."))

    def list_after(self, prefix: str, after: str) -> list[str]:
        if self._s3 is None:
            return super().list_after(prefix, after)
        # S3 starts a listing at a key: a catalog lists the few commits after the one it knows,
        # in one request however long the log.
        folder = prefix.strip("/")
        check_key(folder)
        base = f"{self.root}/{folder}/"
        with self._errors("list", base):
            return self._s3.keys_after(base, f"{self.root}/{check_key(after)}", len(self.root) + 1)

    def size(self, key: str) -> int:
        return int(self._file_info(key)["size"])

    def modified(self, key: str) -> float:
        return mtime(self._file_info(key))

    def delete(self, key: str) -> None:
        self._remove(self._path(key))

    def clean_temporaries(self, older_than: float) -> CleanupReport:
        """Remove claims and probes left by killed writers, and abort multipart uploads they began.

        Claims younger than the lease are kept whatever ``older_than`` says:
        removing a live claim would let a second writer in. Aborted uploads
        count as removed but not in ``bytes`` (S3 does not list their size).
        """
        now = time.time()
        cutoff = now - max(older_than, self.lease_seconds)
        removed = size = 0
        internal = f"{self.root}/{INTERNAL_PREFIX}"
        with self._errors("list", internal):
            try:
                found = self.fs.find(internal, detail=True)
            except FileNotFoundError:
                found = {}
        for path, info in found.items():
            if info.get("type") == "file" and mtime(info) < cutoff:
                self._remove(path)
                removed += 1
                size += int(info.get("size") or 0)
        if self._s3 is not None:
            with self._errors("abort the unfinished uploads under", self.root):
                removed += self._s3.abort_uploads(self.root, now - older_than)
        return CleanupReport(removed, size)

    # -- requests: every byte moves through these ------------------------------------

    def _errors(self, verb: str, path: str, passing: tuple[type[BaseException], ...] = ()):
        """Failures of a request about ``path`` as :class:`~mmpack.StorageError` (the client's own too)."""
        inside = path.startswith(self.root + "/")
        key = path[len(self.root) + 1 :] if inside else path
        where = f"{self.url.rstrip('/')}/{key}" if inside else path
        return storage_errors(self, f"{verb} {key}", where, foreign=True, passing=passing)

    def _write(self, path: str, content: Content, *, create: bool = False, token: str | None = None) -> None:
        """One PUT (create-only with ``create``, which S3 signals with FileExistsError)."""
        try:
            with self._errors("write", path, passing=(FileExistsError, FileNotFoundError)):
                self._put(path, content, create=create, token=token)
        except FileNotFoundError as exc:
            raise RepositoryError(f"cannot write to {self.url}: {exc} (does the bucket exist?)") from None

    def _put(self, path: str, content: Content, *, create: bool = False, token: str | None = None) -> None:
        if self._s3 is not None:
            self._s3.put(path, content, create=create, token=token)
        else:
            self.fs.pipe_file(path, content if isinstance(content, bytes) else memoryview(content))

    def _read(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        with self._errors("read", path):
            if self._s3 is not None and start is None:
                return self._s3.get(path)
            return self.fs.cat_file(path, start=start, end=end)

    def _read_head(self, path: str, length: int) -> tuple[bytes, int | None]:
        """The first ``length`` bytes (fewer if the object is shorter) and, if known, the size."""
        if self._s3 is not None:
            with self._errors("read", path):
                return self._s3.head(path, length)
        # The size comes from a second request, sent alongside rather than after: one round trip.
        with ThreadPoolExecutor(1) as pool:
            size = pool.submit(self._info, path)
            data = self._read(path, 0, length)
            return data, int(size.result()["size"])

    def _read_ranges(self, path: str, starts: list[int], ends: list[int]) -> list[bytes]:
        """Several ranges of one object, fetched concurrently where the file system can."""
        with self._errors("read", path):
            found = self.fs.cat_ranges([path] * len(starts), starts, ends)
            for item in found:
                if isinstance(item, BaseException):
                    raise item
            return found

    def _info(self, path: str) -> dict[str, Any]:
        with self._errors("look up", path):
            self.fs.invalidate_cache(path)
            return self.fs.info(path)

    def _file_info(self, key: str) -> dict[str, Any]:
        info = self._info(self._path(key))
        if info["type"] != "file":
            raise StorageError.wrap(FileNotFoundError(errno.ENOENT, "not an object"), f"look up {key}", repr(self))
        return info

    def _list_files(self, folder: str) -> list[dict[str, Any]]:
        """Files directly in ``folder``, listed afresh (never from a cache)."""
        with self._errors("list", folder):
            self.fs.invalidate_cache(folder)
            try:
                entries = self.fs.ls(folder, detail=True)
            except FileNotFoundError:
                return []
        prefix = folder + "/"
        return [e for e in entries if e.get("type") == "file" and e["name"].startswith(prefix)]

    def _remove(self, path: str) -> None:
        with self._errors("delete", path), contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(path)


def _materialize(data: Data | Writer) -> Content:
    """The object's bytes in one piece (a PUT needs its length up front), copied at most once."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    if not callable(data):
        return np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    collected = _Collector(data.size if isinstance(data, SizedWriter) else 2**20)
    data(collected)
    return collected.result()


class _Collector(io.RawIOBase):
    """A write-only stream that gathers what a writer writes in numpy memory.

    Not io.BytesIO: its buffer grows by reallocation in memory the kernel
    backs with small pages, and first-touching 100 MB of those costs ~0.2 s
    on the development VM; large numpy arrays get huge pages (see
    DESIGN-NOTES, "Memory from numpy").
    """

    def __init__(self, first: int) -> None:
        super().__init__()
        self._first = max(first, 1)  # a writer of known size fills exactly one chunk: no concatenation
        self._chunks: list[np.ndarray] = []
        self._used = 0  # bytes used in the last chunk

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
        written = len(view)
        while len(view):
            if not self._chunks or self._used == len(self._chunks[-1]):
                grown = 2 * len(self._chunks[-1]) if self._chunks else self._first
                self._chunks.append(np.empty(max(grown, len(view)), dtype=np.uint8))
                self._used = 0
            chunk = self._chunks[-1]
            n = min(len(view), len(chunk) - self._used)
            chunk[self._used : self._used + n] = view[:n]
            self._used += n
            view = view[n:]
        return written

    def result(self) -> np.ndarray:
        if not self._chunks:
            return np.empty(0, dtype=np.uint8)
        parts = [*self._chunks[:-1], self._chunks[-1][: self._used]]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)



"""Stores on object storage through fsspec: ``s3://bucket/prefix``, ``gcs://...``, ``memory://...``.

An object store offers whole-object PUTs (atomic: a reader sees the old
object or the new one), ranged GETs, and listings. That is all a repository
needs, plus one create-only write to publish a version id exactly once
(``put_if_absent``), which this module provides two ways:

* **Conditional PUT** (S3's ``If-None-Match: *``; AWS, MinIO, Ceph, R2 and
  moto honour it): the server creates the object only if the key is free,
  atomically. One request.
* **Claims** (the fallback for file systems without conditional writes): the
  writer PUTs a unique claim object beside the key, lists the claims, and
  writes the key only if its claim is the only live one and the key is
  still absent. Correct on any store whose listings are strongly consistent
  (S3, GCS, Azure, memory), as long as no writer stalls for longer than the
  lease between its claim and its write. Five or six requests.

See ``docs/DESIGN-NOTES.md`` ("Repositories on object storage") for the
exact guarantees. fsspec is imported lazily: local repositories never need it.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import random
import secrets
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import numpy as np

from mmpack import _io, _native
from mmpack.errors import IntegrityError, MissingDependencyError, MMPackError, RepositoryError, StorageError
from mmpack.store.base import CleanupReport, Data, SizedWriter, Store, Writer, check_key, storage_errors

U64 = np.uint64

INTERNAL_PREFIX = "_mmpack"  # claims and probes; never listed, removed by clean_temporaries
READ_AHEAD = 64 * 1024  # the first read of an object fetches this much: preamble and header in one GET
MAX_GAP = 64 * 1024  # wanted ranges closer than this are fetched as one (at 1 Gb/s the gap costs 0.5 ms)
MAX_RANGE = 16 * 2**20  # larger ranges are split so their parts download in parallel
SINGLE_PUT_LIMIT = 5 * 2**30  # S3's limit for one PUT; larger objects go up in parts
_WRITER_TOKEN = "mmpack-writer"  # object metadata naming the put_if_absent call that created a key
_CONFLICT_CODES = {"ConditionalRequestConflict", "OperationAborted"}
_MAX_ATTEMPTS = 200

Content = bytes | np.ndarray  # what a PUT sends: small documents as bytes, objects as uint8 arrays


def _filesystem_for(url: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    """The fsspec file system and root path of ``url``; a missing backend names what to install."""
    protocol = url.split("://", 1)[0].split("::", 1)[0]
    hint = _install_hint(protocol)
    try:
        import fsspec
    except ImportError:
        raise MissingDependencyError(f"repositories at {url!r} need fsspec: {hint}") from None
    # Listings are never cached: a stale listing would hide a version or a claim. fsspec shares
    # file system instances with equal options (so a client is built once per process, which
    # costs ~0.5 s on S3); the option is part of that key, so every shared instance has it too.
    options = {**(storage_options or {}), "use_listings_cache": False}
    try:
        fs, root = fsspec.url_to_fs(url, **options)
    except ImportError as exc:
        raise MissingDependencyError(f"repositories at {url!r} need an extra package: {hint} ({exc})") from None
    except ValueError as exc:
        raise MMPackError(f"cannot open {url!r}: {exc}") from None
    return fs, root


def _install_hint(protocol: str) -> str:
    if protocol in {"s3", "s3a"}:
        return 'pip install "mmpack[s3]" (it installs s3fs)'
    return f"install the fsspec backend for {protocol!r} (see fsspec's list of implementations)"


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
            self.fs, root = _filesystem_for(url, storage_options)
        else:
            if storage_options:
                raise TypeError("pass storage_options or a filesystem, not both")
            self.fs, root = filesystem, filesystem._strip_protocol(url)
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        self.url = url
        self.root = root.rstrip("/")
        self.lease_seconds = float(lease_seconds)
        self._s3 = _S3(self.fs) if _is_s3(self.fs) else None
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

    @property
    def conditional_writes(self) -> bool:
        """Whether ``put_if_absent`` uses the server's create-only PUT (probing it on first use)."""
        if self._conditional is None:
            with self._probe_lock:
                if self._conditional is None:
                    self._conditional = self._probe_conditional_writes()
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
            return self._create_conditionally(path, content)
        return self._create_with_claim(key, path, content)

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
        return _mtime(self._file_info(key))

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
            if info.get("type") == "file" and _mtime(info) < cutoff:
                self._remove(path)
                removed += 1
                size += int(info.get("size") or 0)
        if self._s3 is not None:
            with self._errors("abort the unfinished uploads under", self.root):
                removed += self._s3.abort_uploads(self.root, now - older_than)
        return CleanupReport(removed, size)

    # -- publishing a key exactly once ----------------------------------------------

    def _create_conditionally(self, path: str, content: Content) -> bool:
        token = secrets.token_hex(10)
        for attempt in range(_MAX_ATTEMPTS):
            try:
                self._write(path, content, create=True, token=token)
                return True
            except FileExistsError:
                # A request retried after its first attempt succeeded also ends here; the token
                # it wrote tells it from another writer's object.
                with self._errors("read the metadata of", path):
                    return self._s3.writer_token(path) == token
            except OSError as exc:
                if _error_code(exc) not in _CONFLICT_CODES:
                    raise
                _backoff(attempt)  # two conditional PUTs of one key in flight: S3 asks to retry
        raise RepositoryError(f"could not create {path}: the store kept reporting conflicting writes")

    def _create_with_claim(self, key: str, path: str, content: Content) -> bool:
        claims = f"{self.root}/{INTERNAL_PREFIX}/claims/{key}"
        patience = 3 * self.lease_seconds + 30  # outlasts any claim a killed writer left
        deadline = time.monotonic() + patience
        attempt = 0
        while time.monotonic() < deadline:
            mine = f"{claims}/{secrets.token_hex(10)}"
            started = time.monotonic()
            self._write(mine, json.dumps({"pid": os.getpid(), "time": time.time()}).encode())
            try:
                times = {info["name"]: _mtime(info) for info in self._list_files(claims)}
                if mine not in times:
                    raise RepositoryError(
                        f"{self.url} did not list a claim just written: its listings are not strongly "
                        "consistent, so keys cannot be published safely without conditional writes"
                    )
                stale = [n for n, t in times.items() if n != mine and times[mine] - t > self.lease_seconds]
                for name in stale:  # left by a killed writer: ignored, and removed on the way
                    self._remove(name)
                alone = len(times) - len(stale) == 1
                if alone:
                    if self.exists(key):
                        return False
                    # Past half the lease, another writer may already treat this claim as stale.
                    if time.monotonic() - started < self.lease_seconds / 2:
                        self._write(path, content)
                        return True
            finally:
                self._remove(mine)
            _backoff(attempt)
            attempt += 1
        raise RepositoryError(f"could not publish {key} within {patience:.0f} s: other writers kept claiming it")

    def _probe_conditional_writes(self) -> bool:
        """Whether the server refuses a second create-only PUT of one key (some S3 look-alikes
        ignore ``If-None-Match`` and would silently overwrite)."""
        if self._s3 is None:
            return False
        probe = f"{self.root}/{INTERNAL_PREFIX}/probes/{secrets.token_hex(10)}"
        try:
            self._put(probe, b"", create=True)
            try:
                self._put(probe, b"", create=True)
            except FileExistsError:
                return True
            return False
        except MMPackError:
            raise
        except Exception:  # the server or client rejects the header itself: no conditional writes
            return False
        finally:
            with contextlib.suppress(Exception):
                self._remove(probe)

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


class RemoteReader:
    """Range reads of one object in an :class:`FsspecStore` (the ``Reader`` protocol).

    The first read fetches the object's first 64 KiB (preamble and header
    in one request, with the size on S3); ``read_segments`` merges nearby
    segments into few ranges and fetches them concurrently, then copies and
    hashes every segment in one native call. Objects are immutable, so what
    was fetched stays valid.

    Example::

        with store.open_reader("objects/3f2a.mmpack") as reader:
            header = mmpack.fileformat.read_header(reader)   # one GET: the first 64 KiB and the size
    """

    remote = True  # each read is a round trip: read_rows_many overlaps the reads of several objects

    def __init__(self, store: FsspecStore, path: str) -> None:
        self._store = store
        self._path = path
        self._size: int | None = None
        self._head: bytes | None = None
        self._lock = threading.Lock()

    def size(self) -> int:
        """Bytes of the object."""
        if self._size is None:
            self._load_head()
        if self._size is None:
            self._size = int(self._store._info(self._path)["size"])
        return self._size

    def descriptor(self) -> None:
        """Remote objects are no local files: readers fetch ranges."""
        return None

    def read(self, offset: int, size: int, what: str) -> bytes:
        """``size`` bytes at ``offset``."""
        out = bytearray(size)
        self.read_into(offset, memoryview(out), what)
        return bytes(out)

    def read_into(self, offset: int, target: memoryview, what: str) -> None:
        """Fill ``target`` with the bytes at ``offset``; a short object raises IntegrityError."""
        if target.format != "B" or target.ndim != 1:
            target = target.cast("B")
        end = offset + target.nbytes
        if target.nbytes == 0:
            return
        data = self._load_head()[offset:end] if end <= READ_AHEAD else self._store._read(self._path, offset, end)
        if len(data) != target.nbytes:
            raise IntegrityError(
                f"object ends inside {what}: needed {target.nbytes} bytes at offset {offset}, got {len(data)}"
            )
        target[:] = data

    def read_segments(
        self,
        offsets: np.ndarray,
        lengths: np.ndarray,
        dst: list[np.ndarray],
        dst_index: np.ndarray,
        dst_offsets: np.ndarray,
        hashes: np.ndarray | None = None,
        counts: np.ndarray | None = None,
    ) -> None:
        """Read segment k (``lengths[k]`` bytes at ``offsets[k]``; with ``counts``, ``counts[k]``
        rows of that length) into ``dst[dst_index[k]]`` at ``dst_offsets[k]``, hashing each
        segment (row) into ``hashes`` if given; a short object raises IntegrityError."""
        offsets = np.asarray(offsets, dtype=U64)
        lengths = np.asarray(lengths, dtype=U64)
        counts = np.ones(len(lengths), U64) if counts is None else np.asarray(counts, dtype=U64)
        if len(lengths) == 0:
            return
        spans = lengths * counts
        head = self._head
        if head is not None and int((offsets + spans).max()) <= len(head):
            sources, owner, starts = [np.frombuffer(head, np.uint8)], np.zeros(len(offsets), U64), np.zeros(1, U64)
        else:
            starts, ends, owner = plan_ranges(offsets, spans)
            blobs = self._store._read_ranges(self._path, starts.tolist(), ends.tolist())
            for s, e, blob in zip(starts.tolist(), ends.tolist(), blobs):
                if len(blob) != e - s:
                    raise IntegrityError(f"object is truncated: bytes {s}..{e} were asked for, {len(blob)} came")
            sources = [np.frombuffer(blob, np.uint8) for blob in blobs]
        _io.copy_runs(
            sources, owner, offsets - starts[owner.astype(np.intp)], lengths, counts, dst,
            np.asarray(dst_index, U64), np.asarray(dst_offsets, U64), hashes,
        )

    def _load_head(self) -> bytes:
        with self._lock:
            if self._head is None:
                self._head, size = self._store._read_head(self._path, READ_AHEAD)
                if size is not None:
                    self._size = size
            return self._head


def plan_ranges(
    offsets: np.ndarray, lengths: np.ndarray, max_gap: int = MAX_GAP, max_range: int = MAX_RANGE
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """plan_ranges(offsets, lengths) -> (starts, ends, owner)

    Merge segments into byte ranges to fetch: neighbours closer than
    ``max_gap`` share a range, and ranges stop growing past about
    ``max_range`` so that large reads split into parallel parts. ``owner[k]``
    is the range holding segment k. Vectorised: a full recovery plans
    tens of thousands of rows.

    Example::

        starts, ends, owner = plan_ranges(np.array([0, 100, 10**9]), np.array([10, 10, 10]))
        # starts [0, 10**9], ends [110, 10**9 + 10], owner [0, 0, 1]
    """
    offsets = np.asarray(offsets, dtype=U64)
    order = np.argsort(offsets, kind="stable")
    s = offsets[order].astype(np.int64)
    e = s + np.asarray(lengths, dtype=U64)[order].astype(np.int64)
    reach = np.maximum.accumulate(e)  # segments may overlap: a range ends at the furthest end so far
    part = (s - s[0]) // max_range
    breaks = (s[1:] > reach[:-1] + max_gap) | ((part[1:] != part[:-1]) & (s[1:] >= reach[:-1]))
    firsts = np.concatenate([[0], np.flatnonzero(breaks) + 1])
    starts = s[firsts]
    ends = np.maximum.reduceat(e, firsts)
    owner = np.empty(len(s), dtype=U64)
    owner[order] = np.concatenate([[0], np.cumsum(breaks)]).astype(U64)
    return starts.astype(U64), ends.astype(U64), owner


class _S3:
    """The S3 requests fsspec's generic interface does not offer: conditional PUTs with a writer
    token, a ranged GET that also returns the object's size, single-request GETs, and the
    multipart uploads ``clean_temporaries`` aborts."""

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def put(self, path: str, content: Content, *, create: bool, token: str | None) -> None:
        if isinstance(content, np.ndarray):
            # botocore takes bytes or a file; a file over the array spares copying it into bytes.
            content = _ArrayFile(content) if len(content) < SINGLE_PUT_LIMIT else content.tobytes()
        extra: dict[str, Any] = {}
        if create:
            extra["mode"] = "create"
        if token is not None:
            extra["Metadata"] = {_WRITER_TOKEN: token}
        # One PUT up to S3's limit, instead of s3fs's default of parts above 100 MiB.
        self.fs.pipe_file(path, content, chunksize=SINGLE_PUT_LIMIT // 2, **extra)

    def get(self, path: str) -> bytes:
        return self.fs.cat_file(path, max_concurrency=1)  # no HEAD first, no parallel parts: one GET

    def keys_after(self, folder: str, after: str, strip: int) -> list[str]:
        """Keys directly in ``folder`` (a path ending in '/') that sort after the path ``after``."""
        bucket, prefix, _ = self.fs.split_path(folder)
        _, start, _ = self.fs.split_path(after)
        prefix = prefix.rstrip("/") + "/"
        keys, token = [], None
        while True:
            page = self.call("list_objects_v2", Bucket=bucket, Prefix=prefix, StartAfter=start, Delimiter="/",
                             **({"ContinuationToken": token} if token else {}))
            keys += [f"{bucket}/{item['Key']}"[strip:] for item in page.get("Contents", [])]
            token = page.get("NextContinuationToken")
            if not token:
                return sorted(k for k in keys if not k.rsplit("/", 1)[-1].startswith("."))

    def call(self, method: str, **kwargs: Any) -> Any:
        """One S3 request, through s3fs's ``_call_s3`` (where retries and error translation live)."""
        from fsspec.asyn import sync

        return sync(self.fs.loop, self.fs._call_s3, method, **kwargs)

    def head(self, path: str, length: int) -> tuple[bytes, int | None]:
        from fsspec.asyn import sync

        try:
            return sync(self.fs.loop, self._head, path, length)
        except FileNotFoundError:
            raise
        except OSError:
            if self.fs.info(path)["size"] == 0:  # an empty object has no byte 0 to range over (416)
                return b"", 0
            raise

    async def _head(self, path: str, length: int) -> tuple[bytes, int | None]:
        bucket, key, _ = self.fs.split_path(path)
        response = await self.fs._call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes=0-{length - 1}")
        try:
            data = await response["Body"].read()
        finally:
            response["Body"].close()
        total = response.get("ContentRange", "").rpartition("/")[2]
        return data, int(total) if total.isdigit() else None

    def writer_token(self, path: str) -> str | None:
        bucket, key, _ = self.fs.split_path(path)
        return self.call("head_object", Bucket=bucket, Key=key).get("Metadata", {}).get(_WRITER_TOKEN)

    def abort_uploads(self, root: str, initiated_before: float) -> int:
        bucket, prefix, _ = self.fs.split_path(root)
        prefix = f"{prefix}/" if prefix else ""
        aborted = 0
        markers: dict[str, str] = {}
        while True:
            page = self.call("list_multipart_uploads", Bucket=bucket, Prefix=prefix, **markers)
            for upload in page.get("Uploads", []):
                if _timestamp(upload["Initiated"]) < initiated_before:
                    self.call("abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                    aborted += 1
            if not page.get("IsTruncated"):
                return aborted
            markers = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}


def _is_s3(fs: Any) -> bool:
    s3fs = sys.modules.get("s3fs")  # an S3 file system means s3fs is already imported
    return s3fs is not None and isinstance(fs, s3fs.S3FileSystem)


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


class _ArrayFile(io.RawIOBase):
    """A seekable read-only file over a uint8 array, with a length: a PUT body without a copy."""

    def __init__(self, array: np.ndarray) -> None:
        super().__init__()
        self._view = memoryview(array).cast("B")
        self._position = 0

    def __len__(self) -> int:
        return len(self._view)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: len(self._view)}[whence]
        self._position = min(max(base + offset, 0), len(self._view))
        return self._position

    def readinto(self, target: Any) -> int:
        n = min(len(target), len(self._view) - self._position)
        memoryview(target).cast("B")[:n] = self._view[self._position : self._position + n]
        self._position += n
        return n


def _mtime(info: dict[str, Any]) -> float:
    """When an object was last written, from an fsspec info record (each backend names it its own way)."""
    for name in ("LastModified", "mtime", "last_modified", "updated", "modified", "created"):
        value = info.get(name)
        if value is not None and value != "":
            return _timestamp(value)
    raise MMPackError(f"the file system reports no modification time for {info.get('name')!r}")


def _timestamp(value: Any) -> float:
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, str):
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return float(value)


def _error_code(exc: BaseException) -> str | None:
    """The S3 error code behind an exception s3fs translated (it keeps the botocore error as cause,
    and a StorageError keeps s3fs's as its own)."""
    cause = exc.__cause__
    while cause is not None:
        response = getattr(cause, "response", None)
        if isinstance(response, dict):
            return response.get("Error", {}).get("Code")
        cause = cause.__cause__
    return None


def _backoff(attempt: int) -> None:
    time.sleep(random.uniform(0.5, 1.0) * min(1.0, 0.02 * 2 ** min(attempt, 10)))

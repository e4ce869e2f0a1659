"""The embedded default store: objects as files under a directory."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import numpy as np

from mmpack import _io
from mmpack.errors import StorageError
from mmpack.store.base import (
    CleanupReport,
    Data,
    Reader,
    SizedWriter,
    Store,
    Writer,
    as_writer,
    check_key,
    storage_errors,
)


class LocalStore(Store):
    """Objects as files under a directory; temporaries are dot-files beside their target.

    ``fsync=True`` makes every put durable before it returns (data, then the
    rename, then the directory), so a power cut cannot publish a manifest
    whose data is not on disk.
    """

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.fsync = fsync

    def __repr__(self) -> str:
        return f"LocalStore({self.root!r})"

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *check_key(key).split("/"))

    def get(self, key: str) -> bytes:
        path = self._path(key)
        with storage_errors(self, f"read {key}", path), open(path, "rb") as f:
            return f.read()

    @contextlib.contextmanager
    def open_reader(self, key: str) -> Iterator[Reader]:
        path = self._path(key)
        with contextlib.ExitStack() as stack:
            with storage_errors(self, f"open {key}", path):
                f = stack.enter_context(open(path, "rb", buffering=0))
                reader = stack.enter_context(_io.FileReader(f))
            yield _TranslatingReader(reader, self, key, path)

    def put(self, key: str, data: Data | Writer) -> None:
        path = self._path(key)
        with storage_errors(self, f"write {key}", path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            _io.publish_atomically(path, as_writer(data), fsync=self.fsync, size=_size_of(data))

    def put_if_absent(self, key: str, data: Data) -> bool:
        path = self._path(key)
        with storage_errors(self, f"write {key}", path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                _io.publish_atomically(path, as_writer(data), fsync=self.fsync, overwrite=False, size=_size_of(data))
            except FileExistsError:
                return False
        return True

    def exists(self, key: str) -> bool:
        return os.path.isfile(self._path(key))  # a folder of keys is not an object

    def list(self, prefix: str) -> list[str]:
        folder = prefix.rstrip("/")
        directory = self._path(folder) if folder else self.root
        with storage_errors(self, f"list {prefix or 'the top folder'}", directory):
            try:
                names = os.listdir(directory)
            except FileNotFoundError:
                return []
            base = f"{folder}/" if folder else ""
            return sorted(
                base + n for n in names if not n.startswith(".") and os.path.isfile(os.path.join(directory, n))
            )

    def list_after(self, prefix: str, after: str) -> list[str]:
        # Names are compared before anything is stat'ed: a log of 10,000 commits costs one listdir.
        folder = prefix.rstrip("/")
        directory = self._path(folder) if folder else self.root
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return []
        base = f"{folder}/" if folder else ""
        later = sorted(base + n for n in names if not n.startswith(".") and base + n > after)
        return [key for key in later if os.path.isfile(os.path.join(self.root, *key.split("/")))]

    def size(self, key: str) -> int:
        path = self._path(key)
        with storage_errors(self, f"read the size of {key}", path):
            return os.path.getsize(path)

    def modified(self, key: str) -> float:
        path = self._path(key)
        with storage_errors(self, f"read the time of {key}", path):
            return os.path.getmtime(path)

    def delete(self, key: str) -> None:
        path = self._path(key)
        with storage_errors(self, f"delete {key}", path), contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def clean_temporaries(self, older_than: float) -> CleanupReport:
        removed = size = 0
        now = time.time()
        for directory, _, names in os.walk(self.root):
            for name in names:
                if not _io.is_temporary_name(name):
                    continue
                path = os.path.join(directory, name)
                try:
                    info = os.stat(path)
                    if now - info.st_mtime < older_than:
                        continue
                    os.unlink(path)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    raise StorageError.wrap(exc, f"remove the temporary {name}", repr(self), path) from exc
                removed += 1
                size += info.st_size
        return CleanupReport(removed, size)


def _size_of(data: Data | Writer) -> int | None:
    """Bytes ``data`` will write, when known beforehand (for reserving the file's space)."""
    if isinstance(data, SizedWriter):
        return data.size
    if isinstance(data, np.ndarray):
        return data.nbytes
    if isinstance(data, (bytes, bytearray, memoryview)):
        return memoryview(data).nbytes
    return None


class _TranslatingReader:
    """A file's reader whose OS failures (an I/O error on a read) reach callers as StorageError."""

    def __init__(self, reader: Reader, store: LocalStore, key: str, path: str) -> None:
        self._reader = reader
        self._errors = (store, f"read {key}", path)

    def size(self) -> int:
        with storage_errors(*self._errors):
            return self._reader.size()

    def read(self, offset: int, size: int, what: str) -> bytes:
        with storage_errors(*self._errors):
            return self._reader.read(offset, size, what)

    def read_into(self, offset: int, target: memoryview, what: str) -> None:
        with storage_errors(*self._errors):
            self._reader.read_into(offset, target, what)

    def read_segments(self, *args: Any, **kwargs: Any) -> None:
        with storage_errors(*self._errors):
            self._reader.read_segments(*args, **kwargs)

    def direct_reads(self) -> AbstractContextManager[None]:
        """Reads of the descriptor made outside the reader fail as the reader's own: StorageError."""
        return storage_errors(*self._errors)

    def __getattr__(self, name: str) -> Any:  # anything else the file reader offers, unchanged
        return getattr(self._reader, name)

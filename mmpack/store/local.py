"""The embedded default store: objects as files under a directory."""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Iterator

import numpy as np

from mmpack import _io
from mmpack.fileformat import Reader
from mmpack.store.base import CleanupReport, Data, SizedWriter, Store, Writer, as_writer, check_key


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
        with open(self._path(key), "rb") as f:
            return f.read()

    @contextlib.contextmanager
    def open_reader(self, key: str) -> Iterator[Reader]:
        with open(self._path(key), "rb", buffering=0) as f, _io.FileReader(f) as reader:
            yield reader

    def put(self, key: str, data: Data | Writer) -> None:
        path = self._path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _io.publish_atomically(path, as_writer(data), fsync=self.fsync, size=_size_of(data))

    def put_if_absent(self, key: str, data: Data) -> bool:
        path = self._path(key)
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
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return []
        base = f"{folder}/" if folder else ""
        return sorted(base + n for n in names if not n.startswith(".") and os.path.isfile(os.path.join(directory, n)))

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
        return os.path.getsize(self._path(key))

    def modified(self, key: str) -> float:
        return os.path.getmtime(self._path(key))

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(key))

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
                except OSError as exc:
                    if exc.errno != errno.ENOENT:
                        raise
                    continue
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

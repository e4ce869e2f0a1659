"""File plumbing shared by the format and the stores: exact reads, atomic publication."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from typing import IO, BinaryIO

from mmpack.errors import IntegrityError, MMPackError


def read_exact_into(f: BinaryIO, offset: int, target: memoryview, what: str) -> None:
    """Fill ``target`` from ``f`` starting at byte ``offset``; a short file is an IntegrityError."""
    if target.nbytes == 0:
        return
    if target.format != "B" or target.ndim != 1:
        target = target.cast("B")
    f.seek(offset)
    filled = 0
    readinto = getattr(f, "readinto", None)
    while filled < len(target):
        if readinto is not None:
            n = readinto(target[filled:])
        else:
            chunk = f.read(len(target) - filled)
            n = len(chunk)
            target[filled : filled + n] = chunk
        if not n:
            raise IntegrityError(
                f"file ends inside {what}: needed {len(target)} bytes at offset {offset}, got {filled}"
            )
        filled += n


def read_exact(f: BinaryIO, offset: int, size: int, what: str) -> bytes:
    """``size`` bytes of ``f`` at ``offset``."""
    buffer = bytearray(size)
    read_exact_into(f, offset, memoryview(buffer), what)
    return bytes(buffer)


class FileReader:
    """Random access to an object stored in a seekable stream from its current position on.

    The format code reads through this interface (``size``, ``read``,
    ``read_into``) so that other byte sources, such as a store's range reads,
    can stand in for a file.
    """

    def __init__(self, f: BinaryIO) -> None:
        if not f.seekable():
            raise MMPackError("reading needs a seekable file object; wrap bytes in io.BytesIO")
        self._f = f
        self._base = f.tell()

    def size(self) -> int:
        """Bytes from the starting position to the end of the stream."""
        return self._f.seek(0, os.SEEK_END) - self._base

    def read_into(self, offset: int, target: memoryview, what: str) -> None:
        """Fill ``target`` with the bytes at ``offset``."""
        read_exact_into(self._f, self._base + offset, target, what)

    def read(self, offset: int, size: int, what: str) -> bytes:
        """``size`` bytes at ``offset``."""
        return read_exact(self._f, self._base + offset, size, what)


def temporary_sibling(path: str | os.PathLike[str]) -> str:
    """A fresh name in ``path``'s directory for writing before publication (same file system)."""
    directory, name = os.path.split(os.fspath(path))
    return os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def fsync_directory(directory: str) -> None:
    """Make a rename in ``directory`` durable (no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish_atomically(
    path: str | os.PathLike[str], write: Callable[[IO[bytes]], None], *, fsync: bool, overwrite: bool = True
) -> None:
    """Write a file under a temporary name, then rename it to ``path`` in one step.

    A crash at any moment leaves either the previous file or the complete new
    one, never a mix. With ``fsync`` the data and the rename also survive a
    power cut. With ``overwrite=False`` an existing ``path`` is left alone and
    ``FileExistsError`` raised (a hard link publishes without replacing).
    """
    temporary = temporary_sibling(path)
    try:
        with open(temporary, "xb", buffering=0) as f:
            write(f)
            if fsync:
                os.fsync(f.fileno())
        if overwrite:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)
            os.unlink(temporary)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    if fsync:
        fsync_directory(os.path.dirname(os.fspath(path)))


@contextlib.contextmanager
def opened(target: str | os.PathLike[str] | BinaryIO, mode: str) -> Iterator[BinaryIO]:
    """Open a path unbuffered (reads land directly in tensors), or pass a file object through."""
    if isinstance(target, (str, os.PathLike)):
        with open(target, mode, buffering=0) as f:
            yield f
    else:
        yield target

"""The store interface: immutable objects under string keys, atomic writes, range reads.

A store maps keys (``"versions/v3.json"``) to immutable byte objects. It
knows nothing of torch, model sets or approaches. Writes are atomic: a
reader sees an object whole or not at all. ``put_if_absent`` is the one
conditional write the repository needs, to publish a version id exactly once.
"""

from __future__ import annotations

import contextlib
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import BinaryIO, Protocol

import numpy as np

from mmpack.errors import MMPackError, StorageError


class Reader(Protocol):
    """Random access to the bytes of one stored object (a file, or a store's range reads).

    ``read`` and ``read_into`` raise :class:`IntegrityError` for bytes beyond
    the object's end, before allocating anything for them. ``read_segments``
    reads segment k (``lengths[k]`` bytes at ``offsets[k]``, or with ``counts``
    ``counts[k]`` rows of ``lengths[k]`` bytes back to back) into
    ``dst[dst_index[k]]`` at ``dst_offsets[k]``, storing the XXH3-64 of every
    segment (every row) into ``hashes`` when given. ``descriptor`` gives
    ``(file descriptor, position of byte 0)`` when the object is a local file
    that positioned reads may read directly (several objects then move in one
    native call), else None; ``direct_reads`` is the context to make those
    reads in, which gives their OS failures the form the reader's own reads
    raise (a store's :class:`~mmpack.StorageError`). Readers never
    memory-map: a file changed under a reader gives a typed error or bytes
    that fail their checksums, never a crash.
    """

    def size(self) -> int: ...

    def read(self, offset: int, size: int, what: str) -> bytes: ...

    def read_into(self, offset: int, target: memoryview, what: str) -> None: ...

    def read_segments(
        self,
        offsets: np.ndarray,
        lengths: np.ndarray,
        dst: Sequence[np.ndarray],
        dst_index: np.ndarray,
        dst_offsets: np.ndarray,
        hashes: np.ndarray | None = None,
        counts: np.ndarray | None = None,
    ) -> None: ...

    def descriptor(self) -> tuple[int, int] | None: ...

    def direct_reads(self) -> AbstractContextManager[None]: ...


Data = bytes | bytearray | memoryview | np.ndarray
Writer = Callable[[BinaryIO], None]

_KEY = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*")


def check_key(key: str) -> str:
    """Keys are relative, '/'-separated names of letters, digits, '.', '_', '-' (no leading dots)."""
    if not isinstance(key, str) or not _KEY.fullmatch(key) or any(p in {".", ".."} for p in key.split("/")):
        raise MMPackError(f"invalid store key {key!r}")
    return key


@dataclass(frozen=True)
class CleanupReport:
    """What a store's clean-up of interrupted writes removed."""

    removed: int
    bytes: int


class Store(ABC):
    """Immutable objects under string keys, with atomic writes and range reads.

    Errors: ``get``, ``size``, ``modified`` and ``open_reader`` of an absent
    key raise :class:`FileNotFoundError` (the built-in backends raise
    :class:`~mmpack.ObjectNotFoundError`, which is one); any other failure
    of the medium (disk full, read-only, I/O or network error) reaches the
    caller of a built-in backend as a :class:`~mmpack.StorageError` naming the
    key, the store and the errno.
    """

    #: Each request is a network round trip: callers overlap independent requests (threads)
    #: instead of issuing them one after another.
    remote: bool = False

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The whole object; ``FileNotFoundError`` if absent."""

    @abstractmethod
    def open_reader(self, key: str) -> contextlib.AbstractContextManager[Reader]:
        """Random access to an object (``size``, ``read``, ``read_segments``) for range reads."""

    @abstractmethod
    def put(self, key: str, data: Data | Writer) -> None:
        """Create or replace ``key`` atomically with ``data`` (bytes, or a function writing a stream)."""

    @abstractmethod
    def put_if_absent(self, key: str, data: Data) -> bool:
        """Create ``key`` atomically unless it exists; True if this call created it."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether ``key`` is present."""

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Keys directly under the folder ``prefix`` (e.g. ``"versions/"``), sorted, temporaries excluded."""

    def list_after(self, prefix: str, after: str) -> list[str]:
        """Keys directly under ``prefix`` that sort after the key ``after``, sorted. Stores that can
        start a listing at a key (S3's ``StartAfter``) override it: a catalog lists only the few
        commits after the one it knows, however long the log."""
        return [key for key in self.list(prefix) if key > after]

    @abstractmethod
    def size(self, key: str) -> int:
        """Bytes of the object."""

    @abstractmethod
    def modified(self, key: str) -> float:
        """Last modification time (seconds since the epoch), for grace periods."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key`` (no error if it is already gone)."""

    @abstractmethod
    def clean_temporaries(self, older_than: float) -> CleanupReport:
        """Remove leftovers of interrupted writes last touched more than ``older_than`` seconds ago."""

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """``length`` bytes of ``key`` at ``offset``."""
        with self.open_reader(key) as reader:
            return reader.read(offset, length, key)


# Errors that are bugs in the calling code, not failures of the storage: never translated.
_PROGRAMMING_ERRORS = (TypeError, AttributeError, NameError, AssertionError, NotImplementedError, RecursionError)


@contextlib.contextmanager
def storage_errors(
    store: Store, action: str, path: str | None = None, *, foreign: bool = False,
    passing: tuple[type[BaseException], ...] = (),
) -> Iterator[None]:
    """Translate failures of the medium inside the block into :class:`~mmpack.StorageError`.

    ``action`` says what was being done (``"write objects/3f.mmpack"``), ``path``
    where (the file or URL). OSErrors are translated, keeping their errno
    (a missing file becomes :class:`~mmpack.ObjectNotFoundError`, still a
    FileNotFoundError); with ``foreign``, so are the exceptions a storage
    client raises of its own (botocore's ``NoCredentialsError``...). mmpack's
    own errors, programming errors and the ``passing`` types (answers the
    caller handles, such as a create-only write's FileExistsError) pass
    unchanged.

    Example::

        with storage_errors(self, f"read {key}", path):
            return self.fs.cat_file(path)
    """
    try:
        yield
    except (MMPackError, *passing):
        raise
    except OSError as exc:
        raise StorageError.wrap(exc, action, repr(store), path) from exc
    except _PROGRAMMING_ERRORS:
        raise
    except Exception as exc:
        if not foreign:
            raise
        raise StorageError.wrap(exc, action, repr(store), path) from exc


@dataclass(frozen=True)
class SizedWriter:
    """A writer that knows how many bytes it will write.

    Stores that must hold an object in memory before sending it (a PUT
    needs its length) then allocate it once instead of growing a buffer.
    Any store accepts it where it accepts a writer.

    Example::

        store.put(key, SizedWriter(len(header) + len(body), lambda f: (f.write(header), f.write(body))))
    """

    size: int
    write: Writer

    def __call__(self, f: BinaryIO) -> None:
        self.write(f)


def as_writer(data: Data | Writer) -> Writer:
    """A function writing ``data`` to a stream (``data`` may already be one)."""
    if callable(data):
        return data
    view = memoryview(data.reshape(-1).view(np.uint8)) if isinstance(data, np.ndarray) else memoryview(data).cast("B")
    return lambda f: f.write(view)

"""The exceptions mmpack raises.

Every error is an :class:`MMPackError`; each subclass also inherits the
builtin exception it resembles, so ``except KeyError`` or ``except ValueError``
keeps working in code that does not know mmpack.
"""

from __future__ import annotations

import errno as _errno

__all__ = [
    "ArchitectureMismatchError",
    "BackgroundSaveError",
    "BaseSaveFailedError",
    "CompressionError",
    "FormatError",
    "IntegrityError",
    "InvalidArgumentError",
    "MMPackError",
    "MissingDependencyError",
    "ModelIndexError",
    "ObjectNotFoundError",
    "ProvenanceError",
    "ProvenanceMismatchError",
    "RepositoryError",
    "RepositoryNotFoundError",
    "StorageError",
    "TagConflictError",
    "UnsupportedFormatVersionError",
    "VersionNotFoundError",
]


class MMPackError(Exception):
    """Root of every error raised by mmpack."""


class ArchitectureMismatchError(MMPackError, ValueError):
    """Models, tensors or versions that should share one architecture do not.

    The message names the first model and tensor that differ, e.g.
    ``model 17 has parameter 'fc2.weight' of shape (48, 40); model 0 has (48, 48)``.
    """


class FormatError(MMPackError, ValueError):
    """Bytes that are not a well-formed mmpack object (bad magic, malformed header)."""


class UnsupportedFormatVersionError(FormatError):
    """A file written by a format version this mmpack cannot read."""


class IntegrityError(FormatError):
    """Stored bytes fail their checksum, or a file is truncated: the data is corrupt."""


class CompressionError(MMPackError, ValueError):
    """An unknown codec or bad compression settings, or compression asked for without ``zstandard``.

    Example: ``repo.save(models, compression="lz4")`` raises it, naming the
    codecs mmpack knows.
    """


class ModelIndexError(MMPackError, IndexError):
    """A model index outside ``[0, n_models)``, or indices that are not integers."""


class VersionNotFoundError(MMPackError, KeyError):
    """No version with this id in the repository (also raised for malformed ids)."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0]) if self.args else ""


class MissingDependencyError(MMPackError, ImportError):
    """An optional package a feature needs is not installed; the message names what to install,
    e.g. ``pip install "mmpack[s3]"`` for ``s3://`` repositories."""


class InvalidArgumentError(MMPackError, ValueError):
    """An argument outside the values a function accepts, e.g. ``repo.gc(grace_seconds=float("nan"))``."""


class RepositoryError(MMPackError):
    """The repository is unusable: not an mmpack repository, damaged manifest, missing object."""


class RepositoryNotFoundError(RepositoryError, FileNotFoundError):
    """No mmpack repository at a location that must hold one: ``Repository(path, create=False)``.

    Example::

        try:
            repo = mmpack.Repository("s3://fleet/cells", create=False)
        except mmpack.RepositoryNotFoundError:
            ...  # nothing was created
    """

    def __str__(self) -> str:  # OSError would prefix "[Errno 2]"
        return str(self.args[-1]) if self.args else ""


class StorageError(MMPackError, OSError):
    """A store could not do what was asked: disk full, read-only file system, I/O or network failure.

    Also an :class:`OSError`: ``errno`` is the failure's (``errno.ENOSPC``,
    ``errno.EROFS``, ``errno.EIO`` for failures that carry none, such as a
    network error), ``filename`` the path or URL of the object, and the
    message names both, e.g. ``cannot write objects/3f.mmpack in
    LocalStore('/data/cells.repo'): No space left on device [ENOSPC]``.
    The underlying exception is its ``__cause__``.

    Example::

        try:
            repo.save(models)
        except mmpack.StorageError as exc:
            if exc.errno == errno.ENOSPC:
                ...  # free space, then save again: the failed save left nothing behind
    """

    @classmethod
    def wrap(cls, cause: BaseException, action: str, where: str, path: str | None = None) -> StorageError:
        """The error to raise for ``cause`` (an OSError or a storage client's exception) met while
        doing ``action`` (``"write objects/3f.mmpack"``) in ``where`` (the store); a missing object
        gives an :class:`ObjectNotFoundError`."""
        if isinstance(cause, FileNotFoundError) or (isinstance(cause, OSError) and cause.errno == _errno.ENOENT):
            kind, code, reason = ObjectNotFoundError, _errno.ENOENT, "no such object"
        elif isinstance(cause, OSError) and isinstance(cause.errno, int):
            kind, code, reason = cls, cause.errno, cause.strerror or str(cause)
        else:  # a client's own exception, or an OSError without errno: the message says it all
            kind, code, reason = cls, _errno.EIO, str(cause) or type(cause).__name__
        reason = " ".join(reason.split())  # client errors span lines; an error is one line
        return kind(code, f"cannot {action} in {where}: {reason} [{_errno.errorcode.get(code, code)}]", path)

    def __str__(self) -> str:  # the message already names the path and the errno
        return str(self.strerror) if self.strerror is not None else super().__str__()


class ObjectNotFoundError(StorageError, FileNotFoundError):
    """A key the store does not hold (a vanished object, or one never written); also ``FileNotFoundError``,
    which the store contract raises for absent keys."""


class TagConflictError(MMPackError):
    """A tag moved (or appeared, or went) between reading it and moving it: ``repo.tag(name, vid,
    expected=...)`` found it on another version. Read the tag again and decide.

    Example::

        try:
            repo.tag("production", "v9", expected="v7")
        except mmpack.TagConflictError:
            ...  # someone promoted another version meanwhile
    """



class BaseSaveFailedError(MMPackError):
    """A save could not run because the pending save it builds on (its ``base``, named by that
    save's future) failed; ``__cause__`` is that failure. Saves that depend on this one fail the same way.

    Example::

        first = repo.save(ms, blocking=False)
        second = repo.save(ms, approach="update", base=first, blocking=False)
        second.exception()  # BaseSaveFailedError if `first` failed (first.exception() says why)
    """


class BackgroundSaveError(MMPackError):
    """``repo.close()`` (or leaving its ``with`` block) found non-blocking saves that failed and
    whose futures were never asked for their result or exception; ``__cause__`` is the first
    failure, ``failures`` lists every such ``(future, exception)``. A failure is never silent."""

    def __init__(self, message: str, failures: list | None = None) -> None:
        super().__init__(message)
        self.failures = list(failures or [])


class ProvenanceError(MMPackError):
    """A provenance record cannot be made or replayed (function not importable, dataset unreadable...)."""


class ProvenanceMismatchError(ProvenanceError):
    """Retrained models do not hash like the ones that were saved; the message names models and likely causes."""

"""The exceptions mmpack raises.

Every error is an :class:`MMPackError`; each subclass also inherits the
builtin exception it resembles, so ``except KeyError`` or ``except ValueError``
keeps working in code that does not know mmpack.
"""

from __future__ import annotations

__all__ = [
    "ArchitectureMismatchError",
    "CompressionError",
    "FormatError",
    "IntegrityError",
    "InvalidArgumentError",
    "MMPackError",
    "MissingDependencyError",
    "ModelIndexError",
    "ProvenanceError",
    "ProvenanceMismatchError",
    "RepositoryError",
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


class TagConflictError(MMPackError):
    """A tag moved (or appeared, or went) between reading it and moving it: ``repo.tag(name, vid,
    expected=...)`` found it on another version. Read the tag again and decide.

    Example::

        try:
            repo.tag("production", "v9", expected="v7")
        except mmpack.TagConflictError:
            ...  # someone promoted another version meanwhile
    """


class ProvenanceError(MMPackError):
    """A provenance record cannot be made or replayed (function not importable, dataset unreadable...)."""


class ProvenanceMismatchError(ProvenanceError):
    """Retrained models do not hash like the ones that were saved; the message names models and likely causes."""

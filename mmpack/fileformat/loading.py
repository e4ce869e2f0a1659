"""``mmpack.load``: one model-set file into a ModelSet, read (positioned reads) or memory-mapped."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import BinaryIO

from mmpack import _io
from mmpack.errors import InvalidArgumentError
from mmpack.fileformat.header import read_header
from mmpack.fileformat.mapping import load_mapped
from mmpack.fileformat.reading import read_modelset
from mmpack.modelset import ModelSet


def load(f: str | os.PathLike[str] | BinaryIO, indices: Iterable[int] | None = None, *, verify: bool = True,
         mmap: bool = False) -> ModelSet:
    """load(f, indices=None, *, verify=True, mmap=False) -> ModelSet

    Read a model-set file (path or seekable binary file object). With
    ``indices``, only those models' bytes are read, in the order given. Every
    byte read is checked against the file's checksums unless ``verify=False``
    (for callers that verify elsewhere); corruption raises
    :class:`IntegrityError`, other malformed input :class:`FormatError`.

    ``mmap=True`` (torch.load's convention) maps the file instead of reading
    it: the result is a :class:`~mmpack.fileformat.mapping.MappedModelSet`
    whose tensors are the file's pages, read when touched. Its header, size,
    padding and hash table are checked at load; its tensor bytes by
    ``ms.verify()`` and, for the models taken out, by ``ms.select()``. A
    process touching a mapped page after another truncated the file dies of
    SIGBUS: map only files nothing else modifies (mmpack itself never
    rewrites a published file). Uncompressed files only.

    Example::

        two = mmpack.load("cells.mmpack", indices=[3, 17])
        fleet = mmpack.load("fleet.mmpack", mmap=True)   # 20 GB mapped, nothing read yet
    """
    if mmap:
        if indices is not None:
            raise InvalidArgumentError("mmap=True maps the whole set; take models with .select(indices)")
        return load_mapped(f, verify=verify)
    with _io.opened(f, "rb") as stream, _io.FileReader(stream) as source:
        header = read_header(source)
        return read_modelset(source, header, indices, verify=verify)[0]


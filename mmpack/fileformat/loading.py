"""``mmpack.load``: one model-set file into a ModelSet: read (positioned reads), placed on a device or
into existing tensors, or memory-mapped."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import BinaryIO

import torch

from mmpack import _io
from mmpack.errors import InvalidArgumentError
from mmpack.fileformat.header import read_header
from mmpack.fileformat.mapping import load_mapped
from mmpack.fileformat.reading import check_padding, check_stacked, read_models_into, read_modelset
from mmpack.modelset import ModelSet
from mmpack.placement import place_models
from mmpack.staging import is_host, resolve_device


def load(
    f: str | os.PathLike[str] | BinaryIO,
    indices: Iterable[int] | None = None,
    *,
    verify: bool = True,
    device: torch.device | str | None = None,
    map_location: object = None,
    out: ModelSet | Mapping[str, torch.Tensor] | None = None,
    chunk_bytes: int | None = None,
    mmap: bool = False,
) -> ModelSet:
    """load(f, indices=None, *, verify=True, device=None, map_location=None, out=None, mmap=False) -> ModelSet

    Read a model-set file (path or seekable binary file object). With
    ``indices``, only those models' bytes are read, in the order given. Every
    byte read is checked against the file's checksums unless ``verify=False``
    (for callers that verify elsewhere); corruption raises
    :class:`IntegrityError`, other malformed input :class:`FormatError`.

    ``device`` (or ``map_location``, as ``torch.load`` takes it) places the
    models on that device: they travel through two pinned staging buffers of
    ``chunk_bytes`` (default :data:`mmpack.staging.CHUNK_BYTES`), each chunk
    checked before it is copied, so host memory stays within two chunks.
    ``out`` (a :class:`ModelSet` or its stacked tensors, on the host or a
    device) receives the models in place and is returned; nothing of the
    set's size is allocated. Its architecture and size must match the file
    (:class:`ArchitectureMismatchError` before any byte moves); with
    ``indices``, only those rows of ``out`` change. A full load into host
    tensors reads straight into them, so a checksum failure leaves their
    bytes undefined; staged loads copy only checked chunks.

    ``mmap=True`` (torch.load's convention) maps the file instead of reading
    it: the result is a :class:`~mmpack.fileformat.mapping.MappedModelSet`
    whose tensors are the file's pages, read when touched. Its header, size,
    padding and hash table are checked at load; its tensor bytes by
    ``ms.verify()`` and, for the models taken out, by ``ms.select()``. A
    process touching a mapped page after another truncated the file dies of
    SIGBUS: map only files nothing else modifies (mmpack itself never
    rewrites a published file). Uncompressed files on the host only.

    Example::

        two = mmpack.load("cells.mmpack", indices=[3, 17])
        on_gpu = mmpack.load("cells.mmpack", map_location="cuda:0")
        mmpack.load("cells.mmpack", out=ms)          # into the tensors a training loop holds
        fleet = mmpack.load("fleet.mmpack", mmap=True)   # 20 GB mapped, nothing read yet
    """
    if mmap:
        if indices is not None or out is not None or device is not None or map_location is not None:
            raise InvalidArgumentError("mmap=True maps the whole set on the host; take models with .select(indices)")
        return load_mapped(f, verify=verify)
    target = resolve_device(device, map_location)
    with _io.opened(f, "rb") as stream, _io.FileReader(stream) as source:
        header = read_header(source)
        if out is None and (target is None or is_host(target)):
            return read_modelset(source, header, indices, verify=verify)[0]
        check_stacked(source, header)
        if indices is None and verify:
            check_padding(source, header)
        return place_models(
            header.architecture, header.n_models, indices, out, target,
            lambda models, tensors: read_models_into(source, header, models, tensors, verify=verify),
            chunk_bytes=chunk_bytes, what="the file",
        )


"""Staging: stacked tensors between a device and the host, chunk by chunk, through pinned memory.

Two directions, one pipeline of two host buffers:

* :func:`download` copies device tensors to the host chunk by chunk and hands
  each chunk, as host bytes, to a consumer (which copies it into a host set
  and hashes it, or only hashes it). On CUDA the copy of chunk ``k + 1`` runs
  on a side stream into page-locked memory while the host consumes chunk
  ``k``.
* :func:`place` fills host buffers with the rows of a chunk of models (read
  from a file or a repository by its caller, and verified there) and copies
  them into target tensors, on a device or on the host, at any rows. On CUDA
  the upload of chunk ``k`` overlaps the reading of chunk ``k + 1``.

Host memory in use is two chunks (at least one row of one tensor, or one
model, each), whatever the size of the set. On the host and on devices
without CUDA streams the same code runs with ordinary buffers and
synchronous copies: that is the path the tests take on machines without a
GPU, and ``bench/devices.py`` checks the CUDA path bit for bit.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from mmpack import packing
from mmpack.architecture import Architecture
from mmpack.errors import InvalidArgumentError

#: Bytes of one staging buffer (two are used): large enough that a copy runs at the link's speed,
#: small enough to stay out of the way of the caller's memory.
CHUNK_BYTES = 32 << 20
_ALIGN = 64  # tensor views inside one buffer start at multiples of this (any dtype's alignment)

Fill = Callable[[np.ndarray, dict[str, torch.Tensor]], None]


def resolve_device(device: Any = None, map_location: Any = None) -> torch.device | None:
    """The device a load or recovery places its result on, from ``device=`` or torch.load's ``map_location=``.

    ``map_location`` may be a device (or its name), a dict mapping saved
    locations to new ones (mmpack stores host bytes: the entry for ``"cpu"``
    applies), or a function ``(storage, location) -> storage`` (called once
    with an empty host storage and ``"cpu"``; None keeps the host), as in
    ``torch.load``. None means the host.
    """
    if device is not None and map_location is not None:
        raise InvalidArgumentError("pass device= or map_location=, not both")
    if map_location is not None:
        if isinstance(map_location, Mapping):
            device = map_location.get("cpu")
        elif callable(map_location):
            moved = map_location(torch.UntypedStorage(0), "cpu")
            device = None if moved is None else moved.device
        else:
            device = map_location
    if device is None:
        return None
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidArgumentError(f"not a device: {device!r} ({exc})") from None
    if resolved.type == "meta":
        raise InvalidArgumentError("the meta device holds no data: choose 'cpu' or an accelerator")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(f"{device!r} names a CUDA device, and torch finds none on this machine")
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


_host_as_device = threading.local()


@contextlib.contextmanager
def host_as_device() -> Iterator[None]:
    """Within this block (on this thread), treat host memory as an accelerator's: loads and
    recoveries onto ``"cpu"``, ``out=`` host tensors and saves of host sets all take the staged path
    that accelerators take. The tests run that path this way on machines without a GPU."""
    before = getattr(_host_as_device, "on", False)
    _host_as_device.on = True
    try:
        yield
    finally:
        _host_as_device.on = before


def is_host(device: torch.device) -> bool:
    """Whether ``device`` is host memory that mmpack reads and writes directly (no staging)."""
    return device.type == "cpu" and not getattr(_host_as_device, "on", False)


def direct_target(targets: Mapping[str, torch.Tensor]) -> bool:
    """Whether a reader may write straight into ``targets``: contiguous host tensors."""
    return all(is_host(t.device) and t.is_contiguous() for t in targets.values())


def check_device(targets: Mapping[str, torch.Tensor] | None, device: torch.device | None) -> None:
    """``device=`` and the device of ``out=``'s tensors, when both are given, must agree."""
    if targets is None or device is None or not targets:
        return
    theirs = next(iter(targets.values())).device
    if theirs != device:
        raise InvalidArgumentError(f"out= lies on {theirs}, device= asks for {device}: give one, or the same")


class _Transfer:
    """Copies between host staging buffers and one device, in the order they are issued.

    On CUDA: page-locked buffers, copies on a side stream that first waits
    for the caller's stream (so it sees every write queued before), an event
    per buffer to know when it may be reused, and a final synchronisation.
    Elsewhere: plain host memory and synchronous ``copy_``.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = None
        self._events: dict[int, Any] = {}
        if self.cuda:
            self.stream = torch.cuda.Stream(device)
            self.stream.wait_stream(torch.cuda.current_stream(device))

    def buffer(self, nbytes: int) -> torch.Tensor:
        if self.cuda:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        return torch.from_numpy(np.empty(nbytes, dtype=np.uint8))

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if self.cuda:
            with torch.cuda.stream(self.stream):
                dst.copy_(src, non_blocking=True)
        else:
            dst.copy_(src)

    def index_copy(self, dst: torch.Tensor, rows: np.ndarray, src: torch.Tensor) -> None:
        """``dst[rows] = src`` for host ``src`` and any ``dst``."""
        if self.cuda:
            with torch.cuda.stream(self.stream):
                moved = src.to(self.device, non_blocking=True)
                index = torch.from_numpy(rows).to(self.device, non_blocking=True)
                dst.index_copy_(0, index, moved)
        else:
            dst.index_copy_(0, torch.from_numpy(rows).to(dst.device), src.to(dst.device))

    def record(self, buffer: torch.Tensor) -> None:
        """Mark the copies issued so far as the last users of ``buffer``."""
        if self.cuda:
            event = torch.cuda.Event()
            event.record(self.stream)
            self._events[buffer.data_ptr()] = event

    def wait(self, buffer: torch.Tensor) -> None:
        """Return once every copy that uses ``buffer`` has finished."""
        event = self._events.pop(buffer.data_ptr(), None)
        if event is not None:
            event.synchronize()

    def finish(self) -> None:
        if self.cuda:
            self.stream.synchronize()
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            self._events.clear()


def _device_of(tensors: Sequence[torch.Tensor]) -> torch.device:
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise InvalidArgumentError(f"tensors on several devices: {sorted(map(str, devices))}")
    return devices.pop() if devices else torch.device("cpu")


# -- device to host --------------------------------------------------------------------------------


def download(
    sources: Sequence[torch.Tensor],
    row_bytes: Sequence[int],
    consume: Callable[[int, int, int, np.ndarray], None],
    chunk_bytes: int | None = None,
) -> None:
    """Copy contiguous stacked ``sources`` (one device) to the host in chunks of whole rows and call
    ``consume(j, first_row, n_rows, host_bytes)`` for each, in order; ``host_bytes`` is reused after
    the call returns. Tensors without bytes are skipped."""
    chunk_bytes = _check_chunk(chunk_bytes)
    transfer = _Transfer(_device_of(sources))
    pieces = []
    for j, (source, size) in enumerate(zip(sources, row_bytes)):
        if size == 0 or source.shape[0] == 0:
            continue
        rows = max(1, chunk_bytes // size)
        pieces += [(j, first, min(rows, source.shape[0] - first)) for first in range(0, source.shape[0], rows)]
    if not pieces:
        return
    largest = max(count * row_bytes[j] for j, _, count in pieces)
    buffers = [transfer.buffer(largest), transfer.buffer(largest)]  # chunk k lands while k - 1 is consumed
    flat = [s.detach().reshape(-1).view(torch.uint8) if row_bytes[j] else None for j, s in enumerate(sources)]
    previous = None
    for k, (j, first, count) in enumerate(pieces):
        buffer = buffers[k % len(buffers)]
        size = row_bytes[j]
        transfer.copy(buffer[: count * size], flat[j][first * size : (first + count) * size])
        transfer.record(buffer)
        if previous is not None:
            _consume(transfer, consume, *previous)
        previous = (buffer, j, first, count, size)
    _consume(transfer, consume, *previous)
    transfer.finish()


def _consume(transfer: _Transfer, consume, buffer: torch.Tensor, j: int, first: int, count: int, size: int) -> None:
    transfer.wait(buffer)
    consume(j, first, count, buffer[: count * size].numpy())


# -- host bytes into targets ------------------------------------------------------------------------


def chunk_models(architecture: Architecture, chunk_bytes: int | None = None) -> int:
    """Models per staging chunk: as many as fit in ``chunk_bytes``, at least one."""
    per_model = architecture.nbytes_per_model + _ALIGN * len(architecture)
    return max(1, _check_chunk(chunk_bytes) // max(per_model, 1))


def place(
    models: np.ndarray,
    fill: Fill,
    targets: Mapping[str, torch.Tensor],
    rows: np.ndarray,
    architecture: Architecture,
    chunk_bytes: int | None = None,
) -> None:
    """Put the models ``models`` (sorted, unique; what ``fill`` understands) into rows ``rows``
    (sorted, unique) of ``targets`` (stacked tensors by name, on one device, any strides), a chunk
    of models at a time.

    ``fill(chunk, views)`` writes the models ``chunk`` into the host tensors
    ``views`` (``[len(chunk), *shape]`` per name, contiguous) and checks them;
    only then are they copied to their rows. A failure stops the placement:
    chunks already placed stay placed.
    """
    names = architecture.names
    device = _device_of([targets[n] for n in names])
    transfer = _Transfer(device)
    per_chunk = chunk_models(architecture, chunk_bytes)
    offsets, size = _carve(architecture, min(per_chunk, max(len(models), 1)))
    buffers = [transfer.buffer(size), transfer.buffer(size)]
    destinations = {n: targets[n].detach() for n in names}
    for k, start in enumerate(range(0, len(models), per_chunk)):
        buffer = buffers[k % len(buffers)]
        transfer.wait(buffer)  # the upload of the chunk it held two chunks ago has finished
        chunk = models[start : start + per_chunk]
        views = _views(buffer, offsets, architecture, len(chunk))
        fill(chunk, views)
        at = np.asarray(rows[start : start + per_chunk], dtype=np.int64)
        consecutive = len(at) > 0 and int(at[-1]) - int(at[0]) + 1 == len(at)  # rows are sorted and unique
        for spec in architecture.tensors:
            if spec.nbytes == 0 or not len(at):
                continue
            if consecutive:
                transfer.copy(destinations[spec.name][int(at[0]) : int(at[0]) + len(at)], views[spec.name])
            else:
                transfer.index_copy(destinations[spec.name], at, views[spec.name])
        transfer.record(buffer)
    transfer.finish()


def _carve(architecture: Architecture, n_models: int) -> tuple[list[int], int]:
    offsets, position = [], 0
    for spec in architecture.tensors:
        offsets.append(position)
        position += -(-n_models * spec.nbytes // _ALIGN) * _ALIGN
    return offsets, max(position, 1)


def _views(buffer: torch.Tensor, offsets: list[int], architecture: Architecture,
           n_models: int) -> dict[str, torch.Tensor]:
    views = {}
    for spec, offset in zip(architecture.tensors, offsets):
        if spec.nbytes == 0 or n_models == 0:
            views[spec.name] = torch.empty((n_models, *spec.shape), dtype=spec.dtype)
        else:
            raw = buffer[offset : offset + n_models * spec.nbytes]
            views[spec.name] = raw.view(spec.dtype).view(n_models, *spec.shape)
    return views


def upload(sources: Mapping[str, torch.Tensor], architecture: Architecture, n_models: int, device: torch.device,
           chunk_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """Fresh tensors on ``device`` holding host ``sources`` (contiguous stacked tensors), moved
    through the staging buffers."""
    targets = {s.name: torch.empty((n_models, *s.shape), dtype=s.dtype, device=device) for s in architecture.tensors}

    def fill(chunk: np.ndarray, views: dict[str, torch.Tensor]) -> None:
        first, count = int(chunk[0]), len(chunk)
        for name, view in views.items():
            if view.numel():
                np.copyto(packing.byte_view(view), packing.byte_view(sources[name][first : first + count]))

    place(np.arange(n_models), fill, targets, np.arange(n_models), architecture, chunk_bytes)
    return targets


def _check_chunk(chunk_bytes: int | None) -> int:
    if chunk_bytes is None:
        return CHUNK_BYTES
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise InvalidArgumentError(f"chunk_bytes must be a positive integer, not {chunk_bytes!r}")
    return chunk_bytes

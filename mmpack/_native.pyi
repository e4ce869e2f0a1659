"""Types of the native module (csrc/bindings.cpp). Private: use the Python API."""

from collections.abc import Buffer, Sequence

import numpy as np

PARALLEL_MIN_BYTES: int
MAX_PLANE_WIDTH: int

def xxh3_64(data: Buffer, seed: int = 0) -> int: ...
def hash_rows(data: Buffer, row_bytes: int, out: np.ndarray) -> None: ...
def gather(
    src_addresses: np.ndarray,
    lengths: np.ndarray,
    dst: Sequence[Buffer],
    dst_index: np.ndarray,
    dst_offsets: np.ndarray,
    hashes: np.ndarray | None = None,
) -> None: ...
def scatter(
    src: Sequence[Buffer],
    src_index: np.ndarray,
    src_offsets: np.ndarray,
    lengths: np.ndarray,
    dst_addresses: np.ndarray,
) -> None: ...
def copy_segments(
    src: Sequence[Buffer],
    src_index: np.ndarray,
    src_offsets: np.ndarray,
    dst: Sequence[Buffer],
    dst_index: np.ndarray,
    dst_offsets: np.ndarray,
    lengths: np.ndarray,
    hashes: np.ndarray | None = None,
    *,
    xor: bool = False,
) -> None: ...
def read_rows(
    fds: Sequence[int],
    fd_index: np.ndarray,
    offsets: np.ndarray,
    row_bytes: np.ndarray,
    counts: np.ndarray,
    dst: Sequence[Buffer],
    dst_index: np.ndarray,
    dst_offsets: np.ndarray,
    hashes: np.ndarray | None = None,
    *,
    xor: bool = False,
) -> None: ...

class ShortReadError(EOFError): ...

def split_byte_planes(src: Buffer, dst: Buffer, width: int) -> None: ...
def merge_byte_planes(src: Buffer, dst: Buffer, width: int) -> None: ...
def merge_byte_planes_from(planes: Sequence[Buffer], dst: Buffer, width: int) -> None: ...
def set_max_threads(n: int) -> None: ...
def max_threads() -> int: ...
def simd_path() -> str: ...

class EncodedSection(Buffer):
    """One tensor's version 3 section (table block, then chunks); a uint8 buffer."""

    @property
    def table_length(self) -> int: ...
    @property
    def chunk_lengths(self) -> list[int]: ...

class DecodeError(ValueError): ...

def rans_encode(data: Buffer, rows: int, row_bytes: int, chunk_rows: int, layout: int) -> EncodedSection: ...
def rans_decode(
    tables: Sequence[Buffer],
    layouts: np.ndarray,
    payloads: Sequence[Buffer],
    jobs: np.ndarray,
    dst: Sequence[Buffer],
    hashes: np.ndarray | None = None,
) -> None: ...
def rans_decode_files(
    tables: Sequence[Buffer],
    layouts: np.ndarray,
    fds: Sequence[int],
    jobs: np.ndarray,
    dst: Sequence[Buffer],
    hashes: np.ndarray | None = None,
) -> None: ...
def rans_simd_path() -> str: ...
def rans_simd_paths() -> list[str]: ...
def rans_set_simd(path: str) -> None: ...

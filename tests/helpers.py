"""Model builders shared by the tests."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap

import torch
from torch import nn

from mmpack.workloads import ffnn48, make_models, small_cnn


class Mixed(nn.Module):
    """Parameters of several dtypes, a scalar buffer and a non-persistent buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.w16 = nn.Parameter(torch.randn(3, 4).half())
        self.wbf16 = nn.Parameter(torch.randn(5).bfloat16())
        self.w64 = nn.Parameter(torch.randn(2, 2, 2, dtype=torch.float64))
        self.register_buffer("steps", torch.tensor(7, dtype=torch.int64))
        self.register_buffer("scratch", torch.zeros(3), persistent=False)
        self.inner = nn.Linear(3, 2)


def randomized_cnns(n: int, seed: int = 0) -> list[nn.Module]:
    """Small CNNs whose BatchNorm statistics differ per model, as after training."""
    models = make_models(small_cnn, n, seed)
    generator = torch.Generator().manual_seed(seed)
    for m in models:
        for bn in (m.bn1, m.bn2, m.bn3):
            bn.running_mean.normal_(generator=generator)
            bn.running_var.uniform_(0.5, 2.0, generator=generator)
            bn.num_batches_tracked.fill_(int(torch.randint(0, 1000, (1,), generator=generator)))
    return models


def mixed_models(n: int, seed: int = 0) -> list[nn.Module]:
    return make_models(Mixed, n, seed)


def ffnn_models(n: int, seed: int = 0) -> list[nn.Module]:
    return make_models(ffnn48, n, seed)


def state_equal(a: nn.Module, b: nn.Module) -> bool:
    """Bit-exact equality of two modules' state dicts (NaN-safe: compares bytes)."""
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        return False
    return all(
        sa[k].dtype == sb[k].dtype
        and sa[k].shape == sb[k].shape
        and bytes(sa[k].contiguous().view(-1).view(torch.uint8).numpy())
        == bytes(sb[k].contiguous().view(-1).view(torch.uint8).numpy())
        for k in sa
    )


class CountingReader(io.RawIOBase):
    """A seekable file wrapper that counts the bytes read through it."""

    def __init__(self, data: bytes) -> None:
        self._inner = io.BytesIO(data)
        self.bytes_read = 0
        self.reads = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._inner.seek(offset, whence)

    def tell(self) -> int:
        return self._inner.tell()

    def readinto(self, buffer) -> int:
        n = self._inner.readinto(buffer)
        self.bytes_read += n
        self.reads += 1
        return n


# C for a fault-injecting shim: the positioned reads the kernels make (preadv for rows, pread for
# the chunks the rANS decoder reads itself), all routed through the shim's own
# `static ssize_t shim(int fd, const struct iovec* iov, int n, off_t offset)`.
PREAD_INTERPOSERS = r"""
ssize_t preadv(int fd, const struct iovec* iov, int n, off_t offset) { return shim(fd, iov, n, offset); }
ssize_t preadv64(int fd, const struct iovec* iov, int n, off_t offset) { return shim(fd, iov, n, offset); }
ssize_t pread(int fd, void* buf, size_t size, off_t offset) {
    struct iovec one = {buf, size};
    return shim(fd, &one, 1, offset);
}
ssize_t pread64(int fd, void* buf, size_t size, off_t offset) { return pread(fd, buf, size, offset); }
"""


def run_with_shim(tmp_path, shim_source: str, child: str, *args: str) -> subprocess.CompletedProcess:
    """Run the Python code ``child`` (with ``args``) in a subprocess with the C file ``shim_source``
    built as a shared library and preloaded, after any library already preloaded (a sanitizer
    run's libasan must stay first). The child runs in ``tmp_path``: ``python -c`` puts the working
    directory first on sys.path, and the source tree has no compiled extension."""
    source, shim = tmp_path / "shim.c", tmp_path / "shim.so"
    source.write_text(shim_source)
    subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", str(shim), str(source), "-ldl"], check=True)
    env = dict(os.environ, LD_PRELOAD=":".join(filter(None, [os.environ.get("LD_PRELOAD"), str(shim)])))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(child), *args], env=env, capture_output=True,
                          text=True, timeout=120, cwd=str(tmp_path))

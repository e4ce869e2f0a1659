"""Every allocation a reader makes is bounded by what the header and the request validated.

Each hostile file of tests/hostile_files.py (well-formed ones that hold
millions of tiny or empty rows or the most tensors an architecture may have;
forged counts, shapes, lengths and zstd frame sizes) is read in a child whose
address space is capped at what it uses after importing mmpack plus 320 MiB.
The read must return verified data or raise a typed error: never a
MemoryError, another exception, or a crash. Before, a file of a million
models of zero-size tensors (32 MB) took 16 times its size in bookkeeping and
a frame declaring 1 TiB raised a plain MemoryError. ``bench/hostile_memory.py``
prints the peak memory of each read.
"""

from __future__ import annotations

import pytest
from hostile_files import make_all
from limited import run_limited

BUDGET = 320 << 20


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    return make_all(str(tmp_path_factory.mktemp("hostile")))


_READ_ALL = """
import gc
cases = {cases!r}

def read():
    # Each read in turn under the same cap: the memory of one is freed before the next.
    wrong = []
    for name, (path, indices, expect) in cases.items():
        try:
            ms = mmpack.load(path, indices=indices)
            got = "ok" if len(ms) == (len(indices) if indices is not None else ms.n_models) else "short"
            del ms
        except MMPackError:
            got = "typed"
        except BaseException as exc:
            got = f"{{type(exc).__name__}}: {{str(exc)[:200]}}"
        gc.collect()
        if got != expect:
            wrong.append((name, expect, got))
    if wrong:
        raise AssertionError(wrong)
"""


def test_every_hostile_file_reads_or_fails_typed_within_the_budget(hostile):
    cases = {name: (c.path, c.indices, c.expect) for name, c in hostile.items()}
    result = run_limited(_READ_ALL.format(cases=cases), budget_bytes=BUDGET, timeout=600)
    assert result.survived and result.outcome == "ok", result


def test_the_tensor_limit_is_enforced_for_writers_too():
    import torch

    from mmpack import FormatError
    from mmpack.architecture import MAX_TENSORS, Architecture, TensorSpec

    Architecture(tuple(TensorSpec(f"t{j}", "buffer", torch.float32, (0,)) for j in range(MAX_TENSORS)))
    with pytest.raises(FormatError, match="at most 65,536 tensors"):
        Architecture(tuple(TensorSpec(f"t{j}", "buffer", torch.float32, (0,)) for j in range(MAX_TENSORS + 1)))

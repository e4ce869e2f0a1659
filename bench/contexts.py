"""Would a context-modelling coder beat the i.i.d. floor on trained weights? Cross-validated entropies.

    python bench/contexts.py [--cells 1000]

bench/compression.py compares every codec with the *i.i.d. entropy floor*:
what a coder that treats each tensor's elements as independent draws from
one distribution can reach at best. Issue 15 asks for 82 % (float32) and 64 %
(bfloat16) on the battery workload, below that floor (82.02 % and 64.04 %).
Only a coder that predicts an element from a *context* could get there. This
script measures, for the exponent byte of each element (the only field of a
trained weight that is far from uniform), the bits per element of an
adaptive model fitted on half of the models and evaluated on the other half
(add-1/2 smoothing), with no context and with each context such a coder
could use:

* the previous element's exponent (in memory order, within a model's tensor);
* the same element's exponent in the previous model of the set;
* the element's position within the tensor (one distribution per weight).

A context that lowers the held-out bits per element would be worth coding;
one that raises them only overfits.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import trained_workloads
from _common import describe_machine, print_table

from mmpack import packing


def held_out_bits(symbols: np.ndarray, contexts: np.ndarray, n_contexts: int) -> float:
    """Bits per symbol of the second half of the rows under counts of the first half, per context."""
    half = len(symbols) // 2
    counts = np.full((n_contexts, 256), 0.5)
    np.add.at(counts, (contexts[:half].reshape(-1), symbols[:half].reshape(-1)), 1)
    p = counts / counts.sum(axis=1, keepdims=True)
    return float(-np.log2(p[contexts[half:].reshape(-1), symbols[half:].reshape(-1)]).mean())


def exponents(t: torch.Tensor) -> np.ndarray:
    """``[models, elements]`` exponent bytes (float32: bits 23-30; bfloat16: bits 7-14)."""
    width = t.element_size()
    words = packing.byte_view(t.contiguous()).reshape(t.shape[0], -1).view(f"<u{width}").astype(np.int64)
    return (words >> (23 if width == 4 else 7)) & 0xFF


def measure(ms, dtype: torch.dtype | None) -> dict[str, float]:
    total: dict[str, float] = {}
    elements = 0
    for spec in ms.architecture.tensors:
        t = ms.tensors[spec.name]
        if not t.dtype.is_floating_point:
            continue
        e = exponents(t if dtype is None else t.to(dtype))
        models, width = e.shape
        order = np.random.default_rng(0).permutation(models)  # halves that mix the set's order
        e = e[order]
        cases = {
            "no context (i.i.d.)": (np.zeros_like(e), 1),
            "previous element": (np.concatenate([np.zeros((models, 1), np.int64), e[:, :-1]], axis=1), 256),
            "same element, previous model": (np.concatenate([np.zeros((1, width), np.int64), e[:-1]]), 256),
            "position in the tensor": (np.broadcast_to(np.arange(width), e.shape), width),
        }
        for name, (context, n_contexts) in cases.items():
            total[name] = total.get(name, 0.0) + held_out_bits(e, context, n_contexts) * e[len(e) // 2 :].size
        elements += e[len(e) // 2 :].size
    return {name: bits / elements for name, bits in total.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=1000)
    args = parser.parse_args()
    print(describe_machine())
    workloads = [trained_workloads.battery(args.cells, 48), trained_workloads.battery(args.cells, 69)]
    rows = []
    for w in workloads:
        for label, dtype in (("FP32", None), ("BF16", torch.bfloat16)):
            found = measure(w.trained, dtype)
            rows.append([f"{w.name} {label}"] + [f"{bits:.3f}" for bits in found.values()])
    print(f"\nexponent bits per element, held-out half of the models ({args.cells} cells each)")
    print_table(["workload", *found], rows)


if __name__ == "__main__":
    main()

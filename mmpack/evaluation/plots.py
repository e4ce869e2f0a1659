"""Plots mirroring the paper's Figures 3-5, from the JSON the evaluation writes.

Needs matplotlib (``pip install "mmpack[bench]"``).
"""

from __future__ import annotations

import os
import statistics
from typing import Any

from mmpack.evaluation.document import versions_by_approach

COLORS = {"per-model": "#7f7f7f", "baseline": "#1f77b4", "update": "#2ca02c", "provenance": "#d62728"}
LABELS = {
    "per-model": "one file per model (MMLib-base's pattern)",
    "baseline": "Baseline",
    "update": "Update",
    "provenance": "Provenance",
}


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError('plots need matplotlib: pip install "mmpack[bench]"') from None
    return plt


def _use_cases(document: dict[str, Any]) -> list[tuple[str, dict[str, dict]]]:
    """(label, {approach: figures}) for U1 and the U3 versions of every scenario, as the paper groups them."""
    cases: list[tuple[str, dict[str, dict]]] = []
    for entry in document["scenarios"]:
        s = entry["scenario"]
        name = {"ffnn48": "FFNN-48", "ffnn69": "FFNN-69", "cnn": "CIFAR CNN"}[s["arch"]]
        tag = " (trained)" if s["workload"] == "battery" else ""
        by = versions_by_approach(entry)
        if s["rate"] == 0.10:
            cases.append((f"{name}{tag}\nU1", {a: v[0] for a, v in by.items()}))
        u3 = {a: _median_version(v[1:]) for a, v in by.items()}
        cases.append((f"{name}{tag}\nU3 {s['rate']:.0%}", u3))
    return cases


def _median_version(versions: list[dict]) -> dict:
    keys = ("stored_bytes", "save_ms", "recover_ms")
    return {k: statistics.median(v[k] for v in versions) for k in keys}


def _grouped_bars(document: dict[str, Any], key: str, scale: float, ylabel: str, title: str, path: str) -> str:
    plt = _pyplot()
    cases = _use_cases(document)
    approaches = [a for a in COLORS if any(a in figures for _, figures in cases)]
    width = 0.8 / len(approaches)
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(cases)), 5.2))
    for i, approach in enumerate(approaches):
        xs, ys = [], []
        for x, (_, figures) in enumerate(cases):
            if approach in figures:
                xs.append(x + (i - (len(approaches) - 1) / 2) * width)
                ys.append(figures[approach][key] * scale)
        ax.bar(xs, ys, width=width, color=COLORS[approach], label=LABELS[approach])
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([label for label, _ in cases], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", which="both", alpha=0.3)
    _legend_below(ax, len(approaches), -0.17)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _legend_below(ax, columns: int, offset: float) -> None:
    # Below the axes and their labels, so that it never hides a bar or a line.
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, offset), ncol=columns, frameon=False)


def plot_storage(document: dict[str, Any], out: str) -> str:
    """Figure 3: storage of one version per use case (log scale, MB)."""
    return _grouped_bars(document, "stored_bytes", 1e-6, "storage per version (MB, log scale)",
                         "Storage per version, by use case (5,000 models)", os.path.join(out, "fig3_storage.png"))


def plot_save_time(document: dict[str, Any], out: str) -> str:
    """Figure 4: time to save one version per use case (log scale, ms)."""
    return _grouped_bars(
        document,
        "save_ms",
        1.0,
        "time to save (ms, log scale)",
        "Median time to save a version, by use case (5,000 models)",
        os.path.join(out, "fig4_time_to_save.png"),
    )


def plot_recover_time(document: dict[str, Any], out: str) -> str:
    """Figure 5: time to recover the newest version after k cycles: the recursive staircase against bounded recovery."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 5.6))
    staircase = next(
        e
        for e in document["scenarios"]
        if e["scenario"]["workload"] == "perturbed"
        and e["scenario"]["arch"] == "ffnn48"
        and e["scenario"]["rate"] == 0.10
    )
    by = versions_by_approach(staircase)
    ks = list(range(len(by["baseline"])))
    ax.plot(ks, [v["recover_ms"] for v in by["baseline"]], "o-", color=COLORS["baseline"], label="Baseline", ms=3)
    ax.plot(
        ks,
        [v["recover_ms"] for v in by["update"]],
        "o-",
        color=COLORS["update"],
        label="Update, bounded (mmpack)",
        ms=3,
    )
    rec = [(k, v["recover_recursive_ms"]) for k, v in enumerate(by["update"]) if v["recover_recursive_ms"] is not None]
    ax.plot([k for k, _ in rec], [t for _, t in rec], "s--", color=COLORS["update"], alpha=0.6,
            label="Update, recursive (paper)")
    if "per-model" in by:
        ax.plot(
            ks, [v["recover_ms"] for v in by["per-model"]], "-", color=COLORS["per-model"], label=LABELS["per-model"]
        )
    trained = next(
        (
            e
            for e in document["scenarios"]
            if e["scenario"]["workload"] == "battery" and e["scenario"]["arch"] == "ffnn48"
        ),
        None,
    )
    if trained is not None:
        prov = versions_by_approach(trained).get("provenance")
        if prov:
            ax.plot(range(len(prov)), [v["recover_fresh_ms"] for v in prov], "^-", color=COLORS["provenance"],
                    label="Provenance (retraining, trained cells)")
    ax.set_yscale("log")
    ax.set_xlabel("update cycles (U3) since the initial set (U1)", labelpad=2)
    ax.set_ylabel("time to recover the newest version (ms, log scale)")
    ax.set_title(
        "Median time to recover the newest version\nFFNN-48, 5,000 models, 10% retrained per cycle", fontsize=11
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(which="both", alpha=0.3)
    _legend_below(ax, 2, -0.13)
    fig.tight_layout()
    path = os.path.join(out, "fig5_time_to_recover.png")
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_all(document: dict[str, Any], out: str) -> list[str]:
    """Write the three figures into ``out``; return their paths."""
    return [plot_storage(document, out), plot_save_time(document, out), plot_recover_time(document, out)]

"""Markdown tables of an evaluation run, generated from its JSON (no figure is copied by hand).

    python -m mmpack.evaluation.summary docs/evaluation/paper.json                       # print them
    python -m mmpack.evaluation.summary docs/evaluation/paper.json --into docs/EVALUATION.md  # update the doc
"""

from __future__ import annotations

import json
import os
import statistics
from typing import Any

from mmpack.evaluation.document import versions_by_approach

NAMES = {"ffnn48": "FFNN-48", "ffnn69": "FFNN-69", "cnn": "CIFAR CNN"}
APPROACHES = ("per-model", "baseline", "update", "provenance")


def _median(versions: list[dict], key: str) -> float:
    return statistics.median(v[key] for v in versions)


def _scenario_title(entry: dict) -> str:
    s = entry["scenario"]
    trained = ", cells trained for real" if s["workload"] == "battery" else ""
    return (
        f"{NAMES[s['arch']]}, {entry['models']:,} models, {s['rate']:.0%} updated per cycle, "
        f"{s['cycles']} cycles{trained}"
    )


def _reduction(ours: float, reference: float) -> str:
    return f"{1 - ours / reference:.2%}"


def storage_table(document: dict[str, Any]) -> str:
    """Storage of U1 and of a U3 version per approach and scenario, with reductions against Baseline."""
    lines = [
        "| use case | approach | U1 MB | U3 MB (median) |"
        " U3 as a share of Baseline's | U1 saved against one file per model |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for entry in document["scenarios"]:
        by = versions_by_approach(entry)
        base_u3 = _median(by["baseline"][1:], "stored_bytes")
        per_model_u1 = by["per-model"][0]["stored_bytes"] if "per-model" in by else None
        for approach in APPROACHES:
            if approach not in by:
                continue
            versions = by[approach]
            u1, u3 = versions[0]["stored_bytes"], _median(versions[1:], "stored_bytes")
            saved = f"{_reduction(u1, per_model_u1)} less" if per_model_u1 and approach != "per-model" else ""
            lines.append(f"| {_scenario_title(entry)} | {approach} | {u1 / 1e6:.2f} | {u3 / 1e6:.3f} | "
                         f"{u3 / base_u3:.2%} | {saved} |")
    return "\n".join(lines)


def time_table(document: dict[str, Any]) -> str:
    """Median time to save U1 and U3 versions and to recover the newest one."""
    lines = ["| use case | approach | save U1 ms | save U3 ms | recover newest ms | recover 1 model ms | "
             "recover 1 model the newest cycle retrained ms |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for entry in document["scenarios"]:
        by = versions_by_approach(entry)
        for approach in APPROACHES:
            if approach not in by:
                continue
            v = by[approach]
            lines.append(
                f"| {_scenario_title(entry)} | {approach} | {v[0]['save_ms']:.1f} | "
                f"{_median(v[1:], 'save_ms'):.1f} | {v[-1]['recover_ms']:.1f} | {v[-1]['recover_one_model_ms']:.2f} | "
                f"{v[-1]['recover_changed_model_ms']:.2f} |"
            )
    return "\n".join(lines)


def staircase_table(document: dict[str, Any]) -> str:
    """Time to recover the newest version after k cycles: the paper's recursion against bounded recovery."""
    by = _find(document, "ffnn48")
    if by is None:
        return "(this run has no FFNN-48 scenario of 10% perturbed cycles)"
    reference = statistics.median(v["recover_ms"] for v in by["baseline"])
    lines = [f"Baseline versions recover in {reference:.1f} ms (median over all of them).", "",
             "| cycles k | Update, recursive (paper) ms | Update, bounded (mmpack) ms | bounded / Baseline |",
             "| ---: | ---: | ---: | ---: |"]
    for k, v in enumerate(by["update"]):
        if v["recover_recursive_ms"] is None:
            continue
        lines.append(
            f"| {k} | {v['recover_recursive_ms']:.1f} | {v['recover_ms']:.1f} | {v['recover_ms'] / reference:.2f}x |"
        )
    return "\n".join(lines)


def provenance_table(document: dict[str, Any]) -> str:
    """Provenance versions of the trained-cell scenarios: storage and recovery by retraining."""
    lines = ["| use case | cycle | stored bytes | of a Baseline version | save ms | recover ms, 1 worker | "
             "recover ms, all cores | speed-up | 1 retrained model ms |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for entry in document["scenarios"]:
        by = versions_by_approach(entry)
        if "provenance" not in by:
            continue
        full = by["baseline"][0]["stored_bytes"]
        for v in by["provenance"][1:]:
            lines.append(
                f"| {_scenario_title(entry)} | {v['step']} | {v['stored_bytes']:,} | {v['stored_bytes'] / full:.3%} | "
                f"{v['save_ms']:.1f} | {v['recover_one_worker_ms']:.0f} | {v['recover_fresh_ms']:.0f} | "
                f"{v['recover_one_worker_ms'] / v['recover_fresh_ms']:.2f}x | {v['recover_changed_model_ms']:.1f} |"
            )
    return "\n".join(lines)


def _find(document: dict[str, Any], arch: str, rate: float = 0.10, workload: str = "perturbed") -> dict | None:
    for entry in document["scenarios"]:
        s = entry["scenario"]
        if (s["arch"], s["rate"], s["workload"]) == (arch, rate, workload):
            return versions_by_approach(entry)
    return None


def paper_table(document: dict[str, Any]) -> str:
    """The paper's reported figures (its server setup, MMLib-base as the per-model reference) beside ours."""
    rows: list[tuple[str, str, str]] = []
    ffnn = _find(document, "ffnn48")
    if ffnn is not None:
        full, per_model = ffnn["baseline"][0]["stored_bytes"], ffnn["per-model"][0]["stored_bytes"]
        update_u3 = _median(ffnn["update"][1:], "stored_bytes")
        baseline_recover = statistics.median(v["recover_ms"] for v in ffnn["baseline"])
        rows += [
            ("U1 storage, Baseline vs one file per model", "29% less", _reduction(full, per_model) + " less"),
            ("U3 storage, Update vs Baseline (10% updated)", "86% less", _reduction(update_u3, full) + " less"),
            ("U3 storage, Update vs one file per model", "90% less", _reduction(update_u3, per_model) + " less"),
            (
                "U1 time to save, one file per model / Baseline",
                "over 10x",
                f"{ffnn['per-model'][0]['save_ms'] / ffnn['baseline'][0]['save_ms']:.0f}x",
            ),
            (
                "U1 time to recover, one file per model / Baseline",
                "over 10x",
                f"{ffnn['per-model'][0]['recover_ms'] / baseline_recover:.0f}x",
            ),
        ]
        update = ffnn["update"]
        deepest = max(k for k, v in enumerate(update) if v["recover_recursive_ms"] is not None)
        rows += [
            (
                f"Update: time to recover after {deepest} cycles / after 1 (recursive replay)",
                "a staircase, one step per cycle",
                f"{update[deepest]['recover_recursive_ms'] / update[1]['recover_recursive_ms']:.2f}x",
            ),
            (
                "Update: the same with bounded recovery (mmpack)",
                "-",
                f"{update[deepest]['recover_ms'] / update[1]['recover_ms']:.2f}x",
            ),
        ]
    trained = _find(document, "ffnn48", workload="battery")
    if trained is not None and "provenance" in trained:
        full, prov = trained["baseline"][0]["stored_bytes"], trained["provenance"]
        rows.append(
            ("U3 storage, Provenance vs Baseline", "99.84% less", _reduction(prov[1]["stored_bytes"], full) + " less")
        )
        if "per-model" in trained:
            rows.append(("U3 storage, Provenance vs one file per model", "99.89% less",
                         _reduction(prov[1]["stored_bytes"], trained["per-model"][0]["stored_bytes"]) + " less"))
        steps = " / ".join(f"{v['recover_fresh_ms'] / 1e3:.1f} s" for v in prov[1:])
        rows.append((f"Provenance: time to recover after 1..{len(prov) - 1} cycles (all cores)",
                     "about 6 h / 12 h / 18 h (its extensive training, one model after another)", steps))
    wide = _find(document, "ffnn69")
    if ffnn is not None and wide is not None:
        rows.append(("FFNN-69 / FFNN-48 storage, Baseline", "about 2.0x",
                     f"{wide['baseline'][0]['stored_bytes'] / ffnn['baseline'][0]['stored_bytes']:.2f}x"))
        rows.append(("FFNN-69 / FFNN-48 storage, one file per model", "1.7x (MMLib-base)",
                     f"{wide['per-model'][0]['stored_bytes'] / ffnn['per-model'][0]['stored_bytes']:.2f}x"))
    lines = ["| figure | paper (MMLib-base as the per-model reference) | measured here |", "| --- | --- | ---: |"]
    lines += [f"| {figure} | {paper} | {ours} |" for figure, paper, ours in rows]
    return "\n".join(lines)


BEGIN = "<!-- generated by `python -m mmpack.evaluation.summary` from docs/evaluation/paper.json: do not edit -->"
END = "<!-- end of generated figures -->"


def summary(document: dict[str, Any]) -> str:
    """All tables, with the machine and the number of runs."""
    return "\n\n".join([
        f"Written by `mmpack bench paper --full --runs {document['runs']} --out docs/evaluation` on: "
        f"{document['machine']}. Times are medians over the runs; storage is exact.",
        "### The paper's figures beside ours", paper_table(document),
        "### Storage per version (Figure 3)", storage_table(document),
        "### Time to save and to recover (Figure 4)", time_table(document),
        "### Time to recover over update cycles (Figure 5)", staircase_table(document),
        "### Provenance", provenance_table(document),
    ])


def approaches_table(document: dict[str, Any]) -> str:
    """The README's comparison: each approach on 5,000 FFNN-48 cells, 10% retrained per cycle."""
    perturbed, trained = _find(document, "ffnn48"), _find(document, "ffnn48", workload="battery")
    if perturbed is None:
        return ""
    lines = ["| approach | stored per update cycle | time to save it | time to recover the newest version | "
             "one model that cycle retrained |", "| --- | ---: | ---: | ---: | ---: |"]
    rows = [("one file per model (reference)", perturbed["per-model"][1:]), ("Baseline", perturbed["baseline"][1:]),
            ("Update", perturbed["update"][1:])]
    for name, versions in rows:
        lines.append(
            f"| {name} | {_median(versions, 'stored_bytes') / 1e6:.1f} MB | {_median(versions, 'save_ms'):.0f} ms "
            f"| {versions[-1]['recover_ms']:.0f} ms after {len(versions)} cycles "
            f"| {versions[-1]['recover_changed_model_ms']:.1f} ms |"
        )
    if trained is not None and "provenance" in trained:
        versions = trained["provenance"][1:]
        lines.append(f"| Provenance (cells trained for real) | {_median(versions, 'stored_bytes') / 1e3:.0f} kB "
                     f"| {_median(versions, 'save_ms'):.0f} ms | {versions[-1]['recover_fresh_ms'] / 1e3:.1f} s after "
                     f"{len(versions)} cycles (retraining) | {versions[-1]['recover_changed_model_ms']:.0f} ms |")
    return "\n".join(lines)


GENERATED = {"EVALUATION.md": summary, "README.md": approaches_table}


def replace_generated(text: str, content: str) -> str:
    """``text`` with what stands between the BEGIN and END markers replaced by ``content``."""
    head, begin, rest = text.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise ValueError("the document has no generated section: add the BEGIN and END marker lines")
    return f"{head}{BEGIN}\n\n{content}\n\n{END}{tail}"


def main(argv: list[str] | None = None) -> None:
    """``summary paper.json`` prints the tables; ``--into FILE`` rewrites FILE's generated section
    (EVALUATION.md gets every table, README.md the comparison of approaches)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mmpack.evaluation.summary", description=__doc__.splitlines()[0])
    parser.add_argument("json", help="the paper.json an evaluation run wrote")
    parser.add_argument("--into", action="append", default=[], help="a Markdown file with BEGIN/END markers to update")
    args = parser.parse_args(argv)
    with open(args.json) as f:
        document = json.load(f)
    if not args.into:
        print(summary(document))
    for path in args.into:
        make = GENERATED.get(os.path.basename(path), summary)
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(replace_generated(text, make(document)))


if __name__ == "__main__":
    main()

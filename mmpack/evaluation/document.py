"""The shape of an evaluation document (paper.json), shared by the run, its plots and its summary."""

from __future__ import annotations


def versions_by_approach(entry: dict) -> dict[str, list[dict]]:
    """``{approach: [figures of each version]}`` of one scenario of an evaluation document."""
    return {r["approach"]: r["versions"] for r in entry["results"]}

"""docs/EVALUATION.md shows the committed evaluation run, figure for figure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmpack.evaluation.summary import GENERATED, replace_generated

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


@pytest.mark.parametrize("doc", [DOCS / "EVALUATION.md", ROOT / "README.md"], ids=lambda p: p.name)
def test_the_docs_quote_the_committed_run_unchanged(doc):
    document = json.loads((DOCS / "evaluation" / "paper.json").read_text())
    text = doc.read_text()
    assert replace_generated(text, GENERATED[doc.name](document)) == text, (
        "regenerate: python -m mmpack.evaluation.summary docs/evaluation/paper.json "
        "--into docs/EVALUATION.md --into README.md")


@pytest.mark.parametrize("plot", ["fig3_storage.png", "fig4_time_to_save.png", "fig5_time_to_recover.png"])
def test_the_evaluation_doc_shows_the_committed_plots(plot):
    assert (DOCS / "evaluation" / plot).stat().st_size > 10_000
    assert f"(evaluation/{plot})" in (DOCS / "EVALUATION.md").read_text()


def test_a_document_without_markers_is_refused():
    with pytest.raises(ValueError, match="no generated section"):
        replace_generated("# no markers\n", "figures")

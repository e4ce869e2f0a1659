"""The README's example runs as written."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_opens_with_the_two_commands():
    commands = [line.strip() for line in README.read_text().splitlines() if line.startswith("    ")][:2]
    assert commands == ['pip install torch==2.13.0 . && mmpack demo',
                        'pip install torch==2.13.0 ".[test,s3]" && ruff check mmpack tests bench && pytest']


def test_the_readme_example_runs(tmp_path, monkeypatch):
    example = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert len(example.splitlines()) <= 16
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    namespace: dict = {}
    with contextlib.redirect_stdout(printed):
        exec(compile(example, str(README), "exec"), namespace)
    full, update = map(int, printed.getvalue().split())
    assert full > 100e6 * 0.99 and update < full * 0.01
    two, models = namespace["two"], namespace["models"]
    assert len(two) == 2 and all(
        (p == q).all()
        for i, cell in zip((3, 17), namespace["cells"])
        for p, q in zip(cell.parameters(), models[i].parameters())
    )

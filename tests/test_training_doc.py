"""docs/TRAINING.md's code runs as written, in order, and does what the guide says."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import torch

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "TRAINING.md"


def test_the_training_guide_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.S)
    assert len(blocks) == 5
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for block in blocks:
            exec(compile(block, str(GUIDE), "exec"), namespace)
    lines = printed.getvalue().splitlines()
    assert lines[-2:] == ["update [3, 17, 256]", "5 True"]
    repo, fleet = namespace["repo"], namespace["fleet"]
    versions = repo.versions()
    assert len(versions) == 3 and versions[-1].message == "checkpoint epoch 4"
    model_17 = repo.recover(namespace["before"], indices=[17])
    assert fleet.select([17]).equal(model_17)
    tuned = repo.recover(namespace["record"].id, indices=[3, 256])
    assert fleet.select([3, 256]).equal(tuned) and not model_17.equal(repo.recover(namespace["record"].id, [17]))
    assert all(t.data_ptr() == namespace["params"][n].data_ptr() for n, t in fleet.params.items())
    assert torch.equal(namespace["new_params"]["fc2.weight"], fleet.tensors["fc2.weight"])
    namespace["repo"].close()

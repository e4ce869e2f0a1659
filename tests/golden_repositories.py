"""Deterministic repositories behind the committed golden repositories (tests/golden/repo_*).

Each golden repository holds every kind of version its format version can
store: a Baseline, an Update, a compressed Update with XOR deltas, a
Provenance version (its datasets live in the repository folder under
``datasets/``, referenced by relative paths, so recovering it needs the
repository folder as the working directory), and a compressed Baseline.
The values are those of ``golden_sets`` (integer arithmetic), so the
expected models can be rebuilt anywhere. Object keys and creation times are
whatever the writer picked: the tests check the records' stable fields.

Format 2 golden repositories also hold tags: ``production`` moved back and
forth between v3 and v5 (:data:`TAG_MOVES` times, so the log passes its first
checkpoint), and ``canary`` set on v4, then removed.

``repo_format2_shards`` is written with shards of :data:`SHARD_BYTES` bytes
(catalog documents of version 2): its Baselines are a shard per model, its
Updates two shards each.

Regenerate only when adding a new repository or manifest format version, with
the mmpack release that writes it, into a new folder::

    python tests/golden_repositories.py tests/golden/repo_<name> [--shard-bytes N]
"""

from __future__ import annotations

import io
import pathlib
import sys

import numpy as np
import torch

from mmpack import Compression, DatasetRef, ModelSet, Provenance, Repository

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from golden_sets import golden_v1_modelset  # noqa: E402

N_MODELS = 12
TAG_MOVES = 30
RETRAINED = (2, 7)  # the models the provenance version retrains
SHARD_BYTES = 100  # repo_format2_shards: a golden model is 120 bytes, its updates change 56 or 64


def golden_train(models: ModelSet, datasets: list, kinds: list, config: dict, model_ids: np.ndarray) -> ModelSet:
    """The golden provenance version's 'training': adds each model's dataset to its fc.weight."""
    tensors = {name: t.clone() for name, t in models.tensors.items()}
    for row, data in enumerate(datasets):
        tensors["fc.weight"][row] += torch.from_numpy(np.asarray(data, dtype=np.float32)) * config["rate"]
    return ModelSet(models.architecture, tensors)


def golden_dataset(model: int) -> np.ndarray:
    return ((np.arange(12, dtype=np.float32).reshape(4, 3) + model) % 5 - 2) / 4


def golden_history() -> list[ModelSet]:
    """The model sets of versions v1..v5, in order."""
    v1 = golden_v1_modelset(N_MODELS)
    v2 = _nudged(v1, [1, 4, 9], ["fc.weight", "fc.bias"], 0.5)
    v3 = _nudged(v2, [4, 5, 11], ["emb", "scale", "precise", "bn.num_batches_tracked", "mask"], 1.0)
    v4 = golden_train(
        v3.select(list(RETRAINED)), [golden_dataset(m) for m in RETRAINED], [], {"rate": 0.5}, np.array(RETRAINED)
    )
    tensors = {name: t.clone() for name, t in v3.tensors.items()}
    tensors["fc.weight"][list(RETRAINED)] = v4.tensors["fc.weight"]
    v4 = ModelSet(v3.architecture, tensors)
    v5 = _nudged(v4, list(range(0, N_MODELS, 2)), list(v4.architecture.names), 2.0)
    return [v1, v2, v3, v4, v5]


def _nudged(ms: ModelSet, models: list[int], names: list[str], step: float) -> ModelSet:
    tensors = {name: t.clone() for name, t in ms.tensors.items()}
    for name in names:
        t = tensors[name]
        if t.dtype == torch.bool:
            t[models] = ~t[models]
        elif t.dtype.is_floating_point:
            t[models] = (t[models].to(torch.float64) + step).to(t.dtype)
        else:
            t[models] += int(step * 3)
    return ModelSet(ms.architecture, tensors)


def write(folder: pathlib.Path, shard_bytes: int | None = None) -> None:
    sets = golden_history()
    repo = Repository(folder, shard_bytes=shard_bytes) if shard_bytes else Repository(folder)
    v1 = repo.save(sets[0], message="golden baseline")
    v2 = repo.save(sets[1], approach="update", base=v1, message="golden update")
    xor = Compression(codec="zstd", chunk_bytes=64)  # the committed golden repositories hold zstd objects
    v3 = repo.save(sets[2], approach="update", base=v2, message="golden xor update", compression=xor)
    (folder / "datasets").mkdir()
    updates = {}
    for m in RETRAINED:
        buffer = io.BytesIO()
        np.save(buffer, golden_dataset(m), allow_pickle=False)
        (folder / "datasets" / f"m{m}.npy").write_bytes(buffer.getvalue())
        updates[m] = (DatasetRef.of_bytes(f"datasets/m{m}.npy", buffer.getvalue()), "full")
    provenance = Provenance(
        f"{__name__}:golden_train" if __name__ != "__main__" else "golden_repositories:golden_train",
        "0" * 16,
        {"rate": 0.5},
        updates,
    )
    v4 = repo.save(sets[3], approach="provenance", base=v3, provenance=provenance, message="golden provenance")
    repo.save(sets[4], message="golden compressed baseline", compression="zstd")
    assert [v1, v2, v3, v4] == ["v1", "v2", "v3", "v4"]
    if getattr(repo, "format_version", 1) >= 2:
        for move in range(TAG_MOVES):
            repo.tag("production", ("v3", "v5")[move % 2], message=f"move {move}")
        repo.tag("canary", "v4")
        repo.untag("canary", expected="v4", message="rolled back")


if __name__ == "__main__":
    target = pathlib.Path(sys.argv[1])
    if target.exists():
        sys.exit(f"{target} exists: golden repositories are written once")
    write(target, int(sys.argv[3]) if sys.argv[2:3] == ["--shard-bytes"] else None)

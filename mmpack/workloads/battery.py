"""A battery-cell workload with real data and real training, generated locally.

Every cell of a pack gets its own FFNN-48 that predicts the cell's terminal
voltage from current, temperature, state of charge and two current-history
features (section 4.1 of the paper). The data comes from a second-order
equivalent-circuit model (open-circuit voltage as a function of charge, a
series resistance, two RC pairs, a lumped thermal model) driven by synthetic
drive cycles, with per-cell parameter spread, a state of health that drops
every update cycle, and measurement noise. Datasets are files in a data
directory outside the repository, each identified by path and content hash.

Training is written so that a model's result does not depend on which other
models share its batch, or how many threads run it: every model draws its
own minibatches from a counter-based generator keyed by its cell id,
gradients are computed by hand with matmuls that contract over features
only (autograd's weight gradients contract over samples with kernels that
change with the batch), Adam is a sequence of single element-wise
operations, and one model alone is padded to a batch of two. A model
retrained alone during provenance recovery therefore hashes exactly as when
the fleet was trained together; the stored hashes prove it every time.

Example::

    fleet = BatteryFleet(5000, "data/")
    ms, refs = fleet.initial_models()
    ms2, provenance = fleet.update_cycle(ms, cycle=1, fraction=0.10)
"""

from __future__ import annotations

import io
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mmpack.architecture import Architecture
from mmpack.modelset import ModelSet
from mmpack.provenance import DatasetRef, Provenance, UpdateKind
from mmpack.workloads.models import FFNN

__all__ = [
    "FEATURES",
    "BatteryFleet",
    "TrainingConfig",
    "cell_parameters",
    "finetune",
    "generate_dataset",
    "generate_datasets",
    "initial_weights",
    "load_dataset",
    "train",
]

FEATURES = ("current_a", "temperature_c", "state_of_charge", "current_ema_30s_a", "current_ema_300s_a")

# Fixed normalisation (not fitted per dataset): every model sees the same scale.
_INPUT_MEAN = np.array([2.0, 30.0, 0.5, 2.0, 2.0], dtype=np.float32)
_INPUT_SCALE = np.array([4.0, 10.0, 0.3, 3.0, 2.0], dtype=np.float32)
_VOLTAGE_MEAN, _VOLTAGE_SCALE = np.float32(3.6), np.float32(0.4)

SAMPLES = 512  # one drive cycle of 512 one-second steps per dataset
_DT = 1.0
_PARTIAL_TRAINABLE = ("fc3.", "fc4.")  # a partial update retrains the last layers only


@dataclass(frozen=True)
class CellParameters:
    """One cell's equivalent-circuit parameters (nominal, before ageing)."""

    capacity_ah: float
    r0_ohm: float
    r1_ohm: float
    tau1_s: float
    r2_ohm: float
    tau2_s: float
    ocv_offset_v: float
    heat_capacity: float
    ageing_rate: float


def cell_parameters(cell_id: int, seed: int = 0) -> CellParameters:
    """cell_parameters(cell_id, seed=0) -> CellParameters: a cell of an 18650-like pack, with spread."""
    rng = np.random.default_rng([seed, cell_id, 1])
    return CellParameters(
        capacity_ah=3.0 * rng.normal(1.0, 0.03),
        r0_ohm=0.030 * rng.normal(1.0, 0.08),
        r1_ohm=0.015 * rng.normal(1.0, 0.10),
        tau1_s=20.0 * rng.normal(1.0, 0.10),
        r2_ohm=0.020 * rng.normal(1.0, 0.10),
        tau2_s=400.0 * rng.normal(1.0, 0.10),
        ocv_offset_v=rng.normal(0.0, 0.01),
        heat_capacity=40.0 * rng.normal(1.0, 0.05),
        ageing_rate=0.02 * rng.uniform(0.6, 1.4),
    )


def _ocv(soc: np.ndarray) -> np.ndarray:
    """Open-circuit voltage of a Li-ion cell as a function of state of charge."""
    soc = np.clip(soc, 1e-3, 1.0)
    return 3.3 + 0.75 * soc - 0.25 * np.exp(-20.0 * soc) + 0.12 * soc**3 + 0.02 * np.log(soc)


def _drive_cycle(rng: np.random.Generator, steps: int) -> np.ndarray:
    """A synthetic drive cycle for one cell: accelerations, cruising, regeneration and stops (A)."""
    current = np.empty(steps)
    t = 0
    while t < steps:
        length = int(rng.integers(10, 60))
        phase = rng.choice(4, p=[0.25, 0.4, 0.2, 0.15])
        level = (rng.uniform(4.0, 10.0), rng.uniform(1.0, 3.5), -rng.uniform(1.0, 4.0), 0.0)[phase]
        ramp = np.linspace(0.0, 1.0, length) if phase == 0 else np.ones(length)
        current[t : t + length] = (level * ramp)[: steps - t]
        t += length
    return current + rng.normal(0.0, 0.1, steps)


def generate_datasets(cell_ids: np.ndarray, cycle: int, seed: int = 0) -> np.ndarray:
    """generate_datasets(cell_ids, cycle, seed=0) -> float32 [n_cells, SAMPLES, 6]

    Normalised inputs (:data:`FEATURES`), then the normalised terminal
    voltage. ``cycle`` 0 is the new pack; in each later cycle the cell has
    aged (state of health down by its ageing rate) and drives a new cycle.
    All cells are simulated together, one vector step per second.
    """
    cells = [cell_parameters(int(c), seed) for c in cell_ids]
    rngs = [np.random.default_rng([seed, int(c), 2, cycle]) for c in cell_ids]
    n = len(cells)
    field = lambda name: np.array([getattr(p, name) for p in cells])  # noqa: E731
    health = np.maximum(0.6, 1.0 - field("ageing_rate") * cycle)
    capacity = field("capacity_ah") * health
    r0 = field("r0_ohm") * (1.0 + 1.5 * (1.0 - health))
    r1, r2, heat, offsets = field("r1_ohm"), field("r2_ohm"), field("heat_capacity"), field("ocv_offset_v")
    a1, a2 = np.exp(-_DT / field("tau1_s")), np.exp(-_DT / field("tau2_s"))
    current = np.stack([_drive_cycle(rng, SAMPLES) for rng in rngs]) if n else np.empty((0, SAMPLES))
    state = np.array([rng.uniform(0.6, 1.0) for rng in rngs])
    temp = np.array([rng.uniform(18.0, 32.0) for rng in rngs])
    ambient = temp.copy()
    v1 = np.zeros(n)
    v2 = np.zeros(n)
    fast = current[:, 0].copy()
    slow = current[:, 0].copy()
    raw = np.empty((n, SAMPLES, 6))
    for k in range(SAMPLES):
        i = current[:, k]
        v1 = a1 * v1 + r1 * (1.0 - a1) * i
        v2 = a2 * v2 + r2 * (1.0 - a2) * i
        fast += (_DT / 30.0) * (i - fast)
        slow += (_DT / 300.0) * (i - slow)
        voltage = _ocv(state) + offsets - i * r0 - v1 - v2
        raw[:, k] = np.stack([i, temp, state, fast, slow, voltage], axis=1)
        state = np.maximum(0.0, state - i * _DT / (3600.0 * capacity))
        temp = temp + _DT * (i * i * r0 - 0.05 * (temp - ambient)) / heat
    raw += (
        np.stack([rng.normal(0.0, [0.02, 0.2, 0.002, 0.02, 0.02, 0.002], (SAMPLES, 6)) for rng in rngs]) if n else 0.0
    )
    out = np.empty((n, SAMPLES, 6), dtype=np.float32)
    out[..., :5] = (raw[..., :5] - _INPUT_MEAN) / _INPUT_SCALE
    out[..., 5] = (raw[..., 5] - _VOLTAGE_MEAN) / _VOLTAGE_SCALE
    return out


def generate_dataset(cell_id: int, cycle: int, seed: int = 0) -> np.ndarray:
    """generate_dataset(cell_id, cycle, seed=0) -> float32 [SAMPLES, 6]: one cell's data (see generate_datasets)."""
    return generate_datasets(np.array([cell_id]), cycle, seed)[0]


def write_dataset(data: np.ndarray, path: str | os.PathLike[str]) -> DatasetRef:
    """Write a dataset as a .npy file (never pickled) and return its reference (path, size, content hash)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(data, dtype=np.float32), allow_pickle=False)
    content = buffer.getvalue()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = f"{path}.partial"
    with open(temporary, "wb") as f:
        f.write(content)
    os.replace(temporary, path)
    return DatasetRef.of_bytes(os.path.abspath(path), content)


def load_dataset(ref: DatasetRef) -> np.ndarray:
    """The dataset behind ``ref``, after checking its size and content hash (see DatasetRef.read)."""
    return np.load(io.BytesIO(ref.read()), allow_pickle=False)


@dataclass(frozen=True)
class TrainingConfig:
    """Hyper-parameters of :func:`train`; part of every provenance record."""

    steps: int = 40
    batch: int = 32
    learning_rate: float = 5e-3
    seed: int = 0
    threads: int = 1

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainingConfig:
        return cls(**data)


def train(
    models: ModelSet,
    datasets: list[np.ndarray],
    cell_ids: np.ndarray,
    config: TrainingConfig,
    trainable: tuple[str, ...] | None = None,
) -> ModelSet:
    """train(models, datasets, cell_ids, config, trainable=None) -> ModelSet

    Adam on each model's own dataset, models batched in groups (large
    enough to amortise Python, small enough that the temporaries stay in
    reused memory instead of fresh pages every step).
    Only tensors whose names start with a prefix in ``trainable`` change
    (all when None). Results depend only on each model's weights, dataset,
    cell id and ``config``, not on the grouping or the thread count (see the
    module doc), so how models are split never shows in the weights.

    Example::

        trained = train(ms, [generate_dataset(c, 0) for c in ids], ids, TrainingConfig())
    """
    n = len(models)
    if n == 0:
        return models
    names = [s.name for s in models.architecture.tensors if s.kind == "parameter"]
    learn = [k for k in names if trainable is None or k.startswith(trainable)]
    cell_ids = np.asarray(cell_ids, dtype=np.uint64)
    result = {k: t.clone() for k, t in models.tensors.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    group_size = _group_size(models.architecture, config.batch)
    try:
        for start in range(0, n, group_size):
            group = np.arange(start, min(n, start + group_size))
            trained = _train_group(models, datasets, cell_ids, group, names, learn, config)
            for k in learn:
                result[k][start : start + len(group)] = trained[k].to(result[k].dtype)
    finally:
        torch.set_num_threads(threads)
    return ModelSet(models.architecture, result)


_LAYERS = ("fc1", "fc2", "fc3", "fc4")
_TEMPORARY_BYTES = 5 << 19  # 2.5 MiB


def _group_size(architecture: Architecture, batch: int) -> int:
    """Models per group: as many as keep the largest per-step temporary (a weight gradient's
    per-sample products) near one core's L2 cache (2.5 MiB: 8 FFNN-48 models), between 8 and 128.

    The steps are memory-bound. Measured on FFNN-48, one thread per process: 500 models alone
    take 2.3 s in groups of 8, 1.7-2.4 s in groups of 21, 3.5 s in groups of 64, 8.7 s in
    groups of 128; two processes of 250 models each side by side finish in 1.2 s with groups of
    8 (1.87x the throughput of one) but 1.6-2.4 s with groups of 21, whose temporaries crowd
    the shared cache. Fewer than 8 models cost more in Python (4: 3.2 s). The weights do not
    depend on the grouping (checked bit for bit).
    """
    largest = max(spec.numel for spec in architecture.tensors)
    return int(np.clip(_TEMPORARY_BYTES // max(1, batch * largest * 4), 8, 128))


def _train_group(
    models: ModelSet,
    datasets: list[np.ndarray],
    cell_ids: np.ndarray,
    group: np.ndarray,
    names: list[str],
    learn: list[str],
    config: TrainingConfig,
) -> dict[str, torch.Tensor]:
    # A lone model is trained beside a copy of itself: batched matmuls over one matrix take other kernels.
    index = np.repeat(group, 2) if len(group) == 1 else group
    data = torch.from_numpy(np.stack([datasets[i] for i in index]))
    ids = cell_ids[index]
    rows_index = torch.from_numpy(index)
    weights = {k: models.tensors[k][rows_index].clone().float() for k in names}
    first = {k: torch.zeros_like(weights[k]) for k in learn}
    second = {k: torch.zeros_like(weights[k]) for k in learn}
    scratch = {k: torch.empty_like(weights[k]) for k in learn}
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for step in range(1, config.steps + 1):
        rows = torch.from_numpy(_minibatch(ids, step, config.seed, config.batch, data.shape[1]))
        batch = torch.gather(data, 1, rows[..., None].expand(-1, -1, data.shape[2]))
        g = _gradients(weights, batch[..., :5], batch[..., 5:], set(learn))
        correction1, correction2 = 1 - beta1**step, 1 - beta2**step
        for k in learn:
            # Adam as single, correctly rounded operations, in place. Fused kernels (torch's
            # fused Adam, add with alpha) use FMA in their vector body but not in the scalar
            # tail, so an element's result would depend on where it falls in the tensor,
            # that is on the batch and the thread split.
            square = torch.mul(g[k], g[k], out=scratch[k]).mul_(1 - beta2)
            second[k].mul_(beta2).add_(square)
            first[k].mul_(beta1).add_(g[k].mul_(1 - beta1))
            denominator = torch.div(second[k], correction2, out=scratch[k]).sqrt_().add_(eps)
            update = torch.div(first[k], correction1, out=g[k]).div_(denominator).mul_(config.learning_rate)
            weights[k].sub_(update)
    keep = slice(0, 1) if len(group) == 1 else slice(None)
    return {k: weights[k][keep] for k in learn}


def _gradients(
    w: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, wanted: set[str]
) -> dict[str, torch.Tensor]:
    """Gradients of the mean squared error of every model in the group, by hand.

    Autograd's weight gradients are batched matmuls contracting over the
    samples, and their kernels change with the number and position of the
    models in the batch (seen for FFNN-69). Here every matmul contracts over
    features, like the forward pass (tested independent of the batch), and a
    weight gradient is an element-wise product summed over the samples, in
    sample order. Only the layers down to the first wanted one are walked.
    """
    inputs, pre = [x], []
    h = x
    for i, layer in enumerate(_LAYERS):
        a = torch.bmm(h, w[f"{layer}.weight"].transpose(1, 2))
        if f"{layer}.bias" in w:
            a = a + w[f"{layer}.bias"][:, None, :]
        pre.append(a)
        h = torch.relu(a) if i < len(_LAYERS) - 1 else a
        inputs.append(h)
    delta = (h - y) * (2.0 / x.shape[1])
    lowest = min(i for i, layer in enumerate(_LAYERS) if any(k.startswith(layer + ".") for k in wanted))
    grads: dict[str, torch.Tensor] = {}
    for i in range(len(_LAYERS) - 1, lowest - 1, -1):
        layer = _LAYERS[i]
        if i < len(_LAYERS) - 1:
            delta = delta * (pre[i] > 0)
        grads[f"{layer}.weight"] = (delta.unsqueeze(-1) * inputs[i].unsqueeze(-2)).sum(1)
        if f"{layer}.bias" in w:
            grads[f"{layer}.bias"] = delta.sum(1)
        if i > lowest:
            delta = torch.bmm(delta, w[f"{layer}.weight"])
    return grads


def finetune(
    models: ModelSet, datasets: list[np.ndarray], kinds: list[UpdateKind], config: dict[str, Any], cell_ids: np.ndarray
) -> ModelSet:
    """finetune(models, datasets, kinds, config, cell_ids) -> ModelSet

    The training function of the battery workload's update cycles, as
    provenance records it: each model is fine-tuned on its dataset, every
    layer for a ``"full"`` update, only fc3 and fc4 for a ``"partial"`` one.

    Example::

        new = finetune(old, [load_dataset(r) for r in refs], ["full"] * len(refs), cfg.to_json(), ids)
    """
    settings = TrainingConfig.from_json(config)
    kinds_array = np.asarray(kinds)
    result = {name: t.clone() for name, t in models.tensors.items()}
    for kind, trainable in (("full", None), ("partial", _PARTIAL_TRAINABLE)):
        chosen = np.flatnonzero(kinds_array == kind)
        if len(chosen) == 0:
            continue
        trained = train(
            models.select(chosen), [datasets[i] for i in chosen], np.asarray(cell_ids)[chosen], settings, trainable
        )
        for name, t in trained.tensors.items():
            result[name][torch.from_numpy(chosen)] = t
    return ModelSet(models.architecture, result)


def _minibatch(cell_ids: np.ndarray, step: int, seed: int, size: int, samples: int) -> np.ndarray:
    """Sample rows for every model at ``step``: a function of (seed, cell id, step) only.

    A counter-based hash (SplitMix64 finaliser) instead of a stateful
    generator, so no model's draw depends on which models share its batch.
    """
    with np.errstate(over="ignore"):
        key = cell_ids * np.uint64(0x9E3779B97F4A7C15) + np.uint64(step) * np.uint64(0xBF58476D1CE4E5B9)
        key ^= np.uint64(seed) * np.uint64(0x94D049BB133111EB)
        counters = key[:, None] + np.arange(size, dtype=np.uint64)[None, :] * np.uint64(0xD6E8FEB86659FD93)
        z = counters
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return (z % np.uint64(samples)).astype(np.int64)


def initial_weights(n_models: int, hidden: int = 48, seed: int = 0) -> ModelSet:
    """initial_weights(n_models, hidden=48, seed=0) -> ModelSet of freshly initialised FFNNs.

    The same distribution as ``nn.Linear``'s default initialisation
    (uniform in +-1/sqrt(fan_in)), drawn directly into stacked tensors:
    building thousands of modules to throw them away costs seconds.
    """
    architecture = Architecture.from_module(FFNN(hidden).to("meta"))
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for spec in architecture.tensors:
        fan_in = spec.shape[1] if len(spec.shape) == 2 else {"fc2": hidden, "fc3": hidden, "fc4": hidden}[spec.name[:3]]
        bound = 1.0 / math.sqrt(fan_in)
        tensors[spec.name] = (torch.rand((n_models, *spec.shape), generator=generator) * 2 - 1) * bound
    return ModelSet(architecture, tensors)



class BatteryFleet:
    """BatteryFleet(n_cells, data_dir, seed=0, config=TrainingConfig())

    The paper's scenario end to end: initial per-cell models trained on each
    cell's first drive cycle, then update cycles in which aged cells get new
    data and are retrained fully or partially, each cycle recorded as
    :class:`~mmpack.Provenance`.

    Example::

        fleet = BatteryFleet(100, "data/")
        ms, _ = fleet.initial_models()
        ms2, prov = fleet.update_cycle(ms, cycle=1, fraction=0.1)
        repo.save(ms2, approach="provenance", base=v1, provenance=prov)
    """

    def __init__(self, n_cells: int, data_dir: str | os.PathLike[str], seed: int = 0,
                 config: TrainingConfig | None = None, initial_steps: int = 40, hidden: int = 48) -> None:
        self.n_cells = n_cells
        self.hidden = hidden
        self.data_dir = os.fspath(data_dir)
        self.seed = seed
        self.config = config or TrainingConfig(seed=seed)
        self.initial_steps = initial_steps

    def dataset_path(self, cell: int, cycle: int) -> str:
        return os.path.join(self.data_dir, f"cycle{cycle:03d}", f"cell{cell:06d}.npy")

    def datasets(self, cells: np.ndarray, cycle: int) -> tuple[list[np.ndarray], list[DatasetRef]]:
        """Generate and write the datasets of ``cells`` for ``cycle``."""
        arrays = list(generate_datasets(cells, cycle, self.seed))
        refs = [write_dataset(a, self.dataset_path(int(c), cycle)) for a, c in zip(arrays, cells)]
        return arrays, refs

    def initial_models(self) -> tuple[ModelSet, list[DatasetRef]]:
        """Fresh models for every cell, trained on the cell's cycle-0 data."""
        cells = np.arange(self.n_cells)
        arrays, refs = self.datasets(cells, 0)
        start = initial_weights(self.n_cells, self.hidden, self.seed)
        config = TrainingConfig(steps=self.initial_steps, batch=16, learning_rate=1e-2, seed=self.seed,
                                threads=torch.get_num_threads())
        return train(start, arrays, cells, config), refs

    def update_cycle(self, models: ModelSet, cycle: int, fraction: float = 0.10) -> tuple[ModelSet, Provenance]:
        """Retrain ``fraction`` of the cells on their aged data: half fully, half partially."""
        rng = np.random.default_rng([self.seed, cycle, 3])
        chosen = np.sort(rng.choice(self.n_cells, int(round(fraction * self.n_cells)), replace=False))
        kinds: list[UpdateKind] = ["full" if k % 2 == 0 else "partial" for k in range(len(chosen))]
        arrays, refs = self.datasets(chosen, cycle)
        config = self.config.to_json()
        started = time.perf_counter()
        updated = finetune(models.select(chosen), arrays, kinds, config, chosen)
        seconds = time.perf_counter() - started
        tensors = {name: t.clone() for name, t in models.tensors.items()}
        for name, t in updated.tensors.items():
            tensors[name][torch.from_numpy(chosen)] = t
        provenance = Provenance.of(
            finetune, config, {int(c): (ref, kind) for c, ref, kind in zip(chosen, refs, kinds)}, seconds
        )
        return ModelSet(models.architecture, tensors), provenance

"""The paper's architectures: FFNN-48 and FFNN-69 battery-cell models, and a small CIFAR CNN."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["FFNN", "SmallCNN", "ffnn48", "ffnn69", "make_models", "small_cnn"]


class FFNN(nn.Module):
    """The battery-cell network of the paper: 5 inputs -> hidden -> hidden -> hidden -> 1 voltage.

    Inputs are current, temperature, state of charge and two current-history
    features; ``fc1`` has no bias, as in the paper (4,993 parameters at hidden=48).
    """

    def __init__(self, hidden: int = 48, n_inputs: int = 5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(n_inputs, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, hidden)
        self.fc4 = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        x = torch.relu(self.fc3(x))
        return self.fc4(x)


class SmallCNN(nn.Module):
    """A CIFAR-10 classifier for 3x32x32 images with BatchNorm: 6,866 parameters
    (the paper's has 6,882) and three running statistics per BatchNorm layer."""

    def __init__(self, n_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 26, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(26)
        self.fc = nn.Linear(26, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        x = torch.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        x = torch.relu(self.bn3(self.conv3(x)))
        x = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def ffnn48() -> FFNN:
    """FFNN-48: 4,993 parameters."""
    return FFNN(48)


def ffnn69() -> FFNN:
    """FFNN-69: 10,075 parameters."""
    return FFNN(69)


def small_cnn() -> SmallCNN:
    """The small CIFAR CNN."""
    return SmallCNN()


def make_models(factory: Callable[[], nn.Module], n: int, seed: int = 0) -> list[nn.Module]:
    """``n`` independently initialised models, reproducible from ``seed``.

    Example::

        models = make_models(ffnn48, 5000)
    """
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return [factory() for _ in range(n)]
    finally:
        torch.random.set_rng_state(generator_state)

"""Models and data the tests, benchmarks and demo share; nothing is downloaded."""

from mmpack.workloads.cycles import Cycle, u3_cycle
from mmpack.workloads.models import FFNN, SmallCNN, ffnn48, ffnn69, make_models, small_cnn

__all__ = ["FFNN", "Cycle", "SmallCNN", "ffnn48", "ffnn69", "make_models", "small_cnn", "u3_cycle"]

"""bias_lab: compare CNNs on an ImageNet subset and measure how a shortcut channel biases them, tracked in MLflow."""

import os

# Idle OpenMP threads sleep instead of spinning (read once, when torch loads its OpenMP runtime, so it is set here,
# before any bias_lab module imports torch). With other torch jobs on the cores, spinning threads burn the time
# slices the working ones need: a LeNet epoch on tiny4 ran at 44-177 img/s with the default policy and 273-395 img/s
# with PASSIVE next to two busy matmul loops on 2 cores; idle, both ran 1059-1283 img/s (benchmarks/README.md).
# A value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

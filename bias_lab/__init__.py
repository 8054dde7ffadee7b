"""bias_lab: compare CNNs on an ImageNet subset and measure how a shortcut channel biases them, tracked in MLflow."""

__version__ = "0.1.0"

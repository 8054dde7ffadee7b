"""MLflow entry point `train`: the same as `bias-lab train` (options in bias_lab/config.py)."""

from bias_lab.cli import entrypoint

if __name__ == "__main__":
    entrypoint("train")

"""MLflow entry point `bias_sweep`: the same as `bias-lab bias-sweep` (options in bias_lab/config.py)."""

from bias_lab.cli import entrypoint

if __name__ == "__main__":
    entrypoint("bias-sweep")

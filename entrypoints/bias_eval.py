"""MLflow entry point `bias_eval`: the same as `bias-lab bias-eval` (options in bias_lab/config.py)."""

from bias_lab.cli import entrypoint

if __name__ == "__main__":
    entrypoint("bias-eval")

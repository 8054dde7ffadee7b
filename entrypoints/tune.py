"""MLflow entry point `tune`: the same as `bias-lab tune` (options in bias_lab/config.py)."""

from bias_lab.cli import entrypoint

if __name__ == "__main__":
    entrypoint("tune")

"""MLflow entry point `kaggle_submit`: the same as `bias-lab kaggle-submit` (options in bias_lab/config.py)."""

from bias_lab.cli import entrypoint

if __name__ == "__main__":
    entrypoint("kaggle-submit")

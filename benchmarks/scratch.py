"""What the benchmark scripts share: a throw-away place to run in (decoded-tensor cache, MLflow store, demo data)."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow

INHERITED = ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")  # a caller's run must not adopt ours


def scratch_env(workdir: Path, tracking_uri: str = "") -> dict[str, str]:
    """The environment for the commands a benchmark starts, also applied to this process: the tensor cache in
    `workdir`, MLflow at `tracking_uri` or a throw-away sqlite store in `workdir`, no run inherited from a caller."""
    env = {k: v for k, v in os.environ.items() if k not in INHERITED}
    env["BIAS_LAB_CACHE"] = str(workdir / "cache")
    env["MLFLOW_TRACKING_URI"] = tracking_uri or f"sqlite:///{workdir / 'mlflow.db'}"
    os.environ.update(BIAS_LAB_CACHE=env["BIAS_LAB_CACHE"], MLFLOW_TRACKING_URI=env["MLFLOW_TRACKING_URI"])
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    return env


def quick_data(workdir: Path) -> str:
    """The --quick smoke runs' data: the demo generator at 30 train / 4 test images per class."""
    from bias_lab.demo import write_demo

    return str(write_demo(workdir / "data", seed=1, n_train=30, n_test=4))

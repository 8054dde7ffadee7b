"""Shared fixtures: tiny generated datasets and an isolated MLflow sqlite store per test.

Nothing here reads the real competition data (users do not have it): tests make their own data (the demo generator at a small size).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # tqdm reads it at import time: before bias_lab imports it

import mlflow
import pytest
from click.testing import CliRunner

from bias_lab.cli import main
from bias_lab.demo import write_demo

REPO = Path(__file__).resolve().parents[1]

# Small and fast: 32 px images, LeNet, a few epochs. Each test that trains keeps well under ~10 s on 2 cores.
FAST = ["--image-size", "32", "--model", "lenet", "--epochs", "2", "--batch-size", "32", "--lr", "0.05"]


@pytest.fixture(scope="session")
def kaggle_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Kaggle-layout dataset (labels 1..4, 40 train images per class, 5 test images per class)."""
    return write_demo(tmp_path_factory.mktemp("data") / "kaggle", seed=1, n_train=40, n_test=5)


@pytest.fixture(scope="session")
def easy_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Kaggle-layout set any CNN learns in an epoch or two (so a wrong metric shows): four brightness levels of
    noisy squares, labels 1..4, 60 images each."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("easy")
    rng = np.random.default_rng(0)
    (root / "train" / "train").mkdir(parents=True)
    rows = ["id,label"]
    for i in range(240):
        label = 1 + i % 4
        pixels = np.clip(rng.normal(30 + 60 * (label - 1), 12, (32, 32)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "train" / "train" / f"{i:05d}.jpg")
        rows.append(f"{i:05d},{label}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow sqlite store with its tables created once (creating them costs seconds per test)."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    cwd = os.getcwd()
    os.chdir(path.parent)  # the Default experiment's artifact folder (./mlruns/0) is resolved now: not in the repo
    try:
        mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    finally:
        os.chdir(cwd)
    return path


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_store: Path) -> Path:
    """Each test: its own cwd, MLflow sqlite store, decoded-tensor cache; no progress bars."""
    import shutil

    shutil.copy(empty_store, tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("BIAS_LAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setattr(
        mlflow.tracking.fluent, "_active_experiment_id", None
    )  # else it leaks from the last test's store
    yield tmp_path
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture
def client() -> mlflow.MlflowClient:
    return mlflow.MlflowClient()


def invoke(*args: str) -> tuple[int, str]:
    """Run `bias-lab ARGS` in-process; returns (exit code, stdout+stderr)."""
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.output  # click >= 8.2: stdout and stderr, as a terminal shows them


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `bias-lab ARGS` in a subprocess (exit codes, signals, tracebacks as a user sees them)."""
    return subprocess.run(
        [sys.executable, "-m", "bias_lab.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def all_runs(client: mlflow.MlflowClient) -> list:
    exps = client.search_experiments()
    return client.search_runs([e.experiment_id for e in exps], max_results=1000)


def figures_page(client: mlflow.MlflowClient, run_id: str, names: set[str]) -> str:
    """The run's figures.html, checked to render offline: plotly.js inlined exactly once, no <script src=...>
    (a CDN is unreachable offline), every named figure in it with its JSON under figures/."""
    import re

    arts = {a.path for a in client.list_artifacts(run_id, "figures")}
    assert {f"figures/{n}.json" for n in names} <= arts, arts
    page = mlflow.artifacts.load_text(f"runs:/{run_id}/figures.html")
    assert len(re.findall(r"\* plotly\.js v\d", page)) == 1, "plotly.js must be inlined exactly once"
    assert not re.search(r"<script[^>]*\bsrc=", page), "figures.html loads a script from elsewhere: blank offline"
    assert page.count("Plotly.newPlot(") == len(arts) and all(f"<h2>{n.replace('_', ' ')}</h2>" in page for n in names)
    return page

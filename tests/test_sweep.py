"""`bias_sweep`: the grid, the threshold, and the nested runs it leaves in MLflow."""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from bias_lab import bias_sweep, config
from bias_lab.errors import UserError
from bias_lab.verdict import Verdict

from .conftest import all_runs, figures_page


def test_grid_parsing_and_cells() -> None:
    assert config.parse_numbers("1, 0,0.5,0.5", "gaps", 0, 1) == [0.0, 0.5, 1.0]
    for text, message in (
        ("0,x", "not a comma-separated list"),
        ("", "is empty"),
        ("0,1.5", r"1.5 is outside \[0, 1\]"),
    ):
        with pytest.raises(UserError, match=message):
            config.parse_numbers(text, "gaps", 0, 1)
    with pytest.raises(UserError, match="inf is outside"):
        config.parse_numbers("1,inf", "sigmas", 0, math.inf)
    b = bias_sweep.cell_bias(0.5, 0.3, "1,3")
    assert (b.p0, b.p1, b.sigma, b.classes) == (0.25, 0.75, 0.3, "1,3")
    assert (bias_sweep.cell_bias(1.0, 1, "").p0, bias_sweep.cell_bias(1.0, 1, "").p1) == (0.0, 1.0)


def _cells(dis: list[float], accuracy: float = 0.9) -> list[Verdict]:
    """Sweep cells' verdicts for these decorrelated DIs (CI collapsed on the point), all at `accuracy`."""
    return [Verdict(di, di, di, accuracy, accuracy - 0.05, 0.5, labels_di=1.0, n=100) for di in dis]


def test_threshold_is_where_the_bias_starts_and_stays() -> None:
    gaps = [0.0, 0.25, 0.5, 0.75, 1.0]
    assert bias_sweep.threshold(gaps, _cells([1.0, 0.95, 0.7, 0.3, 0.0])) == 0.5
    assert bias_sweep.threshold(gaps, _cells([1.0, 0.5, 0.9, 0.3, 0.0])) == 0.75  # a noisy early dip is not it
    assert bias_sweep.threshold(gaps, _cells([1.0, 1.0, 1.1, 0.9, 0.7])) == 1.0
    assert math.isnan(bias_sweep.threshold(gaps, _cells([1.0, 1.0, 1.1, 0.9, 0.85])))
    assert bias_sweep.threshold(gaps, _cells([1.0, 1.0, 1.0, math.inf, math.inf])) == 0.75
    assert math.isnan(bias_sweep.threshold(gaps, _cells([0.0, 0.0, 0.0, 0.0, math.nan])))  # undefined at the top


def test_models_at_chance_give_no_threshold_and_no_verdict() -> None:
    """Cells whose model did not learn (accuracy at chance) predict one class: their DI is no evidence either way."""
    gaps = [0.0, 0.5, 1.0]
    at_chance = _cells([1.0, 0.3, 0.0], accuracy=0.5)
    assert math.isnan(bias_sweep.threshold(gaps, at_chance))
    assert all(v.text().startswith("inconclusive: did not learn") for v in at_chance)
    summary = {"threshold_gap_sigma_1": math.nan}
    rows = [
        {
            "sigma": 1.0,
            "gap": g,
            "p0": (1 - g) / 2,
            "p1": (1 + g) / 2,
            "decorrelated_test_di": v.di,
            "decorrelated_test_di_ci_low": v.di,
            "decorrelated_test_di_ci_high": v.di,
            "decorrelated_test_accuracy": 0.5,
            "test_accuracy": 0.5,
            "saliency_eps_share": 0.1,
        }
        for g, v in zip(gaps, at_chance)
    ]
    text = bias_sweep.sweep_markdown("t", rows, {(1.0, g): v for g, v in zip(gaps, at_chance)}, [1.0], gaps, summary)
    assert "no model of this row learned its task" in text and "not taken" not in text and "| biased |" not in text


def test_bias_sweep_nested_runs_and_heatmap(kaggle_data: Path, client: mlflow.MlflowClient) -> None:
    data = config.DataConfig(data=str(kaggle_data), image_size=32)
    out = bias_sweep.run_sweep(
        data,
        config.TrainConfig(model="lenet", epochs=1, batch_size=16),
        config.SweepConfig(classes="2,4", gaps="0,1", sigmas="1", bootstrap=50),
    )
    assert set(out) == {"threshold_gap_sigma_1", "threshold_gap"}
    runs = all_runs(client)
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    cells = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(cells) == 2 and all(r.info.status == "FINISHED" and r.data.tags["role"] == "model_2" for r in cells)
    by_gap = {r.data.tags["gap"]: r for r in cells}
    assert (by_gap["1"].data.params["p0"], by_gap["1"].data.params["p1"]) == ("0.0", "1.0")
    assert (by_gap["0"].data.params["p0"], by_gap["0"].data.params["p1"]) == ("0.5", "0.5")
    for r in cells:
        for key in ("decorrelated_test_di", "decorrelated_test_accuracy", "test_accuracy", "saliency_eps_share"):
            assert key in r.data.metrics, key
    assert parent.data.metrics["threshold_gap_sigma_1"] == pytest.approx(out["threshold_gap_sigma_1"], nan_ok=True)
    assert {"sweep.csv", "sweep.json", "sweep.md", "figures.html"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)
    }
    figures_page(client, parent.info.run_id, {"sweep"})
    table = pd.read_csv(mlflow.artifacts.download_artifacts(f"runs:/{parent.info.run_id}/sweep.csv"))
    assert list(table.gap) == [0.0, 1.0]
    assert table.decorrelated_test_di.iloc[1] == pytest.approx(
        by_gap["1"].data.metrics["decorrelated_test_di"], nan_ok=True
    )

"""One verdict for every command: no verdict for a model that diverged or did not learn, and a DI judged next to
the labels' own DI on the same split."""

from __future__ import annotations

import math

import mlflow

from bias_lab import comparison, config
from bias_lab.verdict import Verdict

from .conftest import FAST, all_runs, invoke


def test_a_model_at_chance_gets_no_verdict_even_when_its_di_is_undefined() -> None:
    """A model predicting one class has DI 0/0: 'undefined' must not skip the did-not-learn check."""
    v = Verdict(math.nan, math.nan, math.nan, accuracy=0.5, accuracy_low=0.4, chance=0.5)
    assert v.inconclusive and v.text().startswith("inconclusive: did not learn")


def test_a_diverged_model_gets_no_verdict() -> None:
    v = Verdict(1.0, 1.0, 1.0, accuracy=math.nan, accuracy_low=math.nan, chance=0.5, diverged=True)
    assert v.status == "diverged" and v.text().startswith("inconclusive: diverged")


def test_a_model_that_mirrors_the_labels_is_not_called_biased() -> None:
    """In distribution (S = y) the labels' own DI is 0: a perfect classifier that never looks at eps scores 0 too."""
    mirror = Verdict(0.0, 0.0, 0.0, accuracy=1.0, accuracy_low=0.95, chance=0.5, labels_di=0.0, n=90)
    assert mirror.rule == "biased" and mirror.text().startswith("mirrors the labels") and "biased" not in mirror.text()
    beyond = Verdict(0.3, 0.2, 0.45, accuracy=0.9, accuracy_low=0.85, chance=0.5, labels_di=0.95, n=90)
    assert beyond.text() == "biased"  # more disparity than the labels carry: the model's own
    other_side = Verdict(1.6, 1.4, 1.9, accuracy=0.9, accuracy_low=0.85, chance=0.5, labels_di=0.6, n=90)
    assert other_side.text() == "biased"  # beyond 1 while the labels are below: not a mirror


def test_borderline_says_why_and_what_would_settle_it() -> None:
    v = Verdict(1.0, 0.65, 1.53, accuracy=0.9, accuracy_low=0.85, chance=0.5, labels_di=1.0, n=90)
    text = v.text()
    assert text.startswith("borderline (not biased at the point estimate") and "90 test images" in text
    assert "more test images or seeds" in text


def test_the_table_and_conclusion_use_the_labels_di_of_each_split() -> None:
    summary = {"test_base_rate_di": 0.0, "decorrelated_test_base_rate_di": 1.0}
    for role in ("model_1", "model_2"):
        summary.update({f"{role}_test_accuracy": 1.0, f"{role}_test_accuracy_ci_low": 0.96})
        for prefix, di in (("test_", 0.0), ("decorrelated_test_", 1.0)):
            summary.update(
                {f"{role}_{prefix}di": di, f"{role}_{prefix}di_ci_low": di, f"{role}_{prefix}di_ci_high": di}
            )
    rows = comparison.table_rows(summary, {"model_1": "clean", "model_2": "biased"}, seeds=1, chance=0.5)
    verdicts = {(r["model"], r["test"]): r["four_fifths"] for r in rows}
    assert verdicts[("model_1", "in distribution")].startswith("mirrors the labels")
    assert verdicts[("model_1", "decorrelated")] == "not biased"
    text = comparison.conclusion(
        summary, rows, config.BiasConfig(), ("1", "3"), 0.5, {"in distribution": 0.0, "decorrelated": 1.0}, 1
    )
    assert "model_1, in distribution: DI = 0 " in text and "→ **mirrors the labels" in text


def test_bias_eval_of_diverged_models_gives_no_verdict_and_strict_fails(client: mlflow.MlflowClient) -> None:
    fast = [a if a != "0.05" else "1000" for a in FAST]  # lr=1000: both models diverge in their first epoch
    code, out = invoke("bias-eval", "--data", "demo", *fast, "--epochs", "1", "--strict", "true")
    assert code == 2 and "no verdict (strict=true): model_1 diverged; model_2 diverged" in out.splitlines()[-1], out
    runs = all_runs(client)
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.data.tags["model_2_verdict"].startswith("inconclusive: diverged"), parent.data.tags
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert kids and all("test_accuracy" not in r.data.metrics for r in kids)  # a NaN model has no test accuracy
    assert "buys nothing" not in mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/conclusion.md")


def test_a_diverged_train_shows_no_test_accuracy_and_fails(kaggle_data, client: mlflow.MlflowClient) -> None:
    fast = [a if a != "0.05" else "1000" for a in FAST]
    code, out = invoke("train", "--data", str(kaggle_data), *fast)
    assert code == 2 and out.strip().splitlines()[-1].startswith("error: training diverged at epoch"), out
    assert "test_accuracy" not in out and "lower it" in out.splitlines()[-1]
    [run] = all_runs(client)
    assert run.info.status == "FAILED" and "training diverged" in run.data.tags["error"]
    assert not any(k.startswith("test_") for k in run.data.metrics) and "diverged" in run.data.tags

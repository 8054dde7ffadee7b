"""The biased dataset, the fairness measures against AIF360 / fairlearn, and `bias_eval` end to end in MLflow."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from bias_lab import bias as biasmod
from bias_lab import bias_eval, comparison, config, metrics, plots
from bias_lab.data import load

from .conftest import all_runs, figures_page, invoke

logging.getLogger().setLevel(logging.ERROR)  # aif360 logs one warning per optional backend it lacks (tensorflow...)
from aif360.sklearn.metrics import disparate_impact_ratio  # noqa: E402
from fairlearn.metrics import MetricFrame, demographic_parity_ratio, selection_rate  # noqa: E402

TINY = ["--image-size", "32", "--model", "lenet", "--epochs", "1", "--batch-size", "16", "--bootstrap", "200"]


# ------------------------------------------------------------------------------------------- the eps channel


def test_eps_is_zero_without_s_and_has_sigma_with_s() -> None:
    labels = torch.tensor([0] * 3000 + [1] * 3000)
    ch = biasmod.draw(labels, 0.3, 0.8, 2.0, seed=5, size=8)
    assert ch.eps.shape == (6000, 1, 8, 8) and ch.s.dtype == torch.bool
    assert torch.all(ch.eps[~ch.s] == 0)  # exactly zero, not small
    on = ch.eps[ch.s]
    assert on.std().item() == pytest.approx(2.0, rel=0.01) and abs(on.mean().item()) < 0.01
    for y, p in ((0, 0.3), (1, 0.8)):
        rate = ch.s[labels == y].double().mean().item()
        assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / 3000), (y, rate)  # within 4 standard errors
    again = biasmod.draw(labels, 0.3, 0.8, 2.0, seed=5, size=8)
    assert torch.equal(again.s, ch.s) and torch.equal(again.eps, ch.eps)  # deterministic per sample and seed
    assert not torch.equal(biasmod.draw(labels, 0.3, 0.8, 2.0, seed=6, size=8).s, ch.s)


def test_prepared_splits_carry_the_channel_and_a_decorrelated_test(kaggle_data: Path) -> None:
    data = config.DataConfig(data=str(kaggle_data), image_size=32)
    bias = config.BiasConfig(classes="2,4", p0=0.0, p1=1.0, sigma=1.5)
    ds = load(data)
    m1, m2 = bias_eval.arms(ds, data, bias, config.BiasEvalConfig(), seed=3)
    assert (m1.prep.channels, m2.prep.channels) == (1, 2)
    for part in (m2.prep.train, m2.prep.val, m2.prep.test):
        assert torch.equal(part.s, part.labels.bool())  # p0=0, p1=1: S is the label
        assert torch.all(part.eps[~part.s] == 0) and torch.all(part.eps[part.s].abs().sum((1, 2, 3)) > 0)
    dec = m2.prep.test_decorrelated
    assert torch.equal(dec.images, m2.prep.test.images) and torch.equal(dec.labels, m2.prep.test.labels)
    assert not torch.equal(dec.s, dec.labels.bool())  # S drawn at p0=p1=0.5
    # model_1 and model_2 are measured on the same test images and the same S draws
    assert torch.equal(m1.prep.test.images, m2.prep.test.images) and torch.equal(m1.prep.test.s, m2.prep.test.s)
    # the decorrelated variant of model_1 trains with eps equally often in both classes, measured on (p0, p1)
    d1, _ = bias_eval.arms(
        ds,
        data,
        config.BiasConfig(classes="2,4", p0=0.0, p1=1.0),
        config.BiasEvalConfig(model_1_mode="decorrelated"),
        seed=3,
    )
    assert d1.prep.channels == 2 and torch.equal(d1.prep.test.s, m2.prep.test.s)
    s, y = d1.prep.train.s, d1.prep.train.labels
    assert 0 < s[y == 0].float().mean() < 1 and 0 < s[y == 1].float().mean() < 1


# ------------------------------------------------------------------------------------------- the measures


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_di_matches_aif360_and_fairlearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 400
    s = rng.integers(0, 2, n)
    y = (rng.random(n) < 0.3 + 0.4 * s).astype(int)  # S correlated with y
    pred = np.where(rng.random(n) < 0.8, y, 1 - y)
    m = metrics.fairness(y, pred, s, bootstrap=500, seed=seed)
    assert m["di"] == pytest.approx(disparate_impact_ratio(y, pred, prot_attr=s, priv_group=1, pos_label=1))
    rates = MetricFrame(metrics=selection_rate, y_true=y, y_pred=pred, sensitive_features=s).by_group
    assert (m["selection_rate_s0"], m["selection_rate_s1"]) == pytest.approx((rates[0], rates[1]))
    assert m["dp_ratio"] == pytest.approx(demographic_parity_ratio(y, pred, sensitive_features=s))
    assert m["accuracy"] == pytest.approx(np.mean(y == pred))
    assert m["accuracy_s1"] == pytest.approx(np.mean(y[s == 1] == pred[s == 1]))
    assert m["n_s0"] + m["n_s1"] == n
    assert m["di_ci_low"] < m["di"] < m["di_ci_high"] and m["accuracy_ci_low"] < m["accuracy"] < m["accuracy_ci_high"]
    assert metrics.base_rate_di(y, s) == pytest.approx(disparate_impact_ratio(pd.Series(y), prot_attr=s, priv_group=1))


def test_bootstrap_ci_covers_the_truth_and_narrows_with_n() -> None:
    rng = np.random.default_rng(0)
    widths = []
    for n in (200, 5000):
        s = rng.integers(0, 2, n)
        pred = (rng.random(n) < np.where(s == 1, 0.5, 0.4)).astype(int)  # true DI = 0.8
        lo, hi = metrics.bootstrap_di(pred, s, n=2000, seed=1)
        assert lo < 0.8 < hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 3


def test_undefined_and_infinite_di_are_reported_not_raised() -> None:
    y = np.array([0, 1, 0, 1, 1, 0])
    only_s0 = metrics.fairness(y, np.array([1, 1, 0, 1, 0, 0]), np.zeros(6, int), bootstrap=100)
    assert math.isnan(only_s0["di"]) and math.isnan(only_s0["accuracy_s1"]) and only_s0["n_s1"] == 0
    assert math.isnan(only_s0["di_ci_low"]) and math.isnan(only_s0["dp_ratio"])
    assert metrics.explain(only_s0) == "DI undefined: group S=1 is empty in this split"
    s = np.array([0, 0, 0, 1, 1, 1])
    no_positive_s1 = metrics.fairness(y, np.array([1, 0, 1, 0, 0, 0]), s, bootstrap=100)
    assert math.isinf(no_positive_s1["di"]) and no_positive_s1["dp_ratio"] == 0
    assert "infinite" in metrics.explain(no_positive_s1)
    assert metrics.verdict(no_positive_s1["di"], no_positive_s1["di_ci_low"], no_positive_s1["di_ci_high"]) == "biased"
    none_positive = metrics.fairness(y, np.zeros(6, int), s, bootstrap=100)
    assert math.isnan(none_positive["di"]) and "0/0" in metrics.explain(none_positive)
    assert metrics.verdict(none_positive["di"], math.nan, math.nan) == "undefined" and not metrics.biased(math.nan)
    empty = metrics.fairness(np.array([], int), np.array([], int), np.array([], int))
    assert all(math.isnan(empty[k]) for k in ("accuracy", "di", "di_ci_low", "accuracy_ci_low")) and empty["n_s0"] == 0
    assert metrics.FOUR_FIFTHS == (0.8, 1.25) and not metrics.biased((5 / 6) / (2 / 3)) and metrics.biased(0.79)


def test_summary_conclusion_and_figure_survive_nan_inf_and_seeds() -> None:
    results = {
        "model_1": [{"test_accuracy": 0.8, "test_di": 1.0, "decorrelated_test_di": math.nan}] * 1
        + [{"test_accuracy": 0.7, "test_di": 0.9, "decorrelated_test_di": math.nan}],
        "model_2": [
            {"test_accuracy": 1.0, "test_di": 0.0, "decorrelated_test_di": math.inf},
            {"test_accuracy": 1.0, "test_di": 0.1, "decorrelated_test_di": 0.5},
        ],
    }
    summary = comparison.summarize(results)
    assert summary["model_1_test_accuracy"] == pytest.approx(0.75)
    assert summary["model_1_test_accuracy_std"] == pytest.approx(np.std([0.8, 0.7], ddof=1))
    assert math.isnan(summary["model_1_decorrelated_test_di"]) and math.isinf(summary["model_2_decorrelated_test_di"])
    rows = comparison.table_rows(summary, {"model_1": "clean", "model_2": "biased"}, seeds=2, chance=0.5)
    assert [(r["model"], r["test"]) for r in rows] == [
        ("model_1", "in distribution"),
        ("model_1", "decorrelated"),
        ("model_2", "in distribution"),
        ("model_2", "decorrelated"),
    ]
    assert "±" in comparison.markdown_table(rows) and "inf" in comparison.markdown_table(rows)
    text = comparison.conclusion(
        summary, rows, config.BiasConfig(), ("A", "B"), 0.5, {"in distribution": 0.0, "decorrelated": math.nan}, 2
    )
    assert all(q in text for q in ("Q2", "Q3", "Q4")) and "n/a" in text
    fig = plots.bias_comparison(rows)
    assert len(fig.data) == 4 and list(fig.data[3].text) == ["undefined", "inf"]


def test_conclusion_reads_a_shortcut_from_the_numbers() -> None:
    summary = {
        "model_1_test_accuracy": 0.8,
        "model_2_test_accuracy": 1.0,
        "model_1_decorrelated_test_accuracy": 0.8,
        "model_2_decorrelated_test_accuracy": 0.5,
    }
    for role, di, lo, hi in (("model_1", 1.0, 0.9, 1.1), ("model_2", 0.0, 0.0, 0.0)):
        for prefix in ("test_", "decorrelated_test_"):
            summary.update(
                {f"{role}_{prefix}di": di, f"{role}_{prefix}di_ci_low": lo, f"{role}_{prefix}di_ci_high": hi}
            )
    rows = comparison.table_rows(summary, {"model_1": "clean", "model_2": "biased"}, seeds=1, chance=0.5)
    text = comparison.conclusion(
        summary, rows, config.BiasConfig(), ("1", "3"), 0.5, {"in distribution": 0.0, "decorrelated": 1.0}, 1
    )
    assert "model_2 took the shortcut" in text and "model_1 is not biased" in text
    assert (
        "buys 20.0 points of accuracy for model_2" in text
        and "-30.0 points vs model_1" in text
        and "down to chance" in text
    )
    assert "costs 30.0 points" in text and "Caution" not in text


def test_an_infinite_di_reads_back_as_undefined_not_1e308(client: mlflow.MlflowClient) -> None:
    """SQL stores turn inf into 1.797e308: an infinite DI is stored as NaN (undefined) instead."""
    from bias_lab import tracking

    with mlflow.start_run() as run:
        tracking.log_metrics({"decorrelated_test_di": math.inf, "di_low": -math.inf, "accuracy": 0.5})
    m = client.get_run(run.info.run_id).data.metrics
    assert math.isnan(m["decorrelated_test_di"]) and math.isnan(m["di_low"]) and m["accuracy"] == 0.5


def test_only_model_3_at_chance_still_concludes_on_the_shortcut() -> None:
    summary = {}
    for role, acc, lo, di in (("model_1", 0.9, 0.82, 1.0), ("model_2", 0.99, 0.95, 0.0), ("model_3", 0.5, 0.4, 1.0)):
        for prefix in ("test_", "decorrelated_test_"):
            summary.update(
                {
                    f"{role}_{prefix}accuracy": acc,
                    f"{role}_{prefix}accuracy_ci_low": lo,
                    f"{role}_{prefix}di": di,
                    f"{role}_{prefix}di_ci_low": di,
                    f"{role}_{prefix}di_ci_high": di,
                }
            )
    summary["model_2_decorrelated_test_accuracy"] = 0.5
    rows = comparison.table_rows(
        summary, {"model_1": "clean", "model_2": "biased", "model_3": "reweigh"}, seeds=1, chance=0.5
    )
    text = comparison.conclusion(
        summary, rows, config.BiasConfig(), ("1", "3"), 0.5, {"in distribution": 0.0, "decorrelated": 1.0}, 1
    )
    assert "Caution: model_3 did not learn the task" in text and "model_2 took the shortcut" in text
    assert "In short: the shortcut buys" in text and "no conclusion on the shortcut" not in text


def test_the_across_seeds_interval_is_students_t() -> None:
    from scipy import stats

    for n in range(2, 40):
        lo, hi = comparison.seed_interval(0.5, 0.1, n)
        exact = stats.t.ppf(0.975, min(n - 1, 30)) * 0.1 / math.sqrt(n)
        assert (lo, hi) == pytest.approx((0.5 - exact, 0.5 + exact), abs=2e-4), n


def test_a_model_at_chance_gets_no_verdict() -> None:
    """model_2 predicting one class (50 %, DI exactly 1 [1, 1]) is 'inconclusive', never 'not biased'."""
    summary = {}
    for role, acc, lo in (("model_1", 0.9, 0.82), ("model_2", 0.5, 0.4)):
        for prefix in ("test_", "decorrelated_test_"):
            summary.update(
                {
                    f"{role}_{prefix}accuracy": acc,
                    f"{role}_{prefix}accuracy_ci_low": lo,
                    f"{role}_{prefix}di": 1.0,
                    f"{role}_{prefix}di_ci_low": 1.0,
                    f"{role}_{prefix}di_ci_high": 1.0,
                }
            )
    rows = comparison.table_rows(summary, {"model_1": "clean", "model_2": "biased"}, seeds=1, chance=0.5)
    verdicts = {(r["model"], r["test"]): r["four_fifths"] for r in rows}
    assert verdicts[("model_1", "decorrelated")] == "not biased"
    assert all(verdicts[("model_2", t)].startswith("inconclusive: did not learn") for t in comparison.TESTS)
    text = comparison.conclusion(
        summary, rows, config.BiasConfig(), ("1", "3"), 0.5, {"in distribution": 0.0, "decorrelated": 1.0}, 1
    )
    assert "Caution: model_2 did not learn the task" in text and "model_2 did not learn the task: no verdict" in text
    assert "no measurable reliance" not in text and "not biased" not in comparison.headline(summary, rows, 0.5).replace(
        "model_1 is not biased", ""
    )


# ------------------------------------------------------------------------------------------- the command


@pytest.mark.parametrize(
    "args, message",
    [
        (["--p0", "1.5"], "p0=1.5 is not a probability"),
        (["--p1", "-0.1"], "p1=-0.1 is not a probability"),
        (["--sigma", "-1"], "sigma=-1.0 is not a finite standard deviation"),
        (["--sigma", "inf"], "sigma=inf is not a finite standard deviation"),
        (["--seeds", "0"], "seeds=0"),
        (["--lr", "inf"], "lr=inf"),
        (["--test-fraction", "0"], "test_fraction=0.0: bias_eval measures on the test split"),
        (["--seed", "4294967295", "--seeds", "2"], "seed=4294967295 with seeds=2"),
        (["--weight-decay", "-1"], "weight_decay=-1.0"),
    ],
)
def test_invalid_bias_settings_are_one_line_errors(tmp_path: Path, args: list[str], message: str) -> None:
    db = tmp_path / "mlflow.db"
    before = db.read_bytes() if db.exists() else None
    code, out = invoke("bias-eval", "--data", "demo", *args)
    assert code == 2, out
    assert out.count("\n") == 1 and out.startswith("error: ") and message in out and "Traceback" not in out
    assert (
        db.read_bytes() if db.exists() else None
    ) == before  # rejected before the store, data or any run was touched


def _register_versions(client: mlflow.MlflowClient, digest: str) -> None:
    """Two versions tagged as `tune` tags them: v1 tuned on this binary task, v2 (holding the champion alias) on the
    4-class task of the same data: its hyperparameters are no evidence for the pair."""
    mlflow.set_experiment("tuning")
    client.create_registered_model("bias-lab")
    for lr, data in ((0.02, f"{digest}-2v4"), (0.3, digest)):
        with mlflow.start_run() as run:
            mlflow.log_params({"model": "lenet", "lr": lr})
        v = client.create_model_version(
            "bias-lab",
            f"runs:/{run.info.run_id}/model",
            run_id=run.info.run_id,
            tags={
                "model": "lenet",
                "lr": str(lr),
                "momentum": "0.5",
                "batch_size": "24",
                "data_digest": data,
                "val_accuracy": "0.9",
            },
        )
    client.set_registered_model_alias("bias-lab", "champion", v.version)


def test_bias_eval_parent_children_and_comparison(kaggle_data: Path, client: mlflow.MlflowClient) -> None:
    _register_versions(client, load(config.DataConfig(data=str(kaggle_data), image_size=32)).digest)
    code, out = invoke("bias-eval", "--data", str(kaggle_data), *TINY, "--classes", "2,4")
    assert code == 0, out
    runs = [r for r in all_runs(client) if r.data.tags.get("entry_point") == "bias_eval"]
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.data.tags["role"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"model_1", "model_2"} and len(runs) == 3
    assert all(r.info.status == "FINISHED" for r in runs)
    c1, c2 = children["model_1"].data, children["model_2"].data
    assert set(c1.metrics) == set(c2.metrics)  # identical names: the Compare view lines them up
    for prefix in ("test_", "decorrelated_test_"):
        for m in (
            "accuracy",
            "di",
            "di_ci_low",
            "di_ci_high",
            "dp_ratio",
            "selection_rate_s0",
            "selection_rate_s1",
            "accuracy_s0",
            "accuracy_s1",
            "n_s0",
            "n_s1",
        ):
            assert f"{prefix}{m}" in c1.metrics, f"{prefix}{m}"
    assert "train_time_s" in c1.metrics and "val_accuracy" in c1.metrics
    # same hyperparameters on both, from the version tuned on this pair (not the 4-class champion)
    for c in (c1, c2):
        assert (c.params["lr"], c.params["momentum"], c.params["batch_size"], c.params["seed"]) == (
            "0.02",
            "0.5",
            "24",
            "0",
        )
    assert (c1.params["in_channels"], c2.params["in_channels"]) == ("1", "2")
    assert parent.data.params["hparams_source"] == "models:/bias-lab/1"
    p = parent.data.params
    assert (p["p0"], p["p1"], p["sigma"], p["classes"], p["label_y0"], p["label_y1"]) == (
        "0.0",
        "1.0",
        "1.0",
        "2,4",
        "2",
        "4",
    )
    pm = parent.data.metrics
    for role, c in (("model_1", c1), ("model_2", c2)):
        for key in ("test_accuracy", "decorrelated_test_accuracy", "test_di", "decorrelated_test_di_ci_high"):
            assert pm[f"{role}_{key}"] == pytest.approx(c.metrics[key], nan_ok=True), (role, key)
    assert pm["shortcut_accuracy_gain"] == pytest.approx(c2.metrics["test_accuracy"] - c1.metrics["test_accuracy"])
    assert pm["test_base_rate_di"] == 0.0  # p0=0, p1=1: S equals y, no S=0 sample is positive
    # model_1 never sees eps: same predictions on both test distributions
    assert c1.metrics["test_accuracy"] == c1.metrics["decorrelated_test_accuracy"]
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"comparison.csv", "comparison.json", "comparison.md", "figures.html", "conclusion.md"} <= arts
    uri = f"runs:/{parent.info.run_id}"
    table = pd.read_csv(mlflow.artifacts.download_artifacts(f"{uri}/comparison.csv"))
    assert list(table["model"]) == ["model_1", "model_1", "model_2", "model_2"]
    assert table.loc[3, "di"] == pytest.approx(c2.metrics["decorrelated_test_di"], nan_ok=True)
    text = mlflow.artifacts.load_text(f"{uri}/conclusion.md")
    assert "Q2" in text and "Q4" in text and f"{100 * c2.metrics['test_accuracy']:.1f}%" in text
    assert "four-fifths band" in figures_page(client, parent.info.run_id, {"comparison"})
    note = parent.data.tags["mlflow.note.content"]  # the run page's Description: the conclusion, then the table
    head = note.split("\n\n")[
        0
    ].splitlines()  # the verdicts first (the conclusion's Q4), then the table, then all of it
    assert head[0].startswith(("- model_2", "Caution")) and all(line in text.replace("**", "") for line in head)
    assert all(line in note for line in text.splitlines() if not line.startswith("#")) and "### Conclusion" in note
    assert "| model_1 | in distribution |" in note and "| model_2 | decorrelated |" in note  # and the table between
    assert parent.data.tags["model_2_verdict"] == table.loc[3, "four_fifths"]
    logged = json.loads(mlflow.artifacts.load_text(f"{uri}/comparison.json"))  # mlflow.log_table: browsable in the UI
    assert logged["columns"][:3] == ["model", "trained_on", "test"] and len(logged["data"]) == 4
    for role, row in (("model_1", 1), ("model_2", 3)):  # each model's own card: the same verdict as the comparison
        child = children[role]
        card_md = mlflow.artifacts.load_text(f"runs:/{child.info.run_id}/model_card.md")
        assert f"# Model card: {role}" in card_md and "## Bias study" in card_md and "labels' DI" in card_md
        assert f"Four-fifths verdict (decorrelated test): **{table.loc[row, 'four_fifths']}**" in card_md
        assert "hyperparameters from | models:/bias-lab/1" in card_md
        assert child.data.tags["mlflow.note.content"].startswith(f"**{role}**: LeNet on 2 classes (2=cross, 4=square)")
    assert "| zeroed |" in mlflow.artifacts.load_text(f"runs:/{children['model_2'].info.run_id}/model_card.md")


def test_models_that_cannot_learn_are_inconclusive_in_table_tags_and_terminal(
    kaggle_data: Path, client: mlflow.MlflowClient
) -> None:
    """lr=1e-6 for one epoch: both models stay at chance. No 'not biased' anywhere; strict=true exits non-zero
    with the run FINISHED (its numbers are right, they settle nothing)."""
    args = [
        "bias-eval",
        "--data",
        str(kaggle_data),
        *TINY,
        "--lr",
        "1e-6",
        "--classes",
        "2,4",
        "--use-champion",
        "false",
    ]
    code, out = invoke(*args)
    assert code == 0, out
    assert "Caution: model_1 and model_2 did not learn the task" in out and "experiment 'bias-lab', run " in out
    assert "inconclusive: did not learn" in out and "not biased" not in out
    [parent] = [r for r in all_runs(client) if "mlflow.parentRunId" not in r.data.tags]
    assert parent.data.tags["model_2_verdict"].startswith("inconclusive: did not learn")
    assert "not biased" not in parent.data.tags["mlflow.note.content"]
    code, out = invoke(*args, "--strict", "true")
    assert code == 2 and out.strip().splitlines()[-1].startswith(
        "error: no verdict (strict=true): model_1 did not learn; model_2 did not learn"
    ), out
    assert all(r.info.status == "FINISHED" for r in all_runs(client))


def _brightness_pair(root: Path, n: int = 200) -> Path:
    """A two-class Kaggle-layout set any CNN learns in an epoch or two: dark vs bright noisy squares."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "train" / "train").mkdir(parents=True)
    rows = ["id,label"]
    for i in range(2 * n):
        label = 1 + i % 2
        pixels = np.clip(rng.normal(70 if label == 1 else 185, 40, (32, 32)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "train" / "train" / f"{i:05d}.jpg")
        rows.append(f"{i:05d},{label}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return root


def test_control_p0_equal_p1_does_not_cry_wolf(tmp_path: Path, client: mlflow.MlflowClient) -> None:
    """eps present equally often in both classes (p0 = p1 = 0.5) carries no label. model_2 learns the images; its
    decorrelated DI is the labels' own DI there (it does not use S), and it is not called biased."""
    data = _brightness_pair(tmp_path / "pair")
    out = bias_eval.run_bias_eval(
        config.DataConfig(data=str(data), image_size=32),
        config.TrainConfig(model="lenet", epochs=3, batch_size=16, lr=0.05),
        config.BiasConfig(classes="1,2", p0=0.5, p1=0.5),
        config.BiasEvalConfig(bootstrap=300, use_champion=False),
    )
    [parent] = [r for r in all_runs(client) if "mlflow.parentRunId" not in r.data.tags]
    assert out["model_2_test_accuracy_ci_low"] > 0.5, out["model_2_test_accuracy"]  # it learned: a verdict is due
    assert out["model_2_decorrelated_test_di"] == pytest.approx(out["decorrelated_test_base_rate_di"], abs=0.1)
    v2 = parent.data.tags["model_2_verdict"]
    assert v2 == "not biased" or v2.startswith("borderline (not biased"), v2


def test_bias_eval_with_an_empty_group_tags_the_reason(kaggle_data: Path, client: mlflow.MlflowClient) -> None:
    data = config.DataConfig(data=str(kaggle_data), image_size=32)
    train = config.TrainConfig(model="lenet", epochs=1, batch_size=16)
    out = bias_eval.run_bias_eval(
        data, train, config.BiasConfig(p0=0.0, p1=0.0), config.BiasEvalConfig(bootstrap=50, use_champion=False)
    )
    assert math.isnan(out["model_2_test_di"]) and out["model_2_test_n_s1"] == 0  # eps never present in distribution
    assert math.isfinite(out["model_2_decorrelated_test_n_s1"])
    runs = all_runs(client)
    assert all(r.info.status == "FINISHED" for r in runs) and len(runs) == 3
    child = next(r for r in runs if r.data.tags.get("role") == "model_2")
    assert child.data.tags["test_di_note"] == "DI undefined: group S=1 is empty in this split"
    parent = next(r for r in runs if "role" not in r.data.tags)
    assert parent.data.params["hparams_source"] == "command line"
    # the parent says why too; the verdict itself is 'undefined', or 'inconclusive' when a model did not learn
    assert parent.data.tags["model_2_test_di_note"] == "DI undefined: group S=1 is empty in this split"


def test_bias_eval_without_a_val_split_logs_no_val_numbers(kaggle_data: Path, client: mlflow.MlflowClient) -> None:
    """val_fraction=0 in bias_eval: every model keeps its last epoch and no run logs a val number it never had."""
    data = config.DataConfig(data=str(kaggle_data), image_size=32, val_fraction=0.0)
    train = config.TrainConfig(model="lenet", epochs=2, batch_size=16)
    out = bias_eval.run_bias_eval(
        data, train, config.BiasConfig(), config.BiasEvalConfig(bootstrap=50, use_champion=False)
    )
    assert 0 <= out["model_2_test_accuracy"] <= 1 and not [k for k in out if "val_" in k or "best_epoch" in k], out
    runs = all_runs(client)
    assert all(r.info.status == "FINISHED" for r in runs) and len(runs) == 3
    for r in runs:
        assert not [k for k in r.data.metrics if "val_" in k or "best_epoch" in k], (
            r.data.tags.get("role"),
            r.data.metrics,
        )
    assert {r.data.tags.get("role") for r in runs if "no_val_split" in r.data.tags} == {"model_1", "model_2"}

"""`bias_sweep`: how strong must a shortcut be before the model takes it?

model_2 is trained on every cell of a grid of (gap = p1 - p0, sigma), with p0 = (1 - gap)/2 and p1 = (1 + gap)/2:
eps is present in half of the images whatever the gap, only its correlation with the label changes (gap 0:
none, gap 1: S = y). One nested run per cell (role=model_2, the cell's p0/p1/sigma/gap as params), trained and
measured exactly like bias_eval's children, plus the eps ablation and saliency share. The parent logs
sweep.csv, sweep.md, sweep.html (heatmaps) and, per sigma, `threshold_gap_sigma_<sigma>`: the smallest gap from
which the decorrelated DI stays outside the four-fifths band (NaN: the shortcut is never taken in the grid).
"""

from __future__ import annotations

import math
import sys

import mlflow
import numpy as np

from bias_lab import config, explain, pipeline, plots, pretrained, recorder, tracking
from bias_lab import markdown as md
from bias_lab.bias import parse_classes
from bias_lab.config import NOT_USED_BY, BiasConfig, DataConfig, SweepConfig, TrainConfig
from bias_lab.data import check_classes, load
from bias_lab.device import resolve_device, seed_everything
from bias_lab.markdown import fmt
from bias_lab.pipeline import prepare
from bias_lab.verdict import Verdict, judge

SHOWN = {  # heatmap panel -> metric of each cell
    "decorrelated DI": "decorrelated_test_di",
    "decorrelated accuracy": "decorrelated_test_accuracy",
    "in-distribution accuracy": "test_accuracy",
    "saliency share on eps": "saliency_eps_share",
}


def cell_bias(gap: float, sigma: float, classes: str) -> BiasConfig:
    return BiasConfig(bias=True, classes=classes, p0=(1 - gap) / 2, p1=(1 + gap) / 2, sigma=sigma)


def threshold(gaps: list[float], verdicts: list[Verdict]) -> float:
    """Smallest gap from which every larger gap's model is judged biased on the decorrelated test. A cell whose model
    did not learn (or diverged) has no verdict: it ends the run, as an undefined DI does."""
    found = math.nan
    for gap, v in reversed(list(zip(gaps, verdicts))):
        if v.inconclusive or v.rule != "biased":
            break
        found = gap
    return found


def cell_verdict(cell: dict[str, float]) -> Verdict:
    """The decorrelated-test verdict of one cell's model_2, next to the labels' DI on that split."""
    return judge(cell, "", "decorrelated_test_", cell["chance"], cell["decorrelated_test_base_rate_di"])


def run_sweep(data_cfg: DataConfig, train_cfg: TrainConfig, sweep_cfg: SweepConfig) -> dict[str, float]:
    """The `bias_sweep` command: a parent run, one nested run per grid cell; returns the thresholds."""
    config.validate("bias_sweep", data_cfg, train_cfg, sweep_cfg)  # before any data is read or run opened
    pretrained.ensure(train_cfg.model, train_cfg.weights)
    gaps, sigmas = sweep_cfg.gap_values(), sweep_cfg.sigma_values()
    device = resolve_device(train_cfg.device)  # device=cuda without a usable GPU: one line, before any work
    tracking.setup()
    seed_everything(train_cfg.seed, train_cfg.threads, train_cfg.deterministic)
    ds = load(data_cfg)
    check_classes(ds)
    a, b = parse_classes(ds, sweep_cfg.classes)
    seed = train_cfg.seed
    cells: list[dict[str, float]] = []
    with tracking.run(f"bias_sweep-{train_cfg.model}-{a}v{b}", tags={"entry_point": "bias_sweep"}) as parent:
        for sigma in sigmas:
            for gap in gaps:
                bias = cell_bias(gap, sigma, sweep_cfg.classes)
                prep = prepare(data_cfg, bias, seed, binary=True, eps=True, ds=ds)
                if not cells:
                    recorder.setup(prep, data_cfg, train_cfg, sweep_cfg, skip=NOT_USED_BY["bias_sweep"])
                    tracking.log_params({"label_y0": a, "label_y1": b})
                tags = {"role": "model_2", "entry_point": "bias_sweep", "gap": f"{gap:g}", "sigma": f"{sigma:g}"}
                with tracking.run(f"gap={gap:g} sigma={sigma:g}", nested=True, tags=tags):
                    recorder.setup(prep, data_cfg, train_cfg, bias, skip=NOT_USED_BY["bias_sweep"])
                    tracking.log_params({"role": "model_2", "gap": gap})
                    trained = pipeline.train(
                        prep, train_cfg, device, bootstrap=sweep_cfg.bootstrap, on_epoch=recorder.epochs(prep)
                    )
                    recorder.record(trained, model=sweep_cfg.log_models)
                    ex, _ = explain.explain(trained.model, prep, seed, train_cfg.tta)
                    tracking.log_metrics(ex)
                chance, labels = pipeline.baselines(prep)
                cell = {"gap": gap, "sigma": sigma, "p0": bias.p0, "p1": bias.p1, **trained.measures, **ex}
                cells.append({**cell, "chance": chance, "decorrelated_test_base_rate_di": labels["decorrelated"]})
        summary = _log_sweep(cells, gaps, sigmas, train_cfg.model, (a, b))
        print(", ".join(f"{k}={v:g}" for k, v in summary.items()), file=sys.stderr)
        print(tracking.ui_hint(parent), file=sys.stderr)
    return summary


def _log_sweep(
    cells: list[dict[str, float]], gaps: list[float], sigmas: list[float], arch: str, classes: tuple[str, str]
) -> dict[str, float]:
    import pandas as pd

    table = pd.DataFrame(cells)
    grid = lambda m: np.array(
        [[table[(table.gap == g) & (table.sigma == s)][m].iloc[0] for g in gaps] for s in sigmas], dtype=float
    )  # noqa: E731
    verdicts = {(c["sigma"], c["gap"]): cell_verdict(c) for c in cells}
    summary = {f"threshold_gap_sigma_{s:g}": threshold(gaps, [verdicts[(s, g)] for g in gaps]) for s in sigmas}
    found = [v for v in summary.values() if not math.isnan(v)]
    summary["threshold_gap"] = min(found) if found else math.nan  # the weakest correlation taken at any sigma
    tracking.log_metrics(summary)
    keep = [
        "gap",
        "sigma",
        "p0",
        "p1",
        *SHOWN.values(),
        "decorrelated_test_di_ci_low",
        "decorrelated_test_di_ci_high",
        "test_di",
        "ablation_zero_eps_test_accuracy",
        "ablation_shuffle_eps_test_accuracy",
        "train_time_s",
    ]
    table = table[[c for c in keep if c in table]]
    table["four_fifths"] = [verdicts[(s, g)].text() for s, g in zip(table.sigma, table.gap)]
    tracking.log_table(table, "sweep")
    title = f"{arch}, classes {classes[0]} vs {classes[1]}: model_2 over p1-p0 and sigma (p0=(1-gap)/2, p1=(1+gap)/2)"
    tracking.log_figure(plots.sweep_heatmaps(gaps, sigmas, {k: grid(m) for k, m in SHOWN.items()}, title), "sweep")
    text = sweep_markdown(title, table.to_dict("records"), verdicts, sigmas, gaps, summary)
    mlflow.log_text(text, "sweep.md")
    return summary


def sweep_markdown(
    title: str,
    rows: list[dict[str, float]],
    verdicts: dict[tuple[float, float], Verdict],
    sigmas: list[float],
    gaps: list[float],
    summary: dict[str, float],
) -> str:
    """sweep.md: one row per cell with its verdict, then the threshold per sigma in words."""
    head = [
        "sigma",
        "gap",
        "p0",
        "p1",
        "decorrelated DI [95% CI]",
        "four-fifths",
        "decorrelated acc",
        "in-dist acc",
        "saliency on eps",
    ]
    lines = [
        f"# Bias sweep: {title}",
        "",
        md.table(
            head,
            (
                [
                    f"{r['sigma']:g}",
                    f"{r['gap']:g}",
                    f"{r['p0']:g}",
                    f"{r['p1']:g}",
                    f"{fmt(r['decorrelated_test_di'])} [{fmt(r['decorrelated_test_di_ci_low'])}, {fmt(r['decorrelated_test_di_ci_high'])}]",
                    verdicts[(r["sigma"], r["gap"])].text(),
                    fmt(r["decorrelated_test_accuracy"], True),
                    fmt(r["test_accuracy"], True),
                    fmt(r["saliency_eps_share"], True),
                ]
                for r in rows
            ),
        ),
        "",
        "## Threshold: the smallest p1-p0 from which the model takes the shortcut",
        "",
    ]
    for s in sigmas:
        t = summary[f"threshold_gap_sigma_{s:g}"]
        silent = [g for g in gaps if verdicts[(s, g)].inconclusive]
        if not math.isnan(t):
            said = f"from p1-p0 = {t:g} on, the decorrelated DI leaves [0.8, 1.25]."
        elif len(silent) == len(gaps):
            said = "no model of this row learned its task: no verdict (train longer, or tune lr / batch_size)."
        elif silent:
            said = (
                f"no threshold can be read: {len(silent)} of {len(gaps)} models did not learn (gaps "
                f"{', '.join(f'{g:g}' for g in silent)}), so they have no verdict; train longer."
            )
        else:
            said = "the decorrelated DI stays inside [0.8, 1.25] at the largest gap of the grid: the shortcut is not taken."
        lines.append(f"- sigma={s:g}: {said}")
    return "\n".join(lines) + "\n"

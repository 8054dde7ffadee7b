"""`bias_eval`: does a model take the eps shortcut? model_1 (no usable shortcut) vs model_2 (biased data),
and optionally model_3 (model_2's data with a mitigation, bias_lab.mitigation).

One parent run; one nested child per (model, seed) tagged role=model_1 / model_2 / model_3, trained by
pipeline.train with the same architecture, hyperparameters, splits and seed, so the children carry
identical metric names (test_* under the training bias, decorrelated_test_* with S independent of y, and the
explanations of bias_lab.explain) and the MLflow Compare view shows them side by side. The parent holds the
comparison: `<role>_<metric>` (mean over seeds, `_std` beside it when seeds > 1), comparison.csv/.md,
the comparison figure (in figures.html), conclusion.md and the run's Description.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable

import mlflow
import torch

from bias_lab import bias as biasmod
from bias_lab import (
    card,
    comparison,
    config,
    facts,
    metrics,
    mitigation,
    pipeline,
    plots,
    pretrained,
    recorder,
    registry,
    tracking,
)
from bias_lab.config import NOT_USED_BY, SEARCHED, BiasConfig, BiasEvalConfig, DataConfig, TrainConfig
from bias_lab.data import Dataset, check_classes, load
from bias_lab.device import resolve_device, seed_everything
from bias_lab.errors import UserError
from bias_lab.loop import InputHook
from bias_lab.pipeline import Prepared, prepare


@dataclass
class Arm:
    """One model of the comparison: its data (with or without eps, at which p) and training hooks."""

    role: str
    description: str
    prep: Prepared
    wrap: Callable | None = None  # pipeline.train's wrap (model_3: adversarial head)
    input_hook: InputHook | None = None  # loop.fit's input hook (model_3: channel dropout)
    note: str = ""  # a caveat about this model on this data, logged as the child's `note` tag


# ------------------------------------------------------------------------------------------- hyperparameters


def hyperparameters(
    train_cfg: TrainConfig, eval_cfg: BiasEvalConfig, digests: tuple[str, ...]
) -> tuple[TrainConfig, str]:
    """The training settings both models share: the champion's lr/momentum/batch_size when asked and found."""
    found = (
        registry.champion_hparams(eval_cfg.registered_model, digests, train_cfg.model)
        if eval_cfg.use_champion
        else None
    )
    if found is None:
        return train_cfg, "command line" + (
            ""
            if not eval_cfg.use_champion
            else " (no registered model tuned on this binary task with this architecture)"
        )
    params, uri = found
    return dataclasses.replace(train_cfg, **params), uri


# ------------------------------------------------------------------------------------------- the models


def arms(ds: Dataset, data_cfg: DataConfig, bias_cfg: BiasConfig, eval_cfg: BiasEvalConfig, seed: int) -> list[Arm]:
    """model_1, model_2 (and model_3 with a mitigation) for one seed: same images, same splits, same S draws
    for the test measures."""
    p0, p1 = bias_cfg.p0, bias_cfg.p1
    if eval_cfg.model_1_mode == "clean":
        m1 = Arm(
            "model_1", "clean images (1 channel)", prepare(data_cfg, bias_cfg, seed, binary=True, eps=False, ds=ds)
        )
    else:  # a later edition of the course: eps present, but equally often in both classes, so it carries no label
        p = (p0 + p1) / 2  # same overall eps frequency as model_2's training data
        m1 = Arm(
            "model_1",
            f"eps channel with p0=p1={p:g}",
            prepare(data_cfg, bias_cfg, seed, binary=True, eps=True, train_p=(p, p), ds=ds),
        )
    m2 = Arm(
        "model_2",
        f"biased eps channel (p0={p0:g}, p1={p1:g}, sigma={bias_cfg.sigma:g})",
        prepare(data_cfg, bias_cfg, seed, binary=True, eps=True, ds=ds),
    )
    if eval_cfg.mitigation == "none":
        return [m1, m2]
    m = mitigation.build(eval_cfg.mitigation, m2.prep, bias_cfg, eval_cfg, seed)
    return [m1, m2, Arm("model_3", f"{eval_cfg.mitigation}: {m.description}", m.prep, m.wrap, m.input_hook, m.note)]


def train_arm(
    arm: Arm,
    seed: int,
    cfgs: tuple[DataConfig, TrainConfig, BiasConfig, BiasEvalConfig],
    device: torch.device,
    nested_name: str,
    source: str = "",
) -> dict[str, float]:
    """One child run: setup, training, the test measures, the explanations and its model card; returns its metrics.
    `source`: where the hyperparameters came from."""
    data_cfg, train_cfg, bias_cfg, eval_cfg = cfgs
    with tracking.run(nested_name, nested=True, tags={"role": arm.role, "seed": str(seed), "entry_point": "bias_eval"}):
        recorder.setup(arm.prep, data_cfg, train_cfg, bias_cfg, eval_cfg, skip=NOT_USED_BY["bias_eval"])
        tracking.log_params({"role": arm.role, "model_description": arm.description, "eps_channel": arm.prep.eps})
        if arm.note:
            mlflow.set_tag("note", arm.note)
        trained = pipeline.train(
            arm.prep,
            train_cfg,
            device,
            bootstrap=eval_cfg.bootstrap,
            on_epoch=recorder.epochs(arm.prep),
            wrap=arm.wrap,
            input_hook=arm.input_hook,
        )
        recorder.record(trained)
        found = {**trained.measures, **recorder.explanations(trained, arm.prep, seed)}
        if trained.tested and "test_accuracy" in found:
            recorder.model_card(model_card(trained, arm, found, source))
        return found


def model_card(t: pipeline.Trained, arm: Arm, found: dict[str, float], source: str) -> card.Card:
    """A bias-study model's card: its accuracy, DI in distribution and decorrelated beside the labels' own DI, the
    eps ablation, the mitigation and the verdict, all as the comparison reports them."""
    mitigated = arm.description if arm.role == "model_3" else None
    study = facts.of_bias(found, arm.prep, f"{arm.role}: {arm.description}", arm.note, mitigated)
    plain = facts.of_trained(t, arm.prep, arm.role, "")
    return dataclasses.replace(plain, bias=study, hparams_source=source)


# ------------------------------------------------------------------------------------------- the command


def _comparison_metrics(results: dict[str, list[dict[str, float]]], bases: dict[str, float]) -> dict[str, float]:
    """The parent's metrics: every child's means over seeds, what the shortcut buys and costs, the labels' DI."""
    summary = comparison.summarize(results)
    g = lambda key: summary.get(key, math.nan)  # noqa: E731  (a diverged model has no test numbers)
    summary.update(
        {
            "shortcut_accuracy_gain": g("model_2_test_accuracy") - g("model_1_test_accuracy"),
            "shortcut_accuracy_cost": g("model_1_decorrelated_test_accuracy") - g("model_2_decorrelated_test_accuracy"),
            "test_base_rate_di": bases["in distribution"],
            "decorrelated_test_base_rate_di": bases["decorrelated"],
        }
    )
    if "model_3" in results:  # how far the mitigated model is from the one that never had the shortcut
        summary["mitigation_accuracy_gap"] = g("model_3_decorrelated_test_accuracy") - g(
            "model_1_decorrelated_test_accuracy"
        )
    return summary


@dataclass
class _Study:
    """What the seeds of one bias_eval gather: each model's metrics per seed, descriptions, notes, baselines."""

    device: torch.device  # where every model trains

    results: dict[str, list[dict[str, float]]] = dataclasses.field(default_factory=dict)
    descriptions: dict[str, str] = dataclasses.field(default_factory=dict)
    notes: dict[str, str] = dataclasses.field(default_factory=dict)
    chance: list[float] = dataclasses.field(default_factory=list)
    base_di: dict[str, list[float]] = dataclasses.field(default_factory=lambda: {t: [] for t in comparison.TESTS})


def _run_seed(
    study: _Study,
    ds: Dataset,
    k: int,
    cfgs: tuple[DataConfig, TrainConfig, BiasConfig, BiasEvalConfig],
    classes: tuple[str, str],
    source: str,
) -> None:
    """One seed: every model's child run, trained on the same splits and S draws."""
    data_cfg, train_cfg, bias_cfg, eval_cfg = cfgs
    seed = train_cfg.seed + k
    models = arms(ds, data_cfg, bias_cfg, eval_cfg, seed)
    ref = models[1].prep  # model_2's data: the splits and S draws every model is measured on
    if k == 0:
        recorder.setup(ref, data_cfg, train_cfg, bias_cfg, eval_cfg, skip=NOT_USED_BY["bias_eval"])
        tracking.log_params(
            {
                "hparams_source": source,
                "label_y0": classes[0],
                "label_y1": classes[1],
                "hparams": ", ".join(f"{h}={getattr(train_cfg, h)}" for h in SEARCHED),
            }
        )
    chance, base = pipeline.baselines(ref)
    study.chance.append(chance)
    for test, di in base.items():
        study.base_di[test].append(di)
    for arm in models:
        name = arm.role if eval_cfg.seeds == 1 else f"{arm.role}-seed{seed}"
        study.descriptions[arm.role] = arm.description
        if arm.note and arm.role not in study.notes:  # said before the training it makes moot, not only after
            print(f"note: {arm.role} ({eval_cfg.mitigation}): {arm.note}", file=sys.stderr)
        if arm.note:
            study.notes[arm.role] = arm.note
        cfg = dataclasses.replace(train_cfg, seed=seed)
        trained = train_arm(arm, seed, (data_cfg, cfg, bias_cfg, eval_cfg), study.device, name, source)
        study.results.setdefault(arm.role, []).append(trained)


def run_bias_eval(
    data_cfg: DataConfig, train_cfg: TrainConfig, bias_cfg: BiasConfig, eval_cfg: BiasEvalConfig
) -> dict[str, float]:
    """The `bias_eval` command: parent run + one child per (model, seed); returns the parent's comparison metrics."""
    config.validate("bias_eval", data_cfg, train_cfg, bias_cfg, eval_cfg)  # before any data is read or run opened
    pretrained.ensure(train_cfg.model, train_cfg.weights)
    device = resolve_device(train_cfg.device)  # device=cuda without a usable GPU: one line, before any work
    tracking.setup()
    seed_everything(train_cfg.seed, train_cfg.threads, train_cfg.deterministic)
    ds = load(data_cfg)
    check_classes(ds)
    classes = biasmod.parse_classes(ds, bias_cfg.classes)
    # only a model tuned on this binary task (`tune --bias true --classes A,B`) vouches for its hyperparameters:
    # the 4-class champion's (lr 0.34, batch 128, say) made model_2 collapse to one class on the pair
    train_cfg, source = hyperparameters(train_cfg, eval_cfg, (f"{ds.digest}-{classes[0]}v{classes[1]}",))
    print(
        f"hyperparameters of both models: {', '.join(f'{h}={getattr(train_cfg, h)}' for h in SEARCHED)}, "
        f"epochs={train_cfg.epochs}; source: {source}",
        file=sys.stderr,
    )
    study = _Study(device)
    with tracking.run(
        f"bias_eval-{train_cfg.model}-{classes[0]}v{classes[1]}", tags={"entry_point": "bias_eval"}
    ) as parent:
        for k in range(eval_cfg.seeds):
            _run_seed(study, ds, k, (data_cfg, train_cfg, bias_cfg, eval_cfg), classes, source)
        bases = {t: comparison.nanmean(v) for t, v in study.base_di.items()}
        chance = comparison.nanmean(study.chance)
        summary = _comparison_metrics(study.results, bases)
        rows = comparison.table_rows(summary, study.descriptions, eval_cfg.seeds, chance, study.notes)
        tracking.log_metrics(summary)
        text = comparison.conclusion(summary, rows, bias_cfg, classes, chance, bases, eval_cfg.seeds, study.notes)
        if train_cfg.weights != "none":  # said under the heading, where no reader can miss it
            title, rest = text.split("\n\n", 1)
            text = f"{title}\n\n**Weights:** every model here {pretrained.CAVEAT}.\n\n{rest}"
            mlflow.set_tag("pretrained", pretrained.CAVEAT)
        headline = comparison.headline(summary, rows, chance)
        _log_comparison(rows, text, headline, bias_cfg, classes, train_cfg.model)
        print(f"\n{comparison.short_table(rows)}\n\n{headline}", file=sys.stderr)
        print(tracking.ui_hint(parent), file=sys.stderr)
    silent = {r["model"]: r["verdict"].status for r in rows if r["verdict"].inconclusive}
    if data_cfg.strict and silent:  # the run stays FINISHED: its numbers are right, they just settle nothing
        said = "; ".join(f"{m} {s}" for m, s in sorted(silent.items()))
        raise UserError(
            f"no verdict (strict=true): {said}; lower lr if a model diverged, else train longer (epochs) or tune "
            "lr / batch_size for this pair"
        )
    return summary


def _log_comparison(
    rows: list[dict[str, Any]], text: str, headline: str, bias_cfg: BiasConfig, classes: tuple[str, str], arch: str
) -> None:
    """The parent's comparison: CSV, a browsable MLflow table, markdown, the figure, the conclusion, and the run's
    Description (what the MLflow UI shows on the run page): the verdicts, the short table, then the conclusion."""
    import pandas as pd

    table = pd.DataFrame([{k: v for k, v in r.items() if k != "verdict"} for r in rows])
    tracking.log_table(table, "comparison")
    mlflow.log_text(comparison.markdown_table(rows) + "\n", "comparison.md")
    title = f"{arch}, classes {classes[0]} vs {classes[1]}: p0={bias_cfg.p0:g}, p1={bias_cfg.p1:g}, sigma={bias_cfg.sigma:g}"
    tracking.log_figure(plots.bias_comparison(rows, title), "comparison")
    mlflow.log_text(text, "conclusion.md")
    tracking.set_description(
        f"{headline}\n\n{comparison.short_table(rows)}\n\n"
        "Figure: Artifacts → `figures.html`; every measure: `comparison.md`; the models' own runs are "
        "nested below (model_1, model_2...).\n\n"
        + text.replace("\n#", "\n###").replace("# Conclusion", "### Conclusion", 1),
        "conclusion.md",
    )
    mlflow.set_tags({f"{r['model']}_verdict": r["four_fifths"] for r in rows if r["test"] == "decorrelated"})
    for r in rows:  # NaN / inf comparisons get their reason on the parent too
        note = (
            metrics.explain({"n_s0": r["n_s0"], "n_s1": r["n_s1"], "di": r["di"]}) if not math.isfinite(r["di"]) else ""
        )
        if note:
            mlflow.set_tag(f"{r['model']}_{comparison.TESTS[r['test']]}di_note", note)

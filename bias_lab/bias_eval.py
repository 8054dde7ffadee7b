"""`bias_eval`: does a model take the eps shortcut? model_1 (no usable shortcut) vs model_2 (biased data),
and optionally model_3 (model_2's data with a mitigation, bias_lab.mitigation).

One parent run; one nested child per (model, seed) tagged role=model_1 / model_2 / model_3, trained by
pipeline.train_model with the same architecture, hyperparameters, splits and seed, so the children carry
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
import numpy as np

from bias_lab import bias as biasmod
from bias_lab import config, explain, metrics, mitigation, plots, pretrained, registry, tracking
from bias_lab import markdown as md
from bias_lab.config import NOT_USED_BY, BiasConfig, BiasEvalConfig, DataConfig, TrainConfig
from bias_lab.data import Dataset, check_classes, load
from bias_lab.errors import UserError
from bias_lab.loop import InputHook
from bias_lab.markdown import fmt
from bias_lab.pipeline import Outputs, Prepared, log_setup, prepare, train_model

TESTS = {"in distribution": "test_", "decorrelated": "decorrelated_test_"}  # table label -> metric prefix
MEASURES = (
    "accuracy",
    "accuracy_ci_low",
    "accuracy_ci_high",
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
)
CLOSE = 0.05  # accuracy within 5 points of chance counts as "towards chance" in the conclusion
MITIGATION_TOLERANCE = 0.05  # model_3 "keeps accuracy" when within 5 points of model_1 on the decorrelated test


@dataclass
class Arm:
    """One model of the comparison: its data (with or without eps, at which p) and training hooks."""

    role: str
    description: str
    prep: Prepared
    wrap: Callable | None = None  # pipeline.train_model's wrap (model_3: adversarial head)
    input_hook: InputHook | None = None  # loop.fit's input hook (model_3: channel dropout)
    note: str = ""  # a caveat about this model on this data, logged as the child's `note` tag


# ------------------------------------------------------------------------------------------- validation


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
    data_cfg: DataConfig,
    train_cfg: TrainConfig,
    bias_cfg: BiasConfig,
    eval_cfg: BiasEvalConfig,
    nested_name: str,
) -> dict[str, float]:
    """One child run: setup, training, the test measures and the explanations; returns its metrics."""
    with tracking.run(nested_name, nested=True, tags={"role": arm.role, "seed": str(seed), "entry_point": "bias_eval"}):
        log_setup(arm.prep, data_cfg, train_cfg, bias_cfg, eval_cfg, skip=NOT_USED_BY["bias_eval"])
        tracking.log_params({"role": arm.role, "model_description": arm.description, "eps_channel": arm.prep.eps})
        if arm.note:
            mlflow.set_tag("note", arm.note)
        net, out = train_model(
            arm.prep, train_cfg, Outputs(bootstrap=eval_cfg.bootstrap), wrap=arm.wrap, input_hook=arm.input_hook
        )
        out.update(explain.log_explanations(net, arm.prep, seed, train_cfg.tta))
    return out


# ------------------------------------------------------------------------------------------- the comparison


def summarize(results: dict[str, list[dict[str, float]]]) -> dict[str, float]:
    """`<role>_<metric>` = mean over seeds, plus `<role>_<metric>_std` (sample std) when there are several.

    nanmean: a seed whose DI is undefined does not erase the others; all-NaN stays NaN. An inf DI makes the
    mean inf, the honest summary (shown as 'inf'; stored as NaN with a di_note tag, see tracking.log_metrics).
    """
    out: dict[str, float] = {}
    for role, runs in results.items():
        for key in runs[0]:
            v = np.array([r.get(key, math.nan) for r in runs], dtype=float)
            out[f"{role}_{key}"] = _mean(v)
            with np.errstate(invalid="ignore"):  # inf - inf inside std: NaN is the answer
                if len(runs) > 1:
                    out[f"{role}_{key}_std"] = float(np.nanstd(v, ddof=1)) if np.sum(~np.isnan(v)) > 1 else math.nan
    return out


def _mean(values: Any) -> float:
    v = np.asarray(values, dtype=float)
    return math.nan if np.isnan(v).all() else float(np.nanmean(v))


def learned(accuracy: float, ci_low: float, chance: float) -> bool:
    """Did a model learn its (in-distribution) task? Its test accuracy's 95% CI lies above chance (a point
    estimate at least CLOSE above chance when there is no CI). A model at chance predicts one class or at
    random: its DI describes no decision rule, so it gets no verdict."""
    if math.isnan(accuracy) or math.isnan(chance):
        return False
    return ci_low > chance if not math.isnan(ci_low) else accuracy - chance >= CLOSE


def table_rows(
    summary: dict[str, float],
    descriptions: dict[str, str],
    seeds: int,
    chance: float,
    notes: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """One row per (model, test distribution), as logged in comparison.csv. `four_fifths` is the verdict, or
    'inconclusive: did not learn ...' for a model whose in-distribution accuracy is not above `chance`, or
    'not applicable: ...' for a model_3 whose mitigation could not act on this data (`notes`)."""
    notes = notes or {}
    rows = []
    for role, desc in descriptions.items():
        acc, low = (summary.get(f"{role}_test_{m}", math.nan) for m in ("accuracy", "accuracy_ci_low"))
        for test, prefix in TESTS.items():
            get = lambda m, role=role, prefix=prefix: summary.get(f"{role}_{prefix}{m}", math.nan)
            row = {"model": role, "trained_on": desc, "test": test, **{m: get(m) for m in MEASURES}}
            if seeds > 1:
                row.update({f"{m}_std": get(f"{m}_std") for m in ("accuracy", "di")})
            verdict = metrics.verdict(get("di"), get("di_ci_low"), get("di_ci_high"))
            row["four_fifths"] = (
                verdict
                if verdict == "undefined" or learned(acc, low, chance)
                else f"inconclusive: did not learn (test accuracy {fmt(acc, True)}, chance {fmt(chance, True)})"
            )
            if role in notes:
                row["four_fifths"] = f"not applicable: {notes[role].split(':')[0]}"
            rows.append(row)
    return rows


def _pm(r: dict[str, Any], m: str, pct: bool) -> str:
    """A row's measure, with ± its std over seeds when there is one."""
    return fmt(r[m], pct) + (f" ± {fmt(r[m + '_std'], pct)}" if not math.isnan(r.get(m + "_std", math.nan)) else "")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The comparison as a markdown table (mean ± std over seeds when there are several)."""
    head = [
        "model",
        "test",
        "accuracy [95% CI]",
        "DI [95% CI]",
        "DP ratio",
        "P(ŷ=1|S=0)",
        "P(ŷ=1|S=1)",
        "acc S=0",
        "acc S=1",
        "n S=0 / S=1",
        "four-fifths rule",
    ]
    return md.table(
        head,
        (
            [
                f"{r['model']} ({r['trained_on']})",
                r["test"],
                f"{_pm(r, 'accuracy', True)} [{fmt(r['accuracy_ci_low'], True)}, {fmt(r['accuracy_ci_high'], True)}]",
                f"{_pm(r, 'di', False)} [{fmt(r['di_ci_low'])}, {fmt(r['di_ci_high'])}]",
                fmt(r["dp_ratio"]),
                fmt(r["selection_rate_s0"]),
                fmt(r["selection_rate_s1"]),
                fmt(r["accuracy_s0"], True),
                fmt(r["accuracy_s1"], True),
                f"{fmt(r['n_s0'])} / {fmt(r['n_s1'])}",
                r["four_fifths"],
            ]
            for r in rows
        ),
    )


def short_table(rows: list[dict[str, Any]]) -> str:
    """The comparison in five columns (model, test, accuracy, DI, verdict): what fits a run page or a terminal."""
    return md.table(
        ["model", "test", "accuracy [95% CI]", "DI [95% CI]", "four-fifths rule"],
        (
            [
                r["model"],
                r["test"],
                f"{_pm(r, 'accuracy', True)} [{fmt(r['accuracy_ci_low'], True)}, {fmt(r['accuracy_ci_high'], True)}]",
                f"{_pm(r, 'di', False)} [{fmt(r['di_ci_low'])}, {fmt(r['di_ci_high'])}]",
                r["four_fifths"],
            ]
            for r in rows
        ),
    )


def conclusion(
    summary: dict[str, float],
    rows: list[dict[str, Any]],
    bias_cfg: BiasConfig,
    classes: tuple[str, str],
    chance: float,
    base_di: dict[str, float],
    seeds: int,
    notes: dict[str, str] | None = None,
) -> str:
    """The course's questions 2-4 answered from the measured numbers (markdown), plus the explanations and
    model_3 when present. NaN-safe. `notes`: caveats per role (e.g. why reweighing cannot work here)."""
    notes = notes or {}
    g = lambda role, key: summary.get(f"{role}_{key}", math.nan)  # noqa: E731
    row = {(r["model"], r["test"]): r for r in rows}
    roles = list(dict.fromkeys(r["model"] for r in rows))
    acc1, acc2 = g("model_1", "test_accuracy"), g("model_2", "test_accuracy")
    dacc1, dacc2 = g("model_1", "decorrelated_test_accuracy"), g("model_2", "decorrelated_test_accuracy")
    gain, cost, drop2 = acc2 - acc1, dacc1 - dacc2, acc2 - dacc2
    p = lambda x: fmt(x, True)  # noqa: E731
    a, b = classes
    untrained = [r for r in roles if any(row[(r, t)]["four_fifths"].startswith("inconclusive") for t in TESTS)]
    out = [
        "# Conclusion (generated from the measured numbers)",
        "",
        f"Binary task: label {a} is y=0, label {b} is y=1. eps is present (S=1) with P(S=1|y=0)={bias_cfg.p0:g}, "
        f"P(S=1|y=1)={bias_cfg.p1:g}, std sigma={bias_cfg.sigma:g}. The decorrelated test uses the same test images "
        "with S = 1 on a random half of each class (S independent of y in the sample). "
        f"Numbers are {'means over ' + str(seeds) + ' seeds' if seeds > 1 else 'from one seed'}; "
        f"chance (majority class of the test split) is {p(chance)}.",
        "",
        (
            "Uncertainty: [brackets] are 95% intervals of the test sampling (Wilson for accuracy, bootstrap for DI), averaged "
            "over the seeds; ± is the standard deviation across seeds (training: initialisation, batch order, eps draws); "
            "'across seeds' intervals are 95% t-intervals of the mean over seeds."
            if seeds > 1
            else "Uncertainty: [brackets] are 95% intervals of the test sampling only (Wilson for accuracy, bootstrap for DI); "
            "they do not cover training variance: run with seeds=3 for that."
        ),
    ]
    if untrained:
        out += [
            "",
            f"**Caution: {' and '.join(untrained)} did not learn the task** (in-distribution test accuracy not "
            f"above chance, {p(chance)}, within its 95% CI): no verdict on {'its' if len(untrained) == 1 else 'their'} bias. "
            "Train longer (epochs), or tune lr / batch_size for this binary task.",
        ]
    out += [
        "",
        "## Q2. Accuracy: what does the shortcut buy, and what does it cost?",
        "",
        f"- In distribution, model_1 reaches {p(acc1)} and model_2 {p(acc2)}: the eps channel {_buys(gain)} for model_2.",
        f"- On the decorrelated test (S independent of y), model_1 scores {p(dacc1)} and model_2 {p(dacc2)} "
        f"({_points(-drop2)} from its in-distribution accuracy, {_points(-cost)} vs model_1)"
        + (
            " — down to chance: what model_2 learned was eps, not the classes."
            if dacc2 - chance < CLOSE and drop2 > CLOSE
            else "."
        ),
        "",
        "## Q3. Disparate impact and the four-fifths rule (DI outside [0.8, 1.25] = biased)",
        "",
    ]
    for (role, test), r in row.items():
        spread = ""
        if seeds > 1 and not math.isnan(r.get("di_std", math.nan)):
            lo, hi = seed_interval(r["di"], r["di_std"], seeds)
            spread = f"; across seeds {fmt(r['di'])} ± {fmt(r['di_std'])}, 95% t-interval {fmt(lo)}–{fmt(hi)}"
        out.append(
            f"- {role}, {test}: DI = {fmt(r['di'])} (95% CI {fmt(r['di_ci_low'])}–{fmt(r['di_ci_high'])}{spread}) "
            f"→ **{r['four_fifths']}**."
        )
    out += [
        "",
        f"In distribution the labels themselves have DI = {fmt(base_di['in distribution'])} "
        "(P(y=1|S=0)/P(y=1|S=1) on the test split): a perfect classifier that never looks at eps would score that, so "
        "there DI measures the data as much as the model. "
        f"On the decorrelated test the labels' DI is {fmt(base_di['decorrelated'])}, "
        + (
            "so a DI outside the band there comes from the model."
            if metrics.FOUR_FIFTHS[0] <= base_di["decorrelated"] <= metrics.FOUR_FIFTHS[1]
            else "not inside the band itself (too few test images per class to split evenly by S): compare each "
            "model's DI with that number."
        ),
        "",
        "## Q4. Which model is biased, and why?",
        "",
    ]
    v1 = row.get(("model_1", "decorrelated"), {}).get("four_fifths", "undefined")
    v2 = row.get(("model_2", "decorrelated"), {}).get("four_fifths", "undefined")
    if v2.startswith("inconclusive"):
        out.append("- model_2 did not learn the task: no verdict on whether it took the shortcut.")
    elif v2 == "biased" and dacc2 - chance < CLOSE:
        out.append(
            "- model_2 took the shortcut: on the decorrelated test its decisions follow S, not the image "
            "(DI outside the band, accuracy near chance). Its in-distribution accuracy comes from eps, not from the classes."
        )
    elif v2 == "biased":
        out.append(
            "- model_2 partly relies on eps: its decisions depend on S on the decorrelated test, although it keeps some accuracy from the image."
        )
    elif v2.startswith("borderline"):
        out.append(
            "- model_2's decorrelated DI is borderline: the CI crosses the band edge; more test data or seeds would settle it."
        )
    elif v2 == "undefined":
        out.append("- model_2's decorrelated DI is undefined (see the di_note tags): no conclusion on its bias.")
    else:
        out.append(
            "- model_2 shows no measurable reliance on eps on the decorrelated test (the shortcut was too weak or too noisy to be taken)."
        )
    if v1 == "not biased":
        out.append(
            "- model_1 is not biased: on the decorrelated test its DI lies inside the four-fifths band, so its decisions do not depend on S."
        )
    else:
        out.append(f"- model_1 on the decorrelated test: {v1}.")
    if pair_untrained := [r for r in untrained if r in ("model_1", "model_2")]:
        out.append(
            f"- In short: no conclusion on the shortcut until {' and '.join(pair_untrained)} learn"
            f"{'s' if len(pair_untrained) == 1 else ''} the task."
        )
    else:
        out.append(
            f"- In short: the shortcut {_buys(gain)} in distribution and costs {_points(cost, signed=False) if cost > 0 else 'nothing'} "
            "against model_1 once eps no longer predicts the label: good numbers on biased data say nothing about the model outside it."
        )
    if any(f"{role}_saliency_eps_share" in summary for role in roles):
        out += ["", "## Why: what each model looks at (eps ablation, input-gradient saliency)", ""]
        for role in roles:
            out.append(
                f"- {role}: test accuracy {p(g(role, 'test_accuracy'))}; with eps zeroed "
                f"{p(g(role, 'ablation_zero_eps_test_accuracy'))}, with eps shuffled across images "
                f"{p(g(role, 'ablation_shuffle_eps_test_accuracy'))}; {p(g(role, 'saliency_eps_share'))} of the "
                "input-gradient saliency falls on eps."
            )
    if "model_3" in roles:
        r3 = row[("model_3", "decorrelated")]
        dacc3, acc3 = g("model_3", "decorrelated_test_accuracy"), g("model_3", "test_accuracy")
        inside = not metrics.biased(r3["di"]) and not math.isnan(r3["di"])
        close = abs(dacc3 - dacc1) <= MITIGATION_TOLERANCE
        out += [
            "",
            f"## Mitigation: model_3 ({r3['trained_on']})",
            "",
            f"- On the decorrelated test model_3 has DI = {fmt(r3['di'])} (95% CI {fmt(r3['di_ci_low'])}–{fmt(r3['di_ci_high'])}) "
            f"→ **{r3['four_fifths']}**, accuracy {p(dacc3)} ({_points(dacc3 - dacc1)} vs model_1, {_points(dacc3 - dacc2)} vs model_2); "
            f"in distribution {p(acc3)}.",
        ]
        if notes.get("model_3"):
            out.append(
                f"- Not applicable here: {notes['model_3']}. model_3 is trained on model_2's data with no effective "
                "change, so its numbers say nothing about the method."
            )
        elif inside and close and "model_3" not in untrained:
            out.append(
                f"- The mitigation works here: decorrelated DI inside the four-fifths band and accuracy within "
                f"{100 * MITIGATION_TOLERANCE:.0f} points of model_1."
            )
        else:
            why = [
                w
                for w, bad in (
                    ("its decorrelated DI is outside the band", not inside),
                    (f"its accuracy is more than {100 * MITIGATION_TOLERANCE:.0f} points from model_1's", not close),
                    ("it did not learn the task", "model_3" in untrained),
                )
                if bad
            ]
            out.append("- The mitigation does not work here: " + "; ".join(why) + ".")
    return "\n".join(out) + "\n"


# Student t 97.5% quantiles for df = 1..30 (index = df); beyond 30 the df=30 value, slightly conservative
T975 = (
    math.nan,
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


def seed_interval(mean: float, std: float, n: int) -> tuple[float, float]:
    """95% t-interval of a mean over n >= 2 seeds from their sample std: the training variance of the mean."""
    half = T975[min(n - 1, len(T975) - 1)] * std / math.sqrt(n)
    return mean - half, mean + half


def _points(x: float, signed: bool = True) -> str:
    if math.isnan(x):
        return "n/a"
    v = round(100 * x, 1) + 0.0  # + 0.0 turns -0.0 into 0.0
    return f"{v:+.1f} points" if signed else f"{v:.1f} points"


def _buys(gain: float) -> str:
    if math.isnan(gain):
        return "buys n/a"
    return f"buys {_points(gain, signed=False)} of accuracy" if gain > 0 else f"buys nothing ({_points(gain)})"


# ------------------------------------------------------------------------------------------- the command


def run_bias_eval(
    data_cfg: DataConfig, train_cfg: TrainConfig, bias_cfg: BiasConfig, eval_cfg: BiasEvalConfig
) -> dict[str, float]:
    """The `bias_eval` command: parent run + one child per (model, seed); returns the parent's comparison metrics."""
    config.validate("bias_eval", data_cfg, train_cfg, bias_cfg, eval_cfg)  # before any data is read or run opened
    pretrained.ensure(train_cfg.model, train_cfg.weights)
    tracking.setup()
    ds = load(data_cfg)
    check_classes(ds)
    classes = biasmod.parse_classes(ds, bias_cfg.classes)
    # only a model tuned on this binary task (`tune --bias true --classes A,B`) vouches for its hyperparameters:
    # the 4-class champion's (lr 0.34, batch 128, say) made model_2 collapse to one class on the pair
    train_cfg, source = hyperparameters(train_cfg, eval_cfg, (f"{ds.digest}-{classes[0]}v{classes[1]}",))
    print(
        f"hyperparameters of both models: {', '.join(f'{h}={getattr(train_cfg, h)}' for h in registry.HPARAMS)}, "
        f"epochs={train_cfg.epochs}; source: {source}",
        file=sys.stderr,
    )
    results: dict[str, list[dict[str, float]]] = {}
    descriptions: dict[str, str] = {}
    notes: dict[str, str] = {}
    base_di: dict[str, list[float]] = {t: [] for t in TESTS}
    chance = []
    with tracking.run(
        f"bias_eval-{train_cfg.model}-{classes[0]}v{classes[1]}", tags={"entry_point": "bias_eval"}
    ) as parent:
        for k in range(eval_cfg.seeds):
            seed = train_cfg.seed + k
            cfg = dataclasses.replace(train_cfg, seed=seed)
            models = arms(ds, data_cfg, bias_cfg, eval_cfg, seed)
            ref = models[1].prep  # model_2's data: the splits and S draws every model is measured on
            if k == 0:
                log_setup(ref, data_cfg, train_cfg, bias_cfg, eval_cfg, skip=NOT_USED_BY["bias_eval"])
                tracking.log_params(
                    {
                        "hparams_source": source,
                        "label_y0": classes[0],
                        "label_y1": classes[1],
                        "hparams": ", ".join(f"{h}={getattr(train_cfg, h)}" for h in registry.HPARAMS),
                    }
                )
            y = ref.test.labels.numpy()
            assert ref.test.s is not None and ref.test_decorrelated is not None and ref.test_decorrelated.s is not None
            chance.append(max(y.mean(), 1 - y.mean()) if len(y) else math.nan)
            base_di["in distribution"].append(metrics.base_rate_di(y, ref.test.s.numpy()))
            base_di["decorrelated"].append(metrics.base_rate_di(y, ref.test_decorrelated.s.numpy()))
            for arm in models:
                name = arm.role if eval_cfg.seeds == 1 else f"{arm.role}-seed{seed}"
                descriptions[arm.role] = arm.description
                if arm.note and arm.role not in notes:  # said before the training it makes moot, not only after
                    print(f"note: {arm.role} ({eval_cfg.mitigation}): {arm.note}", file=sys.stderr)
                if arm.note:
                    notes[arm.role] = arm.note
                results.setdefault(arm.role, []).append(train_arm(arm, seed, data_cfg, cfg, bias_cfg, eval_cfg, name))
        summary = summarize(results)
        bases = {t: _mean(v) for t, v in base_di.items()}
        summary.update(
            {
                "shortcut_accuracy_gain": summary["model_2_test_accuracy"] - summary["model_1_test_accuracy"],
                "shortcut_accuracy_cost": summary["model_1_decorrelated_test_accuracy"]
                - summary["model_2_decorrelated_test_accuracy"],
                "test_base_rate_di": bases["in distribution"],
                "decorrelated_test_base_rate_di": bases["decorrelated"],
            }
        )
        if "model_3" in results:  # how far the mitigated model is from the one that never had the shortcut
            summary["mitigation_accuracy_gap"] = (
                summary["model_3_decorrelated_test_accuracy"] - summary["model_1_decorrelated_test_accuracy"]
            )
        rows = table_rows(summary, descriptions, eval_cfg.seeds, _mean(chance), notes)
        tracking.log_metrics(summary)
        text = conclusion(summary, rows, bias_cfg, classes, _mean(chance), bases, eval_cfg.seeds, notes)
        if train_cfg.weights != "none":  # said under the heading, where no reader can miss it
            title, rest = text.split("\n\n", 1)
            text = f"{title}\n\n**Weights:** every model here {pretrained.CAVEAT}.\n\n{rest}"
            mlflow.set_tag("pretrained", pretrained.CAVEAT)
        _log_comparison(rows, text, bias_cfg, classes, train_cfg.model)
        print(f"\n{short_table(rows)}\n\n{verdicts(text)}", file=sys.stderr)
        print(tracking.ui_hint(parent), file=sys.stderr)
    untrained = sorted({r["model"] for r in rows if r["four_fifths"].startswith("inconclusive")})
    if data_cfg.strict and untrained:  # the run stays FINISHED: its numbers are right, they just settle nothing
        raise UserError(
            f"{' and '.join(untrained)} did not learn the task, so there is no verdict (strict=true): "
            "train longer (epochs) or tune lr / batch_size for this pair"
        )
    return summary


def verdicts(conclusion_md: str) -> str:
    """The conclusion's cautions and its Q4 answer (which model is biased), for the terminal."""
    lines = conclusion_md.splitlines()
    keep = [l for l in lines if l.startswith("**Caution")]
    if "## Q4. Which model is biased, and why?" in lines:
        q4 = lines[lines.index("## Q4. Which model is biased, and why?") + 1 :]
        keep += [l for l in q4[: next((i for i, l in enumerate(q4) if l.startswith("#")), len(q4))] if l.strip()]
    return "\n".join(l.replace("**", "") for l in keep)


def _log_comparison(
    rows: list[dict[str, Any]], text: str, bias_cfg: BiasConfig, classes: tuple[str, str], arch: str
) -> None:
    """The parent's comparison: CSV, a browsable MLflow table, markdown, the figure, the conclusion, and the run's
    Description (what the MLflow UI shows on the run page): the verdicts, the short table, then the conclusion."""
    import pandas as pd

    table = pd.DataFrame(rows)
    tracking.log_table(table, "comparison")
    mlflow.log_text(markdown_table(rows) + "\n", "comparison.md")
    title = f"{arch}, classes {classes[0]} vs {classes[1]}: p0={bias_cfg.p0:g}, p1={bias_cfg.p1:g}, sigma={bias_cfg.sigma:g}"
    tracking.log_figure(plots.bias_comparison(rows, title), "comparison")
    mlflow.log_text(text, "conclusion.md")
    tracking.set_description(
        f"{verdicts(text)}\n\n{short_table(rows)}\n\n"
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
            mlflow.set_tag(f"{r['model']}_{TESTS[r['test']]}di_note", note)

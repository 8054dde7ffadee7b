"""bias_eval's comparison as a person reads it: the per-seed numbers summarised, one row per (model, test) with its
verdict (bias_lab.verdict), the tables, and the conclusion answering the course's questions 2-4 in prose.

Everything here renders numbers already measured; nothing is computed twice and nothing reads its own output
back: the terminal's headline and the run's Description are built from the same rows as the conclusion. Pure:
no I/O.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from bias_lab import markdown as md
from bias_lab import metrics
from bias_lab.config import BiasConfig
from bias_lab.markdown import fmt
from bias_lab.verdict import CLOSE, judge

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
MITIGATION_TOLERANCE = 0.05  # model_3 "keeps accuracy" when within 5 points of model_1 on the decorrelated test


def summarize(results: dict[str, list[dict[str, float]]]) -> dict[str, float]:
    """`<role>_<metric>` = mean over seeds, plus `<role>_<metric>_std` (sample std) when there are several.

    nanmean: a seed whose DI is undefined does not erase the others; all-NaN stays NaN. An inf DI makes the
    mean inf, the honest summary (shown as 'inf'; stored as NaN with a di_note tag, see tracking.log_metrics).
    """
    out: dict[str, float] = {}
    for role, runs in results.items():
        for key in dict.fromkeys(k for r in runs for k in r):  # every seed's keys: a diverged one has fewer
            v = np.array([r.get(key, math.nan) for r in runs], dtype=float)
            out[f"{role}_{key}"] = nanmean(v)
            with np.errstate(invalid="ignore"):  # inf - inf inside std: NaN is the answer
                if len(runs) > 1:
                    out[f"{role}_{key}_std"] = float(np.nanstd(v, ddof=1)) if np.sum(~np.isnan(v)) > 1 else math.nan
    return out


def nanmean(values: Any) -> float:
    v = np.asarray(values, dtype=float)
    return math.nan if np.isnan(v).all() else float(np.nanmean(v))


def table_rows(
    summary: dict[str, float],
    descriptions: dict[str, str],
    seeds: int,
    chance: float,
    notes: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """One row per (model, test distribution), as logged in comparison.csv. `four_fifths` is the verdict's text
    (bias_lab.verdict); `verdict` the Verdict itself (not logged). `notes`: a model_3 whose mitigation could not
    act on this data is 'not applicable'."""
    notes = notes or {}
    rows = []
    for role, desc in descriptions.items():
        for test, prefix in TESTS.items():
            get = lambda m, role=role, prefix=prefix: summary.get(f"{role}_{prefix}{m}", math.nan)
            row = {"model": role, "trained_on": desc, "test": test, **{m: get(m) for m in MEASURES}}
            if seeds > 1:
                row.update({f"{m}_std": get(f"{m}_std") for m in ("accuracy", "di")})
            v = judge(
                summary, role, prefix, chance, summary.get(f"{prefix}base_rate_di", math.nan), notes.get(role, "")
            )
            row.update(four_fifths=v.text(), verdict=v)
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


class _Reading:
    """What every section of the conclusion reads: the summary, the rows by (model, test), accuracies."""

    def __init__(self, summary: dict[str, float], rows: list[dict[str, Any]], chance: float) -> None:
        self.summary, self.chance = summary, chance
        self.row = {(r["model"], r["test"]): r for r in rows}
        self.roles = list(dict.fromkeys(r["model"] for r in rows))
        status = {r: self.row[(r, "decorrelated")]["verdict"].status for r in self.roles}
        self.diverged = [r for r in self.roles if status[r] == "diverged"]
        self.untrained = [r for r in self.roles if any(self.row[(r, t)]["verdict"].inconclusive for t in TESTS)]

    def g(self, role: str, key: str) -> float:
        return self.summary.get(f"{role}_{key}", math.nan)

    def acc(self, role: str, test: str = "test_") -> float:
        return self.g(role, f"{test}accuracy")


def _p(x: float) -> str:
    return fmt(x, True)


def _intro(bias_cfg: BiasConfig, classes: tuple[str, str], chance: float, seeds: int) -> list[str]:
    a, b = classes
    return [
        "# Conclusion (generated from the measured numbers)",
        "",
        f"Binary task: label {a} is y=0, label {b} is y=1. eps is present (S=1) with P(S=1|y=0)={bias_cfg.p0:g}, "
        f"P(S=1|y=1)={bias_cfg.p1:g}, std sigma={bias_cfg.sigma:g}. The decorrelated test uses the same test images "
        "with S = 1 on a random half of each class (S independent of y in the sample). "
        f"Numbers are {'means over ' + str(seeds) + ' seeds' if seeds > 1 else 'from one seed'}; "
        f"chance (majority class of the test split) is {_p(chance)}.",
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


def _caution(r: _Reading) -> list[str]:
    out = []
    if r.diverged:
        out.append(
            f"**Caution: {' and '.join(r.diverged)} diverged** (the loss became non-finite before any good epoch, "
            f"so the weights are not finite and were not tested): no verdict on {'its' if len(r.diverged) == 1 else 'their'} "
            "bias. Lower lr (e.g. 10x)."
        )
    if slow := [m for m in r.untrained if m not in r.diverged]:
        out.append(
            f"**Caution: {' and '.join(slow)} did not learn the task** (in-distribution test accuracy not "
            f"above chance, {_p(r.chance)}, within its 95% CI): no verdict on {'its' if len(slow) == 1 else 'their'} bias. "
            "Train longer (epochs), or tune lr / batch_size for this binary task."
        )
    return out


def _q2(r: _Reading) -> list[str]:
    acc1, acc2 = r.acc("model_1"), r.acc("model_2")
    dacc1, dacc2 = r.acc("model_1", "decorrelated_test_"), r.acc("model_2", "decorrelated_test_")
    gain, cost, drop2 = acc2 - acc1, dacc1 - dacc2, acc2 - dacc2
    return [
        "## Q2. Accuracy: what does the shortcut buy, and what does it cost?",
        "",
        f"- In distribution, model_1 reaches {_p(acc1)} and model_2 {_p(acc2)}: the eps channel {_buys(gain)} for model_2.",
        f"- On the decorrelated test (S independent of y), model_1 scores {_p(dacc1)} and model_2 {_p(dacc2)} "
        f"({_points(-drop2)} from its in-distribution accuracy, {_points(-cost)} vs model_1)"
        + (
            " — down to chance: what model_2 learned was eps, not the classes."
            if dacc2 - r.chance < CLOSE and drop2 > CLOSE
            else "."
        ),
    ]


def _q3(r: _Reading, base_di: dict[str, float], seeds: int) -> list[str]:
    out = ["## Q3. Disparate impact and the four-fifths rule (DI outside [0.8, 1.25] = biased)", ""]
    for (role, test), row in r.row.items():
        spread = ""
        if seeds > 1 and not math.isnan(row.get("di_std", math.nan)):
            lo, hi = seed_interval(row["di"], row["di_std"], seeds)
            spread = f"; across seeds {fmt(row['di'])} ± {fmt(row['di_std'])}, 95% t-interval {fmt(lo)}–{fmt(hi)}"
        out.append(
            f"- {role}, {test}: DI = {fmt(row['di'])} (95% CI {fmt(row['di_ci_low'])}–{fmt(row['di_ci_high'])}{spread}) "
            f"→ **{row['four_fifths']}**."
        )
    return out + [
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
    ]


def _model_2_answer(r: _Reading) -> str:
    v2 = r.row.get(("model_2", "decorrelated"), {}).get("four_fifths", "undefined")
    dacc2 = r.acc("model_2", "decorrelated_test_")
    verdict = r.row[("model_2", "decorrelated")]["verdict"] if ("model_2", "decorrelated") in r.row else None
    if verdict is not None and verdict.status == "diverged":
        return "- model_2 diverged (its weights are not finite): no verdict on whether it took the shortcut."
    if v2.startswith("inconclusive"):
        return "- model_2 did not learn the task: no verdict on whether it took the shortcut."
    if v2.startswith("mirrors the labels"):
        return (
            "- model_2's decorrelated DI is no further from 1 than the labels' own DI on that split: no evidence "
            "that its decisions follow S beyond what the labels do."
        )
    if v2 == "biased" and dacc2 - r.chance < CLOSE:
        return (
            "- model_2 took the shortcut: on the decorrelated test its decisions follow S, not the image "
            "(DI outside the band, accuracy near chance). Its in-distribution accuracy comes from eps, not from the classes."
        )
    if v2 == "biased":
        return "- model_2 partly relies on eps: its decisions depend on S on the decorrelated test, although it keeps some accuracy from the image."
    if v2.startswith("borderline"):
        return "- model_2's decorrelated DI is borderline: the CI crosses the band edge; more test data or seeds would settle it."
    if v2 == "undefined":
        return "- model_2's decorrelated DI is undefined (see the di_note tags): no conclusion on its bias."
    return "- model_2 shows no measurable reliance on eps on the decorrelated test (the shortcut was too weak or too noisy to be taken)."


def _q4(r: _Reading) -> list[str]:
    """Which model is biased: model_2's answer, model_1's, and the short of it."""
    v1 = r.row.get(("model_1", "decorrelated"), {}).get("four_fifths", "undefined")
    out = [_model_2_answer(r)]
    if v1 == "not biased":
        out.append(
            "- model_1 is not biased: on the decorrelated test its DI lies inside the four-fifths band, so its decisions do not depend on S."
        )
    else:
        out.append(f"- model_1 on the decorrelated test: {v1}.")
    gain = r.acc("model_2") - r.acc("model_1")
    cost = r.acc("model_1", "decorrelated_test_") - r.acc("model_2", "decorrelated_test_")
    if pair_untrained := [m for m in r.untrained if m in ("model_1", "model_2")]:
        out.append(
            f"- In short: no conclusion on the shortcut until {' and '.join(pair_untrained)} learn"
            f"{'s' if len(pair_untrained) == 1 else ''} the task."
        )
    else:
        out.append(
            f"- In short: the shortcut {_buys(gain)} in distribution and costs {_points(cost, signed=False) if cost > 0 else 'nothing'} "
            "against model_1 once eps no longer predicts the label: good numbers on biased data say nothing about the model outside it."
        )
    return out


def _why(r: _Reading) -> list[str]:
    if not any(f"{role}_saliency_eps_share" in r.summary for role in r.roles):
        return []
    out = ["## Why: what each model looks at (eps ablation, input-gradient saliency)", ""]
    for role in r.roles:
        out.append(
            f"- {role}: test accuracy {_p(r.g(role, 'test_accuracy'))}; with eps zeroed "
            f"{_p(r.g(role, 'ablation_zero_eps_test_accuracy'))}, with eps shuffled across images "
            f"{_p(r.g(role, 'ablation_shuffle_eps_test_accuracy'))}; {_p(r.g(role, 'saliency_eps_share'))} of the "
            "input-gradient saliency falls on eps."
        )
    return out


def _mitigation(r: _Reading, notes: dict[str, str]) -> list[str]:
    if "model_3" not in r.roles:
        return []
    r3 = r.row[("model_3", "decorrelated")]
    dacc1, dacc2 = r.acc("model_1", "decorrelated_test_"), r.acc("model_2", "decorrelated_test_")
    dacc3, acc3 = r.acc("model_3", "decorrelated_test_"), r.acc("model_3")
    inside = not metrics.biased(r3["di"]) and not math.isnan(r3["di"])
    close = abs(dacc3 - dacc1) <= MITIGATION_TOLERANCE
    out = [
        f"## Mitigation: model_3 ({r3['trained_on']})",
        "",
        f"- On the decorrelated test model_3 has DI = {fmt(r3['di'])} (95% CI {fmt(r3['di_ci_low'])}–{fmt(r3['di_ci_high'])}) "
        f"→ **{r3['four_fifths']}**, accuracy {_p(dacc3)} ({_points(dacc3 - dacc1)} vs model_1, {_points(dacc3 - dacc2)} vs model_2); "
        f"in distribution {_p(acc3)}.",
    ]
    if notes.get("model_3"):
        out.append(
            f"- Not applicable here: {notes['model_3']}. model_3 is trained on model_2's data with no effective "
            "change, so its numbers say nothing about the method."
        )
    elif inside and close and "model_3" not in r.untrained:
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
                ("it did not learn the task", "model_3" in r.untrained),
            )
            if bad
        ]
        out.append("- The mitigation does not work here: " + "; ".join(why) + ".")
    return out


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
    r = _Reading(summary, rows, chance)
    sections = [
        _intro(bias_cfg, classes, chance, seeds),
        _caution(r),
        _q2(r),
        _q3(r, base_di, seeds),
        ["## Q4. Which model is biased, and why?", "", *_q4(r)],
        _why(r),
        _mitigation(r, notes or {}),
    ]
    return "\n\n".join("\n".join(s) for s in sections if s) + "\n"


def headline(summary: dict[str, float], rows: list[dict[str, Any]], chance: float) -> str:
    """The conclusion's cautions and its Q4 answer (which model is biased), plain text: the terminal's summary and
    the first lines of the run's Description. Built from the same rows as the conclusion, not parsed from it."""
    r = _Reading(summary, rows, chance)
    return "\n".join(line.replace("**", "") for line in [*_caution(r), *_q4(r)])


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

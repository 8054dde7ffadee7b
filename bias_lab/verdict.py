"""One verdict on a model's disparate impact, decided once and shown everywhere.

A verdict needs more than a DI. A model that diverged or did not learn its task predicts one class or at random:
its DI describes no decision rule, so it gets none. And a DI is judged next to the labels' own DI on the same
split: where S follows y (in distribution) even a perfect classifier that never looks at eps inherits the labels'
disparity, which says nothing about the model. `Verdict` holds what the decision reads (the DI with its CI, the
labels' DI, the in-distribution accuracy with its CI, chance, divergence), `judge` builds it from a comparison's
metrics, and `text` is the one wording that bias_eval's table, tags and Description, bias_sweep's table, the report
and a model card show. Pure: no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bias_lab import metrics
from bias_lab.markdown import fmt

CLOSE = 0.05  # accuracy within 5 points of chance counts as "near chance" (no CI: not learned)


def learned(accuracy: float, ci_low: float, chance: float) -> bool:
    """Did a model learn its (in-distribution) task? Its test accuracy's 95% CI lies above chance (a point
    estimate at least CLOSE above chance when there is no CI)."""
    if math.isnan(accuracy) or math.isnan(chance):
        return False
    return ci_low > chance if not math.isnan(ci_low) else accuracy - chance >= CLOSE


@dataclass(frozen=True)
class Verdict:
    """The four-fifths rule on one model and one test distribution, read with the CI and the model's training."""

    di: float
    di_low: float
    di_high: float
    accuracy: float  # in-distribution test accuracy: whether the model learned its task at all
    accuracy_low: float  # its 95% CI's lower end
    chance: float  # majority-class share of the test split
    labels_di: float = math.nan  # the labels' own DI on the same split: what a perfect classifier would score
    n: int = 0  # test images the DI was measured on
    diverged: bool = False  # training diverged before any good epoch: non-finite weights, no test numbers
    not_applicable: str = ""  # why the measure means nothing here (a mitigation that cannot act on this data)

    @property
    def learned(self) -> bool:
        return learned(self.accuracy, self.accuracy_low, self.chance)

    @property
    def rule(self) -> str:
        """The four-fifths rule on the DI alone: biased / not biased / borderline (...) / undefined."""
        return metrics.verdict(self.di, self.di_low, self.di_high)

    @property
    def status(self) -> str:
        """'not applicable', 'diverged', 'did not learn', or 'learned' (the rule applies)."""
        if self.not_applicable:
            return "not applicable"
        if self.diverged:
            return "diverged"
        if not self.learned:
            return "did not learn"
        return "learned"

    @property
    def inconclusive(self) -> bool:
        """No verdict: the model diverged or did not learn its task."""
        return self.status in ("diverged", "did not learn")

    @property
    def mirrors_labels(self) -> bool:
        """The DI is outside the band only as far as the labels' own DI is: the model's predictions carry no more
        disparity than the labels they were trained to predict (its CI reaches the labels' DI, or it lies between
        the labels' DI and 1)."""
        lab, di = self.labels_di, self.di
        if math.isnan(lab) or math.isnan(di) or not metrics.biased(lab):
            return False
        if self.di_low - metrics.TOL <= lab <= self.di_high + metrics.TOL:
            return True
        return (di - 1) * (lab - 1) > 0 and _distance(di) <= _distance(lab) + metrics.TOL

    def text(self) -> str:
        """The verdict as every table, tag and description shows it."""
        if self.status == "not applicable":
            return f"not applicable: {self.not_applicable.split(':')[0]}"
        if self.status == "diverged":
            return "inconclusive: diverged (the loss became non-finite: lower lr)"
        if self.status == "did not learn":
            return (
                f"inconclusive: did not learn (test accuracy {fmt(self.accuracy, True)}, "
                f"chance {fmt(self.chance, True)})"
            )
        if self.rule == "biased" and self.mirrors_labels:
            return f"mirrors the labels (DI {fmt(self.di)}, the labels' own DI {fmt(self.labels_di)})"
        if self.rule.startswith("borderline"):
            side = "biased" if metrics.biased(self.di) else "not biased"
            n = f" on {self.n} test images" if self.n else ""
            return (
                f"borderline ({side} at the point estimate, DI {fmt(self.di)}; its 95% CI {fmt(self.di_low)}–"
                f"{fmt(self.di_high)}{n} crosses the band edge: more test images or seeds would settle it)"
            )
        return self.rule


def _distance(di: float) -> float:
    """How far a ratio is from parity, symmetric in DI and 1/DI (0 and inf are infinitely far)."""
    return math.inf if di <= 0 or math.isinf(di) else abs(math.log(di))


def judge(
    summary: dict[str, float],
    role: str,
    prefix: str,
    chance: float,
    labels_di: float = math.nan,
    note: str = "",
) -> Verdict:
    """The verdict on `role` for the test whose metrics start with `prefix` (test_ / decorrelated_test_), from
    `<role>_<metric>` numbers (bias_eval's comparison; a sweep cell with role ''). `labels_di`: the labels' own DI
    on that split."""
    get = lambda m: summary.get(f"{role}_{m}" if role else m, math.nan)  # noqa: E731
    n = get(f"{prefix}n_s0") + get(f"{prefix}n_s1")
    return Verdict(
        di=get(f"{prefix}di"),
        di_low=get(f"{prefix}di_ci_low"),
        di_high=get(f"{prefix}di_ci_high"),
        accuracy=get("test_accuracy"),
        accuracy_low=get("test_accuracy_ci_low"),
        chance=chance,
        labels_di=labels_di,
        n=int(n) if math.isfinite(n) else 0,
        diverged=get("diverged") > 0 and math.isnan(get("test_accuracy")),  # non-finite weights: no test numbers
        not_applicable=note,
    )

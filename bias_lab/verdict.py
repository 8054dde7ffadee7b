"""One verdict on a model's disparate impact, decided once and shown everywhere.

A verdict needs more than a DI: a model that did not learn its task predicts one class or at random, and its DI
describes no decision rule. `Verdict` holds what the decision reads (the DI with its CI, the in-distribution
accuracy with its CI, chance), `judge` builds it from a comparison's metrics, and `text` is the one wording that
bias_eval's table, tags and Description, bias_sweep's table and the report show. Pure: no I/O.
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
        """'not applicable', 'did not learn', or 'learned' (the rule applies)."""
        if self.not_applicable:
            return "not applicable"
        if self.rule != "undefined" and not self.learned:
            return "did not learn"
        return "learned"

    @property
    def inconclusive(self) -> bool:
        return self.status == "did not learn"

    def text(self) -> str:
        """The verdict as every table, tag and description shows it."""
        if self.status == "not applicable":
            return f"not applicable: {self.not_applicable.split(':')[0]}"
        if self.status == "did not learn":
            return (
                f"inconclusive: did not learn (test accuracy {fmt(self.accuracy, True)}, "
                f"chance {fmt(self.chance, True)})"
            )
        return self.rule


def judge(summary: dict[str, float], role: str, prefix: str, chance: float, note: str = "") -> Verdict:
    """The verdict on `role` for the test whose metrics start with `prefix` (test_ / decorrelated_test_), from a
    comparison's `<role>_<metric>` numbers."""
    get = lambda m: summary.get(f"{role}_{m}", math.nan)  # noqa: E731
    return Verdict(
        di=get(f"{prefix}di"),
        di_low=get(f"{prefix}di_ci_low"),
        di_high=get(f"{prefix}di_ci_high"),
        accuracy=get("test_accuracy"),
        accuracy_low=get("test_accuracy_ci_low"),
        chance=chance,
        not_applicable=note,
    )

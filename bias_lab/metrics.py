"""Accuracy, confusion matrix and the fairness measures of the course project, on plain numpy arrays.

DI = P(y_hat=1 | S=0) / P(y_hat=1 | S=1) is AIF360's disparate_impact_ratio with S=1 the privileged group
(tests check AIF360 and fairlearn agree with it). An empty group or a zero denominator is reported as NaN / inf
with an explanation (`explain`), never an exception. Confidence intervals: Wilson for accuracy, a percentile
bootstrap for DI.
"""

from __future__ import annotations

import math

import numpy as np

FOUR_FIFTHS = (0.8, 1.25)  # the US EEOC "four-fifths rule": a ratio outside this band signals adverse impact
TOL = 1e-9  # 0.8333/0.6667 is 1.2500000000000002: a ratio on the band edge counts as inside
Z95 = 1.959964  # standard-normal quantile of a two-sided 95% interval


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(y_true == y_pred)) if len(y_true) else math.nan


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (sensible at 0 and 1, unlike the normal approximation)."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def confusion(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    """k x k counts, rows = true class, columns = predicted class."""
    return np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)


def ratio(num: float, den: float) -> float:
    """num / den with 0/0 -> NaN and x/0 -> inf (the conventions the explanations below describe)."""
    if math.isnan(num) or math.isnan(den):
        return math.nan
    if den == 0:
        return math.nan if num == 0 else math.inf
    return num / den


def selection_rates(y_pred: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    """P(y_hat=1 | S=0), P(y_hat=1 | S=1); NaN for an empty group."""
    r = [float(np.mean(y_pred[s == g] == 1)) if np.any(s == g) else math.nan for g in (0, 1)]
    return r[0], r[1]


def disparate_impact(y_pred: np.ndarray, s: np.ndarray) -> float:
    r0, r1 = selection_rates(y_pred, s)
    return ratio(r0, r1)


def bootstrap_di(
    y_pred: np.ndarray, s: np.ndarray, n: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of DI, resampling test samples with replacement.

    DI only depends on the four (S, y_hat) cell counts, so resampling N samples with replacement is the same
    as drawing those counts from a multinomial: O(n) memory and time whatever the test size. Resamples where
    DI is undefined (0/0, an empty group) are dropped; inf is kept, and the quantiles are taken without
    interpolation so an inf bound stays inf rather than becoming NaN.
    """
    if n <= 0 or len(y_pred) == 0:
        return math.nan, math.nan
    ps, ss = np.asarray(y_pred) == 1, np.asarray(s) == 1
    cells = np.array([np.sum(~ss & ~ps), np.sum(~ss & ps), np.sum(ss & ~ps), np.sum(ss & ps)], dtype=float)
    counts = np.random.default_rng(seed).multinomial(len(ps), cells / cells.sum(), size=n)
    with np.errstate(divide="ignore", invalid="ignore"):
        r0 = counts[:, 1] / (counts[:, 0] + counts[:, 1])
        r1 = counts[:, 3] / (counts[:, 2] + counts[:, 3])
        di = r0 / r1
    di = di[~np.isnan(di)]
    if len(di) == 0:
        return math.nan, math.nan
    a = (1 - level) / 2
    return float(np.quantile(di, a, method="lower")), float(np.quantile(di, 1 - a, method="higher"))


def fairness(
    y_true: np.ndarray, y_pred: np.ndarray, s: np.ndarray, bootstrap: int = 1000, seed: int = 0
) -> dict[str, float]:
    """The bias measures logged by every binary run (names as they appear in MLflow, without split prefix)."""
    y_true, y_pred, s = np.asarray(y_true), np.asarray(y_pred), np.asarray(s).astype(int)
    r0, r1 = selection_rates(y_pred, s)
    lo, hi = bootstrap_di(y_pred, s, bootstrap, seed)
    acc_lo, acc_hi = wilson(int(np.sum(y_true == y_pred)), len(y_true))
    rates = [r for r in (r0, r1) if not math.isnan(r)]
    return {
        "accuracy": accuracy(y_true, y_pred),
        "accuracy_ci_low": acc_lo,
        "accuracy_ci_high": acc_hi,
        "di": ratio(r0, r1),
        "di_ci_low": lo,
        "di_ci_high": hi,
        "dp_ratio": ratio(min(rates), max(rates)) if len(rates) == 2 else math.nan,
        "selection_rate_s0": r0,
        "selection_rate_s1": r1,
        "accuracy_s0": accuracy(y_true[s == 0], y_pred[s == 0]),
        "accuracy_s1": accuracy(y_true[s == 1], y_pred[s == 1]),
        "n_s0": float(np.sum(s == 0)),
        "n_s1": float(np.sum(s == 1)),
    }


def base_rate_di(y_true: np.ndarray, s: np.ndarray) -> float:
    """DI of the labels themselves, P(y=1|S=0) / P(y=1|S=1): what a perfect classifier scores on this split.

    Under the training bias S is correlated with y, so even a model that ignores eps has this DI; only on the
    decorrelated test (where it is ~1) does DI measure the model rather than the data.
    """
    return disparate_impact(np.asarray(y_true), np.asarray(s).astype(int))


def explain(m: dict[str, float]) -> str:
    """Why a DI is NaN/inf, in words; empty when it is finite."""
    if m["n_s0"] == 0 or m["n_s1"] == 0:
        return f"DI undefined: group S={'0' if m['n_s0'] == 0 else '1'} is empty in this split"
    if math.isnan(m["di"]):
        return "DI undefined: no sample of either group is predicted positive (0/0)"
    if math.isinf(m["di"]):
        return "DI infinite: no sample with S=1 is predicted positive (P(y_hat=1|S=1)=0)"
    return ""


def biased(di: float) -> bool:
    """True when DI falls outside the four-fifths band (NaN counts as not measurable, hence not 'biased')."""
    return not math.isnan(di) and not FOUR_FIFTHS[0] - TOL <= di <= FOUR_FIFTHS[1] + TOL


def verdict(di: float, low: float, high: float) -> str:
    """The four-fifths rule read with the CI: 'biased', 'not biased', 'borderline' (CI crosses a band edge)
    or 'undefined'."""
    if math.isnan(di):
        return "undefined"
    lo_b, hi_b = FOUR_FIFTHS
    if math.isnan(low) or math.isnan(high):
        return "biased" if biased(di) else "not biased"
    if high < lo_b - TOL or low > hi_b + TOL:
        return "biased"
    if lo_b - TOL <= low and high <= hi_b + TOL:
        return "not biased"
    return f"borderline ({'biased' if biased(di) else 'not biased'} at the point estimate, the CI crosses the band)"

"""Accuracy, confusion matrix and the fairness measures of the course project, on plain numpy arrays.

DI = P(y_hat=1 | S=0) / P(y_hat=1 | S=1) is AIF360's disparate_impact_ratio with S=1 the privileged group
(tests check both libraries agree). An empty group or a zero denominator is reported as NaN / inf with an
explanation, never an exception.
"""

from __future__ import annotations

import math

import numpy as np

FOUR_FIFTHS = (0.8, 1.25)  # the US EEOC "four-fifths rule": a ratio outside this band signals adverse impact


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(y_true == y_pred)) if len(y_true) else math.nan


def confusion(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    """k x k counts, rows = true class, columns = predicted class."""
    return np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)


def _ratio(num: float, den: float) -> float:
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
    return _ratio(r0, r1)


def bootstrap_di(y_pred: np.ndarray, s: np.ndarray, n: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of DI, resampling test samples with replacement (vectorised)."""
    if n <= 0 or len(y_pred) == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(y_pred), size=(n, len(y_pred)))
    ps, ss = y_pred[idx] == 1, s[idx] == 1
    n1, n0 = ss.sum(1), (~ss).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r1 = (ps & ss).sum(1) / n1
        r0 = (ps & ~ss).sum(1) / n0
        di = r0 / r1
    di = di[np.isfinite(di)] if np.isfinite(di).any() else di
    if np.isnan(di).all():
        return math.nan, math.nan
    a = (1 - level) / 2
    return float(np.nanquantile(di, a)), float(np.nanquantile(di, 1 - a))


def fairness(y_true: np.ndarray, y_pred: np.ndarray, s: np.ndarray, bootstrap: int = 1000, seed: int = 0) -> dict[str, float]:
    """The bias measures logged by every binary run (names as they appear in MLflow, without split prefix)."""
    r0, r1 = selection_rates(y_pred, s)
    di = _ratio(r0, r1)
    lo, hi = bootstrap_di(y_pred, s, bootstrap, seed)
    rates = [r for r in (r0, r1) if not math.isnan(r)]
    return {
        "accuracy": accuracy(y_true, y_pred),
        "di": di,
        "di_ci_low": lo,
        "di_ci_high": hi,
        "dp_ratio": _ratio(min(rates), max(rates)) if len(rates) == 2 else math.nan,
        "selection_rate_s0": r0,
        "selection_rate_s1": r1,
        "accuracy_s0": accuracy(y_true[s == 0], y_pred[s == 0]),
        "accuracy_s1": accuracy(y_true[s == 1], y_pred[s == 1]),
        "n_s0": float(np.sum(s == 0)),
        "n_s1": float(np.sum(s == 1)),
    }


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
    return not math.isnan(di) and not FOUR_FIFTHS[0] <= di <= FOUR_FIFTHS[1]

"""Plotly figures logged with the runs (mlflow.log_figure writes them as self-contained HTML)."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots


def learning_curves(history: list[dict[str, float]], title: str = "") -> go.Figure:
    """Loss and accuracy per epoch, train vs val."""
    epochs = list(range(1, len(history) + 1))
    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss", "accuracy"))
    for col, metric in ((1, "loss"), (2, "accuracy")):
        for split, dash in (("train", "solid"), ("val", "dash")):
            fig.add_trace(
                go.Scatter(x=epochs, y=[h[f"{split}_{metric}"] for h in history], name=f"{split}_{metric}", line={"dash": dash}),
                row=1, col=col,
            )
        fig.update_xaxes(title_text="epoch", row=1, col=col)
    fig.update_layout(title=title or "learning curves", height=380)
    return fig


def confusion_matrix(cm: np.ndarray, classes: list[str], title: str = "confusion matrix (test split)") -> go.Figure:
    """Counts with row-normalised colour, true class on the y axis."""
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig = go.Figure(
        go.Heatmap(
            z=share, x=[f"pred {c}" for c in classes], y=[f"true {c}" for c in classes], text=cm, texttemplate="%{text}",
            colorscale="Blues", zmin=0, zmax=1, colorbar={"title": "row share"},
        )
    )
    fig.update_layout(title=title, yaxis={"autorange": "reversed"}, height=420)
    return fig


FOUR_FIFTHS_BAND = (0.8, 1.25)  # same band as metrics.FOUR_FIFTHS (kept import-free: plots depend on plotly only)
DISTRIBUTION_COLOURS = {"in distribution": "#1f77b4", "decorrelated": "#ff7f0e"}


def bias_comparison(rows: list[dict], title: str = "model comparison") -> go.Figure:
    """Accuracy and DI (with 95% CIs) of each model on both test distributions, the four-fifths band shaded.

    rows: one dict per (model, test) with keys model, test ('in distribution' | 'decorrelated'), accuracy,
    accuracy_ci_low/high, di, di_ci_low/high. An infinite DI (or bound) is drawn at the top of the axis
    and labelled 'inf'; an undefined (NaN) DI is labelled 'undefined'.
    """
    fig = make_subplots(rows=1, cols=2, subplot_titles=("test accuracy (95% Wilson CI)", "disparate impact (95% bootstrap CI)"))
    finite = [v for r in rows for v in (r["di"], r["di_ci_high"]) if np.isfinite(v)]
    cap = max([1.5, *finite]) * 1.15  # where inf is drawn: just above the largest finite value
    for test, colour in DISTRIBUTION_COLOURS.items():
        part = [r for r in rows if r["test"] == test]
        if not part:
            continue
        models = [r["model"] for r in part]
        acc = np.array([r["accuracy"] for r in part], dtype=float)
        fig.add_trace(go.Bar(
            x=models, y=acc, name=f"accuracy, {test}", marker_color=colour, offsetgroup=test, legendgroup=test,
            error_y={"type": "data", "symmetric": False,
                     "array": np.array([r["accuracy_ci_high"] for r in part]) - acc,
                     "arrayminus": acc - np.array([r["accuracy_ci_low"] for r in part])},
        ), row=1, col=1)
        di = np.array([r["di"] for r in part], dtype=float)
        shown = np.where(np.isinf(di), cap, di)
        hi = np.minimum(np.array([r["di_ci_high"] for r in part], dtype=float), cap)
        lo = np.array([r["di_ci_low"] for r in part], dtype=float)
        fig.add_trace(go.Scatter(
            x=models, y=shown, mode="markers+text", name=f"DI, {test}", marker={"color": colour, "size": 11},
            offsetgroup=test, legendgroup=test, textposition="middle right",
            text=["inf" if np.isinf(v) else "undefined" if np.isnan(v) else f"{v:.2f}" for v in di],
            error_y={"type": "data", "symmetric": False, "array": np.nan_to_num(hi - shown), "arrayminus": np.nan_to_num(shown - lo)},
        ), row=1, col=2)
    fig.add_hrect(y0=FOUR_FIFTHS_BAND[0], y1=FOUR_FIFTHS_BAND[1], row=1, col=2, fillcolor="green", opacity=0.12, line_width=0,
                  annotation_text="four-fifths band (0.8-1.25)", annotation_position="top left")
    fig.add_hline(y=1.0, row=1, col=2, line_dash="dot", line_color="green")
    fig.add_hline(y=0.5, row=1, col=1, line_dash="dot", line_color="grey", annotation_text="chance (balanced)")
    fig.update_yaxes(range=[0, 1.05], row=1, col=1)
    fig.update_yaxes(range=[0, cap * 1.05], row=1, col=2)
    fig.update_layout(title=title, height=450, barmode="group", scattermode="group")
    return fig

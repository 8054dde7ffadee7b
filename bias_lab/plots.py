"""Plotly figures logged with the runs (tracking.log_figure gathers each run's figures in one offline figures.html)."""

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
                go.Scatter(
                    x=epochs, y=[h[f"{split}_{metric}"] for h in history], name=f"{split}_{metric}", line={"dash": dash}
                ),
                row=1,
                col=col,
            )
        fig.update_xaxes(title_text="epoch", row=1, col=col)
    fig.update_layout(title=title or "learning curves", height=380)
    return fig


def confusion_matrix(cm: np.ndarray, classes: list[str], title: str = "confusion matrix (test split)") -> go.Figure:
    """Counts with row-normalised colour, true class on the y axis."""
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig = go.Figure(
        go.Heatmap(
            z=share,
            x=[f"pred {c}" for c in classes],
            y=[f"true {c}" for c in classes],
            text=cm,
            texttemplate="%{text}",
            colorscale="Blues",
            zmin=0,
            zmax=1,
            colorbar={"title": "row share"},
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
    fig = make_subplots(
        rows=1, cols=2, subplot_titles=("test accuracy (95% Wilson CI)", "disparate impact (95% bootstrap CI)")
    )
    finite = [v for r in rows for v in (r["di"], r["di_ci_high"]) if np.isfinite(v)]
    cap = max([1.5, *finite]) * 1.15  # where inf is drawn: just above the largest finite value
    for test, colour in DISTRIBUTION_COLOURS.items():
        part = [r for r in rows if r["test"] == test]
        if not part:
            continue
        models = [r["model"] for r in part]
        acc = np.array([r["accuracy"] for r in part], dtype=float)
        fig.add_trace(
            go.Bar(
                x=models,
                y=acc,
                name=f"accuracy, {test}",
                marker_color=colour,
                offsetgroup=test,
                legendgroup=test,
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": np.array([r["accuracy_ci_high"] for r in part]) - acc,
                    "arrayminus": acc - np.array([r["accuracy_ci_low"] for r in part]),
                },
            ),
            row=1,
            col=1,
        )
        di = np.array([r["di"] for r in part], dtype=float)
        shown = np.where(np.isinf(di), cap, di)
        hi = np.minimum(np.array([r["di_ci_high"] for r in part], dtype=float), cap)
        lo = np.array([r["di_ci_low"] for r in part], dtype=float)
        fig.add_trace(
            go.Scatter(
                x=models,
                y=shown,
                mode="markers+text",
                name=f"DI, {test}",
                marker={"color": colour, "size": 11},
                offsetgroup=test,
                legendgroup=test,
                textposition="middle right",
                text=["inf" if np.isinf(v) else "undefined" if np.isnan(v) else f"{v:.2f}" for v in di],
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": np.nan_to_num(hi - shown),
                    "arrayminus": np.nan_to_num(shown - lo),
                },
            ),
            row=1,
            col=2,
        )
    fig.add_hrect(
        y0=FOUR_FIFTHS_BAND[0],
        y1=FOUR_FIFTHS_BAND[1],
        row=1,
        col=2,
        fillcolor="green",
        opacity=0.12,
        line_width=0,
        annotation_text="four-fifths band (0.8-1.25)",
        annotation_position="top left",
    )
    fig.add_hline(y=1.0, row=1, col=2, line_dash="dot", line_color="green")
    fig.add_hline(y=0.5, row=1, col=1, line_dash="dot", line_color="grey", annotation_text="chance (balanced)")
    fig.update_yaxes(range=[0, 1.05], row=1, col=1)
    fig.update_yaxes(range=[0, cap * 1.05], row=1, col=2)
    fig.update_layout(title=title, height=450, barmode="group", scattermode="group")
    return fig


def saliency_maps(samples: list[dict], eps_share: float) -> go.Figure:
    """Per test image: each input channel and its |input gradient| (one colour scale per row, shared by channels,
    so the eps column's brightness is comparable with the image's)."""
    if not samples:
        return go.Figure().update_layout(title="saliency: no test samples")
    channels = samples[0]["input"].shape[0]
    names = ["image", "eps"][:channels]
    cols = [f"input: {n}" for n in names] + [f"|gradient|: {n}" for n in names]
    fig = make_subplots(
        rows=len(samples),
        cols=len(cols),
        horizontal_spacing=0.02,
        vertical_spacing=0.04,
        subplot_titles=[c if r == 0 else "" for r in range(len(samples)) for c in cols],
        row_titles=[s["title"] for s in samples],
    )
    for r, s in enumerate(samples, start=1):
        gmax = float(s["saliency"].max()) or 1.0
        for c in range(channels):
            fig.add_trace(go.Heatmap(z=s["input"][c], colorscale="gray", showscale=False), row=r, col=c + 1)
            fig.add_trace(
                go.Heatmap(z=s["saliency"][c], colorscale="Hot", zmin=0, zmax=gmax, showscale=False),
                row=r,
                col=channels + c + 1,
            )
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False, autorange="reversed")
    fig.update_layout(
        title=f"input-gradient saliency (share on eps: {eps_share:.1%})",
        height=220 * len(samples) + 80,
        width=220 * len(cols) + 160,
    )
    return fig


def sweep_heatmaps(
    gaps: list[float], sigmas: list[float], grids: dict[str, np.ndarray], title: str = "bias sweep"
) -> go.Figure:
    """One heatmap per measure over (p1-p0, sigma), values written in the cells. DI is coloured on a diverging
    scale centred on 1 and clipped to [0, 2]; cells outside the four-fifths band are marked with '*'."""
    names = list(grids)
    cols = 2
    rows = (len(names) + 1) // cols
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=names, horizontal_spacing=0.12, vertical_spacing=0.18)
    x, y = [f"{g:g}" for g in gaps], [f"{s:g}" for s in sigmas]
    for i, name in enumerate(names):
        z = np.asarray(grids[name], dtype=float)
        r, c = i // cols + 1, i % cols + 1
        if "DI" in name:
            text = [
                [
                    ("inf" if np.isinf(v) else "n/a" if np.isnan(v) else f"{v:.2f}")
                    + (
                        "*"
                        if np.isfinite(v) and not FOUR_FIFTHS_BAND[0] <= v <= FOUR_FIFTHS_BAND[1] or np.isinf(v)
                        else ""
                    )
                    for v in row
                ]
                for row in z
            ]
            trace = go.Heatmap(
                z=np.clip(np.nan_to_num(z, nan=1.0, posinf=2.0), 0, 2),
                x=x,
                y=y,
                text=text,
                texttemplate="%{text}",
                colorscale="RdBu",
                zmid=1.0,
                zmin=0,
                zmax=2,
                showscale=False,
            )
        else:
            text = [["n/a" if np.isnan(v) else f"{v:.0%}" for v in row] for row in z]
            trace = go.Heatmap(
                z=z, x=x, y=y, text=text, texttemplate="%{text}", colorscale="Viridis", zmin=0, zmax=1, showscale=False
            )
        fig.add_trace(trace, row=r, col=c)
        fig.update_xaxes(title_text="p1 - p0", type="category", row=r, col=c)
        fig.update_yaxes(title_text="sigma", type="category", row=r, col=c)
    fig.update_layout(
        title=title + "<br><sup>* decorrelated DI outside the four-fifths band [0.8, 1.25]</sup>",
        height=380 * rows + 80,
    )
    return fig

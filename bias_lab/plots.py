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

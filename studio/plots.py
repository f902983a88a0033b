"""Plotly figures for the studio. Data are pre-binned in numpy wherever a plot could hold many
points, so a figure sent to the browser stays a few kilobytes even with 100k candidates."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

COLORS = {"all": "#c7ccd6", "passing": "#6b8fd6", "kept": "#2f9e5b", "cutoff": "#d9534f",
          "base": "#8a94a6", "tuned": "#2f9e5b"}
TUNED_PALETTE = [COLORS["tuned"], "#6b8fd6", "#e0a13a", "#b05fc4", "#d9534f", "#3fb0ac"]
_LAYOUT = dict(margin=dict(l=40, r=10, t=36, b=36), height=280, template="plotly_white",
               legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0),
               font=dict(size=11))


def empty_figure(message: str = "no data yet") -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, font=dict(size=14, color="#888"),
                       xref="paper", yref="paper", x=0.5, y=0.5)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(**{**_LAYOUT, "height": 220})
    return fig


def _bins(values: np.ndarray, n: int = 40) -> np.ndarray:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return np.linspace(0, 1, n + 1)
    lo, hi = float(v.min()), float(v.max())
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, n + 1)


def composite_histogram(composite: np.ndarray, passes: np.ndarray, kept: np.ndarray,
                        cutoff: float | None, title: str = "Composite reward R") -> go.Figure:
    """Stacked counts: every scorable candidate, those passing the level, those kept; a line at
    the top-K cut-off."""
    edges = _bins(composite)
    centers = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    fin = np.isfinite(composite)

    def hist(mask: np.ndarray) -> np.ndarray:
        return np.histogram(composite[mask & fin], bins=edges)[0]

    n_all, n_pass, n_kept = hist(np.ones_like(fin)), hist(passes), hist(kept)
    fig = go.Figure()
    fig.add_bar(x=centers, y=n_all - n_pass, width=width, name="fails level",
                marker_color=COLORS["all"])
    fig.add_bar(x=centers, y=n_pass - np.minimum(n_pass, n_kept), width=width,
                name="passes, not kept", marker_color=COLORS["passing"])
    fig.add_bar(x=centers, y=n_kept, width=width, name="kept", marker_color=COLORS["kept"])
    if cutoff is not None:
        fig.add_vline(x=cutoff, line=dict(color=COLORS["cutoff"], width=2, dash="dash"),
                      annotation_text=f"cut-off {cutoff:+.2f}", annotation_position="top left",
                      annotation=dict(font=dict(size=11, color=COLORS["cutoff"])))
    fig.update_layout(**_LAYOUT, barmode="stack", bargap=0, title=title,
                      xaxis_title="R (normalised units)", yaxis_title="candidates")
    # the legend sits above the plot, clear of the cut-off label at the plot's top edge
    fig.update_layout(legend=dict(y=1.16), margin=dict(t=60))
    return fig


def reward_histograms(df: pd.DataFrame, rewards: Sequence[str]) -> go.Figure:
    rewards = [r for r in rewards if r in df]
    if not rewards or df.empty:
        return empty_figure("no scores yet: run the Score step")
    cols = min(4, len(rewards))
    rows = int(np.ceil(len(rewards) / cols))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=rewards)
    for i, r in enumerate(rewards):
        v = df[r].to_numpy(float)
        orig = df["variant_idx"].to_numpy() == 0 if "variant_idx" in df else np.zeros(len(v), bool)
        edges = _bins(v, 30)
        centers = (edges[:-1] + edges[1:]) / 2
        for mask, name, color in ((orig, "original prompt", "#8a94a6"),
                                  (~orig, "variants", "#6b8fd6")):
            counts = np.histogram(v[mask & np.isfinite(v)], bins=edges)[0]
            fig.add_bar(x=centers, y=counts, width=edges[1] - edges[0], name=name,
                        marker_color=color, showlegend=i == 0, legendgroup=name,
                        row=i // cols + 1, col=i % cols + 1)
    fig.update_layout(**{**_LAYOUT, "height": 260 * rows + 30,
                         "legend": dict(orientation="h", yanchor="bottom", y=1.08,
                                        xanchor="right", x=1.0),
                         "margin": dict(l=40, r=10, t=70, b=36)},
                      barmode="stack", bargap=0, title="Per-reward scores (raw)")
    return fig


def correlation_heatmap(df: pd.DataFrame, rewards: Sequence[str]) -> go.Figure:
    rewards = [r for r in rewards if r in df and df[r].notna().sum() > 1]
    if len(rewards) < 2:
        return empty_figure("needs two scored rewards")
    corr = df[rewards].corr(method="spearman").to_numpy()
    fig = go.Figure(go.Heatmap(z=corr, x=rewards, y=rewards, zmin=-1, zmax=1,
                               colorscale="RdBu", reversescale=True,
                               text=np.round(corr, 2), texttemplate="%{text}"))
    fig.update_layout(**{**_LAYOUT, "height": 320}, title="Reward correlation (Spearman)")
    fig.update_yaxes(autorange="reversed")
    return fig


def group_bars(frame: pd.DataFrame, labels: Sequence[str], columns: Sequence[str],
               names: Sequence[str]) -> go.Figure:
    """Grouped bars per candidate: normalised rewards, composite, advantage."""
    if frame.empty:
        return empty_figure("no candidates in this group")
    fig = go.Figure()
    palette = ["#6b8fd6", "#e0a13a", "#9b6bd6", "#4fb0c6", "#2f9e5b", "#d9534f"]
    for k, (col, name) in enumerate(zip(columns, names)):
        fig.add_bar(x=list(labels), y=frame[col].to_numpy(float), name=name,
                    marker_color=palette[k % len(palette)])
    fig.update_layout(**{**_LAYOUT, "height": 320}, barmode="group",
                      title="Normalised rewards, composite and advantage per candidate",
                      xaxis_title="candidate (★ = original prompt)")
    return fig


def loss_curve(metrics: pd.DataFrame, title: str = "Training loss") -> go.Figure:
    if metrics is None or metrics.empty:
        return empty_figure("no training steps yet")
    fig = go.Figure()
    # Plain lists: plotly would send numpy arrays base64-encoded, which the page keeps encoded.
    steps, losses = metrics["step"].tolist(), metrics["loss"].tolist()
    fig.add_scatter(x=steps, y=losses, mode="lines+markers", name="loss",
                    marker=dict(size=5), line=dict(color="#6b8fd6"))
    if len(metrics) >= 5:
        smooth = metrics["loss"].ewm(alpha=0.2).mean().tolist()
        fig.add_scatter(x=steps, y=smooth, mode="lines", name="EMA",
                        line=dict(color="#d9534f", width=2))
    fig.update_layout(**_LAYOUT, title=title, xaxis_title="step", yaxis_title="weighted loss")
    return fig


def mean_reward_bars(summary: pd.DataFrame) -> go.Figure:
    """Mean ± SE per reward for each evaluated model."""
    if summary is None or summary.empty:
        return empty_figure("no evaluation yet")
    fig = go.Figure()
    models = list(dict.fromkeys(summary["model"]))
    models = [m for m in models if m == "base"] + [m for m in models if m != "base"]
    tuned = iter(TUNED_PALETTE * len(models))  # the base grey, every tuned model its own colour
    for m in models:
        sub = summary[summary["model"] == m]
        color = COLORS["base"] if m == "base" else next(tuned)
        fig.add_bar(x=sub["reward"], y=sub["mean"], name=m, marker_color=color,
                    error_y=dict(type="data", array=sub["se"].fillna(0).to_numpy()))
    fig.update_layout(**{**_LAYOUT, "height": 320}, barmode="group",
                      title="Mean reward per model (± standard error)")
    return fig


__all__ = ["composite_histogram", "correlation_heatmap", "empty_figure", "group_bars",
           "loss_curve", "mean_reward_bars", "reward_histograms"]

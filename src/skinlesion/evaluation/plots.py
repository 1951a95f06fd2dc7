"""PNG figures for reports: confusion matrices, reliability diagrams, ROC curves.

Figures are built with ``matplotlib.figure.Figure`` and saved through the Agg canvas, never
through pyplot, so plotting works headless and leaves the caller's matplotlib backend and
global figure list alone. All numbers come from :mod:`skinlesion.evaluation.metrics`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from skinlesion.evaluation.metrics import point_metrics, reliability_bins, roc_curve_points


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=120, bbox_inches="tight")
    return path


def _draw_matrix(
    ax: Axes, matrix: np.ndarray, classes: Sequence[str], title: str, fmt: str
) -> None:
    image = ax.imshow(matrix, cmap="Blues", vmin=0)
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, labels=list(classes), rotation=45, ha="right")
    ax.set_yticks(ticks, labels=list(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = np.nanmax(matrix) / 2 if np.isfinite(matrix).any() else 0
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            value = matrix[i, j]
            if np.isfinite(value):
                color = "white" if value > threshold else "black"
                ax.text(j, i, format(value, fmt), ha="center", va="center", color=color, fontsize=8)


def plot_confusion_matrices(
    cm: list[list[int]] | np.ndarray, classes: Sequence[str], path: Path
) -> Path:
    """:func:`confusion_figure` saved as a PNG."""
    return _save(confusion_figure(cm, classes), path)


def confusion_figure(cm: list[list[int]] | np.ndarray, classes: Sequence[str]) -> Figure:
    """Counts and row-normalised (recall) confusion matrices side by side; rows are true classes.

    Rows of absent classes are left blank in the normalised panel rather than shown as zeros.
    """
    counts = np.asarray(cm, dtype=np.float64)
    if counts.shape != (len(classes), len(classes)):
        raise ValueError(f"cm must be {len(classes)}x{len(classes)}, got {counts.shape}")
    rows = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = np.where(rows > 0, counts / rows, np.nan)
    fig = Figure(figsize=(13, 5.5), layout="constrained")
    left, right = fig.subplots(1, 2)
    _draw_matrix(left, counts, classes, "counts", ".0f")
    _draw_matrix(right, normalised, classes, "row-normalised (recall)", ".2f")
    return fig


def _reliability_bars(ax: Axes, bins: dict, label: str, color: str, filled: bool) -> None:
    edges = np.asarray(bins["edges"])
    width = np.diff(edges)
    accuracy = np.array([np.nan if a is None else a for a in bins["accuracy"]])
    kwargs = {"color": color, "alpha": 0.7} if filled else {"fill": False, "edgecolor": color}
    ax.bar(
        edges[:-1],
        np.nan_to_num(accuracy),
        width=width,
        align="edge",
        linewidth=1.5,
        label=f"{label} (ECE {bins['ece']:.3f})",
        **kwargs,
    )


def plot_reliability_diagram(
    y_true: np.ndarray,
    probs: np.ndarray,
    path: Path,
    n_bins: int = 15,
    probs_after: np.ndarray | None = None,
) -> Path:
    """Accuracy per top-class confidence bin against the diagonal, with the ECE in the legend.

    With ``probs_after`` (e.g. after temperature scaling) its bars are overlaid as outlines.
    A lower panel shows how many images fall in each bin, since sparse bins are noisy.
    """
    before = reliability_bins(y_true, probs, n_bins)
    after = None if probs_after is None else reliability_bins(y_true, probs_after, n_bins)
    fig = Figure(figsize=(6, 7))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    _reliability_bars(
        top, before, "before calibration" if after is not None else "model", "tab:blue", True
    )
    if after is not None:
        _reliability_bars(top, after, "after calibration", "tab:red", False)
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title("reliability diagram")
    top.legend(loc="upper left")

    edges = np.asarray(before["edges"])
    bottom.bar(
        edges[:-1],
        before["count"],
        width=np.diff(edges),
        align="edge",
        color="tab:blue",
        alpha=0.7,
        label="before" if after is not None else None,
    )
    if after is not None:
        bottom.bar(
            edges[:-1],
            after["count"],
            width=np.diff(edges),
            align="edge",
            fill=False,
            edgecolor="tab:red",
            linewidth=1.5,
            label="after",
        )
        bottom.legend(loc="upper left")
    bottom.set_xlabel("confidence (top-class probability)")
    bottom.set_ylabel("images")
    return _save(fig, path)


def plot_roc_curves(
    y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], path: Path
) -> Path:
    """One-vs-rest ROC curve for each class present in ``y_true``, AUROC in the legend."""
    y = np.asarray(y_true)
    per_class = point_metrics(y, probs, classes=classes)["per_class"]
    fig = Figure(figsize=(6.5, 6))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    for c, name in enumerate(classes):
        auroc = per_class[name]["auroc"]
        if auroc is None:  # absent class, or no negatives: no curve to draw
            continue
        fpr, tpr = roc_curve_points(y, probs, c)
        ax.plot(
            fpr, tpr, linewidth=1.5, label=f"{name} (AUROC {auroc:.3f}, n={int((y == c).sum())})"
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("one-vs-rest ROC")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)

"""Risk-coverage: how accuracy on the images a model answers grows as it refers more of them to a
person. A user picks an operating point from this table; the model's own (stored) refer rules
are one row of it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import balanced_accuracy_score

from skinlesion.inference.refer import refer_mask

COVERAGES = (1.0, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5)


def _row(y: np.ndarray, probs: np.ndarray, accepted: np.ndarray, label: str) -> dict[str, Any]:
    n_acc = int(accepted.sum())
    pred = probs.argmax(1)
    row: dict[str, Any] = {
        "operating_point": label,
        "n_accepted": n_acc,
        "share_referred": float(1.0 - n_acc / len(y)) if len(y) else 0.0,
        "accuracy_accepted": None,
        "balanced_accuracy_accepted": None,
    }
    if n_acc:
        ya, pa = y[accepted], pred[accepted]
        row["accuracy_accepted"] = float((ya == pa).mean())
        # Over the classes present among the accepted images (sklearn's definition); a single
        # class among them is a legitimate case here, not a warning.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            row["balanced_accuracy_accepted"] = float(balanced_accuracy_score(ya, pa))
    return row


def risk_coverage(
    y: np.ndarray,
    probs: np.ndarray,
    rules: dict[str, Any] | None = None,
    coverages: tuple[float, ...] = COVERAGES,
) -> list[dict[str, Any]]:
    """Accuracy and balanced accuracy on the accepted images at several coverages (the most
    confident share of images is answered, the rest referred), plus the model's own rules."""
    y, probs = np.asarray(y), np.asarray(probs, dtype=np.float64)
    conf = probs.max(1)
    order = np.argsort(-conf, kind="stable")
    rows = []
    for c in coverages:
        accepted = np.zeros(len(y), dtype=bool)
        accepted[order[: int(round(c * len(y)))]] = True
        row = _row(y, probs, accepted, f"answer top {c:.0%} by confidence")
        row["confidence_threshold"] = float(conf[accepted].min()) if accepted.any() else None
        rows.append(row)
    if rules:
        row = _row(y, probs, ~refer_mask(probs, rules), "model's refer rules")
        row["confidence_threshold"] = rules.get("confidence_threshold")
        rows.append(row)
    return rows


def plot_risk_coverage(y: np.ndarray, probs: np.ndarray, path: Path) -> Path:
    """Accuracy and balanced accuracy of the accepted images against the share referred."""
    y, probs = np.asarray(y), np.asarray(probs, dtype=np.float64)
    steps = np.linspace(1.0, 0.2, 33)
    rows = risk_coverage(y, probs, coverages=tuple(float(c) for c in steps))
    referred = [r["share_referred"] for r in rows]
    fig = Figure(figsize=(5.5, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    curves = (("accuracy_accepted", "accuracy"), ("balanced_accuracy_accepted", "bal. acc"))
    for key, label in curves:
        ax.plot(referred, [r[key] for r in rows], marker=".", label=label)
    ax.set_xlabel("share referred (least confident first)")
    ax.set_ylabel("on the accepted images")
    ax.set_title("Risk-coverage")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def render_risk_coverage(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines of the risk-coverage table."""
    lines = [
        "| operating point | confidence >= | referred (%) | accuracy (%) | balanced accuracy (%) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        thr = r.get("confidence_threshold")
        cells = [
            r["operating_point"],
            "n/a" if thr is None else f"{thr:.3f}",
            f"{r['share_referred'] * 100:.1f}",
        ]
        for key in ("accuracy_accepted", "balanced_accuracy_accepted"):
            cells.append("n/a" if r[key] is None else f"{r[key] * 100:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines

"""Risk-coverage: how accuracy on the images a model answers grows as it refers more of them to a
person. A user picks an operating point from this table; the model's own (stored) refer rules
are one row of it. And the refer figures of a set of images: the share referred, overall and by
reason, and how well the unfamiliarity tells the set from the training distribution.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from skinlesion.inference.refer import UNFAMILIAR_THRESHOLD, refer_mask, refer_summary

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
    unfamiliarity: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Accuracy and balanced accuracy on the accepted images at several coverages (the most
    confident share of images is answered, the rest referred), plus the model's own rules
    (with ``unfamiliarity``, its rule "unlike the training images" too)."""
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
    if rules or unfamiliarity is not None:
        row = _row(y, probs, ~refer_mask(probs, rules or {}, unfamiliarity), "model's refer rules")
        row["confidence_threshold"] = rules.get("confidence_threshold")
        rows.append(row)
    return rows


def refer_figures(
    probs: np.ndarray,
    rules: dict[str, Any],
    unfamiliarity: np.ndarray | None,
    heldout: np.ndarray | None,
) -> dict[str, Any]:
    """The share of images referred, overall and by reason (:func:`refer_summary`), and for a
    model with a familiarity: the share unfamiliar, the median unfamiliarity, and the AUROC of
    the unfamiliarity of these images against the model's stored held-out in-distribution
    scores (``heldout``): 0.5 when they look like the training distribution, 1 when every
    image is further from it than every held-out one."""
    out: dict[str, Any] = {"referred": refer_summary(probs, rules, unfamiliarity)}
    if unfamiliarity is None or heldout is None or not len(heldout):
        out["familiarity"] = None
        return out
    u = np.asarray(unfamiliarity, dtype=np.float64)
    labels = np.r_[np.zeros(len(heldout)), np.ones(len(u))]
    out["familiarity"] = {
        "auroc_vs_training": float(roc_auc_score(labels, np.r_[heldout, u])) if len(u) else None,
        "share_unfamiliar": float(np.mean(u > UNFAMILIAR_THRESHOLD)) if len(u) else None,
        "median_unfamiliarity": float(np.median(u)) if len(u) else None,
        "n_reference": len(heldout),
        "reference": "the model's stored held-out in-distribution scores (each member's over "
        "its threshold; for a fold ensemble, pooled over members, an approximation)",
    }
    return out


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

"""Paired comparison of two sets of predictions for the same images: the difference of each
metric with a bootstrap interval that resamples lesions (all images of a lesion together), the
same draws for both, so the noise they share cancels.

Used by the leakage audit (image-random minus lesion-grouped folds) and by ``skinlesion compare``
(two runs on the same folds, e.g. with and without patient metadata, or two evaluations of the
same labelled set by ``skinlesion evaluate``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from skinlesion.core.errors import DataError
from skinlesion.core.run_folder import RunFolder
from skinlesion.evaluation.metrics import (
    draw_bootstrap_weights,
    melanoma_threshold_for_specificity,
    point_metrics,
)
from skinlesion.evaluation.prediction_files import EVALUATION_PREDICTIONS, read_predictions

PAIRED_METRICS: tuple[str, ...] = (
    "balanced_accuracy",
    "macro_f1",
    "accuracy",
    "macro_auroc",
    "log_loss",
    "ece",
)


def scalar_metrics(
    y: np.ndarray, probs: np.ndarray, *, classes: Sequence[str]
) -> dict[str, float | None]:
    """The metrics of :data:`PAIRED_METRICS` plus melanoma AUROC, sensitivity at the argmax,
    and sensitivity at 95% specificity (``None`` without a ``mel`` class, or without melanomas
    or other lesions), and, where the labels lack classes, the share predicted as one of them."""
    m = point_metrics(y, probs, classes=classes)
    out = {k: m[k] for k in PAIRED_METRICS}
    mel = m["per_class"].get("mel")
    out["mel_auroc"] = mel["auroc"] if mel else None
    out["mel_sensitivity_argmax"] = m["mel"]["sensitivity_argmax"]
    out["mel_sensitivity_at_spec95"] = sensitivity_at_specificity(y, probs, classes=classes)
    if m["classes_absent"]:  # a resample keeps every class, so the keys stay the same
        out["predicted_absent"] = m["predicted_absent"]
    return out


def sensitivity_at_specificity(
    y: np.ndarray, probs: np.ndarray, specificity: float = 0.95, *, classes: Sequence[str]
) -> float | None:
    """Melanoma-vs-rest sensitivity at the threshold that gives ``specificity`` on these images
    themselves: a point of their ROC curve, so two models are compared at the same
    specificity whatever their calibration (the model's own out-of-fold threshold is
    ``mel.sensitivity_at_threshold`` in the report)."""
    if "mel" not in classes:
        return None
    m = list(classes).index("mel")
    y = np.asarray(y)
    if not (y == m).any() or (y == m).all():
        return None
    t = melanoma_threshold_for_specificity(y, probs, specificity, classes=classes)
    return float((np.asarray(probs)[y == m, m] >= t).mean())


def paired_bootstrap(
    y: np.ndarray,
    p_a: np.ndarray,
    p_b: np.ndarray,
    groups: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    *,
    classes: Sequence[str],
) -> dict[str, dict[str, Any]]:
    """Per metric: ``a``, ``b``, ``difference`` (b - a) and its 95% lesion-bootstrap interval.

    A resample in which a class vanishes is skipped (macro metrics would not be comparable);
    ``n_valid`` counts the resamples used.
    """
    ma = scalar_metrics(y, p_a, classes=classes)
    mb = scalar_metrics(y, p_b, classes=classes)
    weights = draw_bootstrap_weights(len(y), n_boot, np.random.default_rng(seed), groups=groups)
    diffs: dict[str, list[float]] = {k: [] for k in ma}
    n_classes = len(set(y.tolist()))
    for w in weights:
        idx = np.repeat(np.arange(len(y)), w.astype(int))
        if len(set(y[idx].tolist())) < n_classes:
            continue
        a = scalar_metrics(y[idx], p_a[idx], classes=classes)
        b = scalar_metrics(y[idx], p_b[idx], classes=classes)
        for k in diffs:
            if a[k] is not None and b[k] is not None:
                diffs[k].append(b[k] - a[k])
    out = {}
    for k in ma:
        d = np.array(diffs[k])
        out[k] = {
            "a": ma[k],
            "b": mb[k],
            "difference": None if ma[k] is None or mb[k] is None else mb[k] - ma[k],
            "ci95": [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))]
            if len(d)
            else None,
            "n_valid": len(d),
        }
    return out


def _predictions(folder: Path) -> tuple[pd.DataFrame, list[str], str]:
    """A run's out-of-fold table or an evaluation's predictions, its classes, and its kind
    (``"run"`` or ``"evaluation"``). An evaluation has one fold, and an image without a
    ``lesion_id`` is its own lesion."""
    oof = RunFolder(folder).oof_predictions
    if oof.is_file():
        saved = read_predictions(oof)
        return saved.table, list(saved.classes), "run"
    evaluated = folder / EVALUATION_PREDICTIONS
    if evaluated.is_file():
        saved = read_predictions(evaluated)
        table = saved.table
        if "lesion_id" not in table.columns:
            table["lesion_id"] = table["image_id"]
        table["fold"] = 0
        return table, list(saved.classes), "evaluation"
    raise DataError(
        f"{folder}: no predictions",
        [f"neither {oof} (a training run) nor {evaluated} (an evaluation) exists"],
    )


def compare_runs(
    run_a: str | Path, run_b: str | Path, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Paired differences (B - A) of two runs' out-of-fold predictions, or of two evaluations'
    predictions (``skinlesion evaluate`` output folders).

    Both must have predicted the same images, with the same labels (and for runs, in the same
    folds); otherwise the difference would mix the method with the split.
    """
    a, classes, kind = _predictions(Path(run_a))
    b, classes_b, kind_b = _predictions(Path(run_b))
    problems = []
    if kind != kind_b:
        names = {"run": "a training run's out-of-fold predictions", "evaluation": "an evaluation's"}
        problems.append(f"{names[kind]} cannot be compared with {names[kind_b]}")
    if classes_b != classes:
        problems.append(f"classes differ: {classes} vs {classes_b}")
    merged = a.merge(b, on="image_id", suffixes=("", "_b"), how="outer", indicator=True)
    only = merged[merged["_merge"] != "both"]
    if len(only):
        problems.append(f"{len(only)} image(s) predicted by one run only, e.g. {only.iloc[0, 0]}")
    both = merged[merged["_merge"] == "both"]
    for col in ("dx", "fold", "lesion_id"):
        bad = both[both[col] != both[f"{col}_b"]]
        if len(bad):
            problems.append(f"{len(bad)} image(s) with another {col}, e.g. {bad.iloc[0, 0]}")
    if problems:
        raise DataError(f"cannot compare {run_a} with {run_b}", problems)
    y = both["dx"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    p_a = both[classes].to_numpy(np.float64)
    p_b = both[[f"{c}_b" for c in classes]].to_numpy(np.float64)
    groups = both["lesion_id"].to_numpy()
    return {
        "a": str(run_a),
        "b": str(run_b),
        "kind": kind,
        "n_images": len(both),
        "n_lesions": int(both["lesion_id"].nunique()),
        "bootstrap": {"unit": "lesion", "n_boot": n_boot, "paired": True, "seed": seed},
        "metrics": paired_bootstrap(y, p_a, p_b, groups, n_boot, seed, classes=classes),
    }


def paired_row(name: str, a: float, b: float, difference: float, ci: list[float] | None) -> str:
    """One Markdown table row: both values and the difference with its interval."""
    interval = f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""
    return f"| {name} | {a:.3f} | {b:.3f} | {difference:+.3f}{interval} |"


def render_comparison(result: dict[str, Any]) -> str:
    """A Markdown table of both runs' figures and the difference B - A with its interval."""
    same = "same folds" if result.get("kind", "run") == "run" else "same labelled images"
    lines = [
        f"A = {result['a']}, B = {result['b']}: {result['n_images']} images of "
        f"{result['n_lesions']} lesions, {same}; difference B - A with a 95% paired "
        f"bootstrap interval over lesions ({result['bootstrap']['n_boot']} resamples).",
        "",
        "| metric | A | B | B - A [95% CI] |",
        "| --- | --- | --- | --- |",
    ]
    for k, v in result["metrics"].items():
        if v["difference"] is None:
            continue
        lines.append(paired_row(k, v["a"], v["b"], v["difference"], v["ci95"]))
    return "\n".join(lines) + "\n"


def write_comparison(result: dict[str, Any], output: Path) -> None:
    output.write_text(json.dumps(result, indent=2, allow_nan=False))

"""Leakage audit: how much do image-level random folds inflate the metrics?

The same recipe runs twice on the same images: once with lesion-grouped folds (no lesion on both
sides of a split) and once with image-level stratified folds (the common mistake). Each image
then has one out-of-fold prediction under each split; a paired bootstrap over lesions gives the
inflation of every metric with a 95% interval.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from skinlesion.core.config import Config
from skinlesion.core.labels import CLASSES, class_index
from skinlesion.core.run_folder import RunFolder
from skinlesion.evaluation.metrics import draw_bootstrap_weights, point_metrics
from skinlesion.evaluation.report import prediction_classes

log = logging.getLogger(__name__)

AUDIT_METRICS: tuple[str, ...] = (
    "balanced_accuracy",
    "macro_f1",
    "accuracy",
    "macro_auroc",
    "log_loss",
    "ece",
)
SCHEMES: dict[str, bool] = {"lesion_grouped": True, "image_random": False}


def _scalars(
    y: np.ndarray, probs: np.ndarray, classes: Sequence[str] = CLASSES
) -> dict[str, float | None]:
    m = point_metrics(y, probs, classes)
    out = {k: m[k] for k in AUDIT_METRICS}
    out["mel_sensitivity_argmax"] = m["mel"]["sensitivity_argmax"]
    return out


def paired_inflation(
    y: np.ndarray,
    p_leaky: np.ndarray,
    p_clean: np.ndarray,
    groups: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    classes: Sequence[str] = CLASSES,
) -> dict[str, Any]:
    """Per metric: both values, their difference (leaky - clean) and its bootstrap interval."""
    clean, leaky = _scalars(y, p_clean, classes), _scalars(y, p_leaky, classes)
    weights = draw_bootstrap_weights(len(y), n_boot, np.random.default_rng(seed), groups=groups)
    diffs: dict[str, list[float]] = {k: [] for k in clean}
    for w in weights:
        idx = np.repeat(np.arange(len(y)), w.astype(int))
        if len(set(y[idx].tolist())) < len(set(y.tolist())):
            continue  # a class vanished from this resample: macro metrics are not comparable
        a, b = _scalars(y[idx], p_leaky[idx], classes), _scalars(y[idx], p_clean[idx], classes)
        for k in diffs:
            if a[k] is not None and b[k] is not None:
                diffs[k].append(a[k] - b[k])
    out = {}
    for k in clean:
        d = np.array(diffs[k])
        out[k] = {
            "lesion_grouped": clean[k],
            "image_random": leaky[k],
            "inflation": None if clean[k] is None or leaky[k] is None else leaky[k] - clean[k],
            "ci95": [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))]
            if len(d)
            else None,
            "n_valid": len(d),
        }
    return out


def audit_leakage(
    cfg: Config, resume: bool = False, n_boot: int | None = None, progress: bool = True
) -> dict[str, Any]:
    """Run the recipe on both splits under ``cfg.output_dir`` and write ``leakage.json/.md``."""
    from skinlesion.training.cv import run_cv

    out = Path(cfg.output_dir)
    # 0 is a valid choice (point values only), so only None falls back to the config.
    n_boot = cfg.eval.n_boot if n_boot is None else n_boot
    oof = {}
    for scheme, grouped in SCHEMES.items():
        sub = cfg.model_copy(deep=True)
        sub.cv.grouped = grouped
        sub.cv.folds_file = None
        sub.cv.folds_to_run = None  # both splits must predict every image once
        sub.output_dir = str(out / scheme)
        log.info("leakage audit: %s folds", scheme)
        run_cv(sub, resume=resume, progress=progress)
        oof[scheme] = pd.read_csv(
            RunFolder(out / scheme).oof_predictions, dtype={"image_id": str, "lesion_id": str}
        )
    merged = oof["lesion_grouped"].merge(
        oof["image_random"], on="image_id", suffixes=("", "_leaky"), validate="one_to_one"
    )
    classes = prediction_classes(oof["lesion_grouped"])
    y = merged["dx"].map(class_index(classes)).to_numpy()
    p_clean = merged[classes].to_numpy(np.float64)
    p_leaky = merged[[f"{c}_leaky" for c in classes]].to_numpy(np.float64)
    lesions_split = oof["image_random"].groupby("lesion_id")["fold"].nunique()
    result = {
        "recipe": {
            "backbone": cfg.model.backbone,
            "scheme": cfg.train.scheme,
            "image_size": cfg.data.image_size,
            "n_folds": cfg.cv.n_folds,
        },
        "n_images": len(merged),
        "n_lesions": int(merged["lesion_id"].nunique()),
        "lesions_split_across_folds_in_random_split": int((lesions_split > 1).sum()),
        "bootstrap": {"unit": "lesion", "n_boot": n_boot, "paired": True},
        "metrics": paired_inflation(
            y, p_leaky, p_clean, merged["lesion_id"].to_numpy(), n_boot, classes=classes
        ),
    }
    (out / "leakage.json").write_text(json.dumps(result, indent=2, allow_nan=False))
    (out / "leakage.md").write_text(render_leakage(result))
    return result


def render_leakage(result: dict[str, Any]) -> str:
    r = result["recipe"]
    lines = [
        f"# Leakage audit: {r['backbone']} ({r['scheme']}, {r['image_size']} px, "
        f"{r['n_folds']} folds)",
        "",
        f"{result['n_images']} images of {result['n_lesions']} lesions; the random image "
        f"split put {result['lesions_split_across_folds_in_random_split']} lesions in more "
        f"than one fold. Inflation = random split minus lesion-grouped split, 95% paired "
        f"bootstrap over lesions; for log loss and ECE (lower is better) leakage shows as a "
        f"negative number.",
        "",
        "| metric | lesion-grouped | image-random | inflation [95% CI] |",
        "| --- | --- | --- | --- |",
    ]
    for k, v in result["metrics"].items():
        if v["inflation"] is None:
            continue
        ci = f" [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]" if v["ci95"] else ""
        lines.append(
            f"| {k} | {v['lesion_grouped']:.3f} | {v['image_random']:.3f} | "
            f"{v['inflation']:+.3f}{ci} |"
        )
    return "\n".join(lines) + "\n"

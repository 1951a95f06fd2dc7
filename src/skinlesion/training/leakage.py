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

from skinlesion.core.config import Config
from skinlesion.core.errors import ConfigError
from skinlesion.core.labels import class_index
from skinlesion.core.run_folder import RunFolder
from skinlesion.evaluation.paired import PAIRED_METRICS, paired_bootstrap, paired_row
from skinlesion.evaluation.prediction_files import read_predictions

log = logging.getLogger(__name__)

AUDIT_METRICS: tuple[str, ...] = PAIRED_METRICS
SCHEMES: dict[str, bool] = {"lesion_grouped": True, "image_random": False}


def paired_inflation(
    y: np.ndarray,
    p_leaky: np.ndarray,
    p_clean: np.ndarray,
    groups: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    *,
    classes: Sequence[str],
) -> dict[str, Any]:
    """Per metric: both values, their difference (leaky - clean) and its bootstrap interval
    (:func:`~skinlesion.evaluation.paired.paired_bootstrap` with A = clean, B = leaky)."""
    paired = paired_bootstrap(y, p_clean, p_leaky, groups, n_boot, seed, classes=classes)
    return {
        k: {
            "lesion_grouped": v["a"],
            "image_random": v["b"],
            "inflation": v["difference"],
            "ci95": v["ci95"],
            "n_valid": v["n_valid"],
        }
        for k, v in paired.items()
    }


def audit_leakage(
    cfg: Config, resume: bool = False, n_boot: int | None = None, progress: bool = True
) -> dict[str, Any]:
    """Run the recipe on both splits under ``cfg.output_dir`` and write ``leakage.json/.md``."""
    from skinlesion.training.cv import run_cv

    out = Path(cfg.output_dir)
    parts = {scheme: RunFolder(out / scheme).config.is_file() for scheme in SCHEMES}
    if resume and not any(parts.values()):
        found = "holds no leakage audit" if out.exists() else "does not exist"
        raise ConfigError(
            f"output_dir: {out} {found} ({' or '.join(SCHEMES)} run); --resume continues an "
            f"audit there: check the path, or drop --resume to start a new one"
        )
    # 0 is a valid choice (point values only), so only None falls back to the config.
    n_boot = cfg.eval.n_boot if n_boot is None else n_boot
    saved = {}
    for scheme, grouped in SCHEMES.items():
        sub = cfg.model_copy(deep=True)
        sub.cv.grouped = grouped
        # folds_to_run first: it is checked against n_folds once folds_file is gone.
        sub.cv.folds_to_run = None  # both splits must predict every image once
        sub.cv.folds_file = None
        sub.output_dir = str(out / scheme)
        log.info("leakage audit: %s folds", scheme)
        # An audit interrupted in its first part has no folder of the second to resume.
        run_cv(sub, resume=resume and parts[scheme], progress=progress)
        saved[scheme] = read_predictions(RunFolder(out / scheme).oof_predictions)
    oof = {scheme: s.table for scheme, s in saved.items()}
    merged = oof["lesion_grouped"].merge(
        oof["image_random"], on="image_id", suffixes=("", "_leaky"), validate="one_to_one"
    )
    classes = list(saved["lesion_grouped"].classes)
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
        lines.append(
            paired_row(k, v["lesion_grouped"], v["image_random"], v["inflation"], v["ci95"])
        )
    return "\n".join(lines) + "\n"

"""The cross-site score that every recipe decision is judged by, and its paired comparison.

A recipe's yardstick folder holds the predictions of sets from sites its models never trained on,
all on images alone:

- ``cross_site/``: a cross-site run (``cv.holdout_column=dataset``) holding out HAM10000's
  :data:`YARDSTICK_SITES`, each predicted by the model trained on the other sites;
- ``isic2017_test/``: ``skinlesion evaluate`` of ISIC 2017's test split by the model trained on
  all of HAM10000, for a recipe that does not train on ISIC 2017 (for one that does, that set is
  in-domain and leaves the yardstick).

The score is the mean melanoma AUROC and the mean balanced accuracy over the sets. Two recipes are
compared on the sets both have, image by image: each set's lesions are resampled on their own
(1000 times), both recipes scored on the same draws, and the difference of each set and of the
mean gets a 95% interval. A candidate **wins** when its mean melanoma AUROC gains with an interval
above 0, its mean balanced accuracy does not lose with an interval below 0, and no single set loses
on either figure with an interval below 0.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from skinlesion.core.errors import DataError
from skinlesion.core.labels import MELANOMA, class_index
from skinlesion.core.run_folder import RunFolder
from skinlesion.evaluation.metrics import draw_bootstrap_weights, replicate_metrics
from skinlesion.evaluation.prediction_files import (
    EVALUATION_PREDICTIONS,
    PredictionFile,
    read_predictions,
)

YARDSTICK_SITES: tuple[str, ...] = ("rosendahl", "vidir_modern")
"""HAM10000's acquisition sites held out one at a time: each has hundreds of melanomas."""
ISIC_SET = "isic2017_test"
CROSS_SITE_DIR = "cross_site"
FIGURES: tuple[str, ...] = ("mel_auroc", "balanced_accuracy")
YARDSTICK_FILE = "yardstick.json"


def yardstick_sets(folder: str | Path) -> dict[str, PredictionFile]:
    """The labelled predictions of each set of a yardstick folder, by set name."""
    folder = Path(folder)
    sets: dict[str, PredictionFile] = {}
    oof = RunFolder(folder / CROSS_SITE_DIR).oof_predictions
    if oof.is_file():
        saved = read_predictions(oof)
        for site, part in saved.table.groupby("site", sort=True):
            sets[str(site)] = replace(saved, table=part.reset_index(drop=True))
    evaluated = folder / ISIC_SET / EVALUATION_PREDICTIONS
    if evaluated.is_file():
        saved = read_predictions(evaluated)
        if "lesion_id" not in saved.table.columns:
            saved.table["lesion_id"] = saved.table["image_id"]
        sets[ISIC_SET] = saved
    if not sets:
        raise DataError(
            f"{folder}: no yardstick predictions",
            [f"expected {oof} (a cross-site run) or {evaluated} (an evaluation)"],
        )
    return sets


def _replicates(
    table: pd.DataFrame, classes: Sequence[str], weights: np.ndarray
) -> dict[str, np.ndarray]:
    """Melanoma AUROC and balanced accuracy of the point estimate (row 0) and each replicate."""
    y = table["dx"].map(class_index(classes)).to_numpy()
    values = replicate_metrics(
        y, table[list(classes)].to_numpy(np.float64), weights, classes=classes
    )
    return {
        "mel_auroc": values[f"auroc.{MELANOMA}"],
        "balanced_accuracy": values["balanced_accuracy"],
    }


def _interval(values: np.ndarray) -> list[float] | None:
    valid = values[np.isfinite(values)]
    return [float(v) for v in np.percentile(valid, [2.5, 97.5])] if valid.size else None


def yardstick_score(folder: str | Path) -> dict[str, Any]:
    """Each set's melanoma AUROC and balanced accuracy (point estimates) and their means."""
    sets = yardstick_sets(folder)
    per_set = {}
    for name, saved in sets.items():
        n = len(saved.table)
        point = _replicates(saved.table, list(saved.classes), np.ones((1, n)))
        per_set[name] = {"n": n, **{k: float(v[0]) for k, v in point.items()}}
    mean = {k: float(np.mean([s[k] for s in per_set.values()])) for k in FIGURES}
    return {"folder": str(folder), "sets": per_set, "mean": mean}


def _paired_set(
    saved_a: PredictionFile,
    saved_b: PredictionFile,
    name: str,
    n_boot: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Per figure, the (1 + n_boot,) values of A and of B on one set: row 0 the point estimate."""
    classes = list(saved_a.classes)
    if list(saved_b.classes) != classes:
        raise DataError(f"set {name}: classes differ", [f"{classes} vs {list(saved_b.classes)}"])
    a, b = saved_a.table, saved_b.table
    both = a.merge(b, on="image_id", suffixes=("", "_b"), validate="one_to_one")
    if len(both) != len(a) or len(both) != len(b) or (both["dx"] != both["dx_b"]).any():
        raise DataError(
            f"set {name}: the two folders did not predict the same labelled images",
            [f"{len(a)} and {len(b)} images, {len(both)} in common"],
        )
    weights = np.vstack(
        [np.ones(len(both)), draw_bootstrap_weights(len(both), n_boot, rng, both["lesion_id"])]
    )
    pb = both[[f"{c}_b" for c in classes]].set_axis(classes, axis=1)
    ra = _replicates(both, classes, weights)
    rb = _replicates(pb.assign(dx=both["dx"]), classes, weights)
    return {f"{k}.{side}": v for side, r in (("a", ra), ("b", rb)) for k, v in r.items()}


def _difference(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    d = b - a
    return {"a": float(a[0]), "b": float(b[0]), "difference": float(d[0]), "ci95": _interval(d[1:])}


def compare_yardsticks(
    folder_a: str | Path, folder_b: str | Path, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """B minus A on the sets both folders have (see the module's docstring for the rule)."""
    sets_a, sets_b = yardstick_sets(folder_a), yardstick_sets(folder_b)
    common = [s for s in sets_a if s in sets_b]
    if not common:
        raise DataError(
            f"{folder_a} and {folder_b} share no yardstick set",
            [f"A: {sorted(sets_a)}; B: {sorted(sets_b)}"],
        )
    rng = np.random.default_rng(seed)
    drawn = {s: _paired_set(sets_a[s], sets_b[s], s, n_boot, rng) for s in common}
    per_set = {
        s: {k: _difference(v[f"{k}.a"], v[f"{k}.b"]) for k in FIGURES} for s, v in drawn.items()
    }
    mean = {
        k: _difference(
            np.mean([v[f"{k}.a"] for v in drawn.values()], axis=0),
            np.mean([v[f"{k}.b"] for v in drawn.values()], axis=0),
        )
        for k in FIGURES
    }
    return {
        "a": str(folder_a),
        "b": str(folder_b),
        "sets": common,
        "left_out": sorted(set(sets_a) ^ set(sets_b)),
        "n_boot": n_boot,
        "seed": seed,
        "per_set": per_set,
        "mean": mean,
        "verdict": verdict(per_set, mean),
    }


def _below(ci: list[float] | None) -> bool:
    return ci is not None and ci[1] < 0


def verdict(per_set: dict[str, Any], mean: dict[str, Any]) -> str:
    """``wins``, or why not (the rule of the module's docstring)."""
    losses = [f"{s} {k}" for s, f in per_set.items() for k in FIGURES if _below(f[k]["ci95"])]
    if losses:
        return "does not win: loses on " + ", ".join(losses)
    if _below(mean["balanced_accuracy"]["ci95"]):
        return "does not win: the mean balanced accuracy loses"
    ci = mean["mel_auroc"]["ci95"]
    if ci is None or ci[0] <= 0:
        return "does not win: the mean melanoma AUROC gain's interval reaches 0"
    return "wins"


def render_yardstick_comparison(result: dict[str, Any]) -> str:
    """A Markdown table: each set's and the mean's figures for A and B, and B - A [95% CI]."""
    lines = [
        f"A = {result['a']}, B = {result['b']}; sets: {', '.join(result['sets'])}"
        + (
            f" (left out, not in both: {', '.join(result['left_out'])})"
            if result["left_out"]
            else ""
        )
        + f"; B - A with a 95% paired lesion-bootstrap interval ({result['n_boot']} resamples).",
        "",
        "| set | mel AUROC A | mel AUROC B | B - A [95% CI] | bal acc A | bal acc B "
        "| B - A [95% CI] |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows = [*result["per_set"].items(), ("mean", result["mean"])]
    for name, f in rows:
        cells = []
        for k in FIGURES:
            v = f[k]
            ci = f" [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]" if v["ci95"] else ""
            cells.append(f"{v['a']:.3f} | {v['b']:.3f} | {v['difference']:+.3f}{ci}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Verdict: B {result['verdict']}."]
    return "\n".join(lines) + "\n"


def write_yardstick(result: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(result, indent=2, allow_nan=False))

"""Figures of cross-site validation (``cv.holdout_column``): each held-out site predicted by the
model trained on the other sites, with the operating points that model took from its own
training sites (the ones a deployed model would use at a new clinic).

Per site: melanoma AUROC, balanced accuracy over the classes the site has, melanoma sensitivity
and specificity at the training sites' 95%-specificity threshold, ECE, refer rates by reason,
each with a lesion-level 95% bootstrap interval where one applies; the classes that are absent
or rare at the site are listed as such. Then the mean over the sites.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from skinlesion.core.labels import MELANOMA, class_index
from skinlesion.evaluation.metrics import evaluate_predictions
from skinlesion.inference.refer import refer_summary

RARE_IMAGES = 10
"""A class with fewer images than this at a site is shown as rare: its figures rest on few
lesions."""

HEADLINE = ("mel_auroc", "balanced_accuracy")
"""The two figures the cross-site score averages."""


def _headline(m: dict[str, Any], classes: Sequence[str]) -> dict[str, Any]:
    """Melanoma AUROC and balanced accuracy with their intervals, from evaluate_predictions."""
    mel = m["point"]["per_class"].get(MELANOMA) if MELANOMA in classes else None
    mel_ci = m["ci95"]["per_class"].get(MELANOMA, {}).get("auroc") if mel else None
    return {
        "mel_auroc": mel["auroc"] if mel else None,
        "mel_auroc_ci95": mel_ci,
        "balanced_accuracy": m["point"]["balanced_accuracy"],
        "balanced_accuracy_ci95": m["ci95"]["balanced_accuracy"],
    }


def site_figures(
    table: pd.DataFrame,
    classes: Sequence[str],
    summary: dict[str, Any],
    unfamiliarity: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """The figures of one held-out site's predictions (``dx``, ``lesion_id``, a column per
    class), with the melanoma threshold and refer rules of ``summary`` (the fold's)."""
    y = table["dx"].map(class_index(classes)).to_numpy()
    probs = table[list(classes)].to_numpy(np.float64)
    threshold = summary.get("mel_threshold")
    m = evaluate_predictions(
        y,
        probs,
        table["lesion_id"].to_numpy(),
        classes=classes,
        mel_threshold=threshold,
        n_boot=n_boot,
        seed=seed,
    )
    point, ci = m["point"], m["ci95"]
    support = {c: v["support"] for c, v in point["per_class"].items()}
    return {
        "site": summary.get("holdout_site"),
        "fold": int(summary["fold"]),
        "n": len(table),
        "n_lesions": int(table["lesion_id"].nunique()),
        "support": support,
        "classes_absent": point["classes_absent"],
        "classes_rare": [c for c, n in support.items() if 0 < n < RARE_IMAGES],
        **_headline(m, classes),
        "macro_auroc": point["macro_auroc"],
        "mel_threshold": threshold,
        "mel_sensitivity": point["mel"]["sensitivity_at_threshold"],
        "mel_sensitivity_ci95": ci["mel"]["sensitivity_at_threshold"],
        "mel_specificity": point["mel"]["specificity_at_threshold"],
        "mel_specificity_ci95": ci["mel"]["specificity_at_threshold"],
        "ece": point["ece"],
        "ece_ci95": ci["ece"],
        "log_loss": point["log_loss"],
        "refer": refer_summary(probs, summary.get("refer") or {}, unfamiliarity),
        "n_left_out": summary.get("n_left_out", 0),
        "bootstrap_unit": m["bootstrap_unit"],
    }


def mean_over_sites(sites: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """The unweighted mean of each headline figure over the sites that have it."""
    out: dict[str, float | None] = {}
    for key in (*HEADLINE, "mel_sensitivity", "mel_specificity", "ece"):
        values = [s[key] for s in sites if s.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    out["n_sites"] = len(sites)
    return out


def cross_site_figures(
    oof: pd.DataFrame,
    classes: Sequence[str],
    summaries: dict[int, dict[str, Any]],
    unfamiliarity: dict[int, pd.DataFrame],
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Per held-out site (one per fold of ``oof``) and the mean; ``unfamiliarity`` maps a fold
    to its held-out images' ``image_id, unfamiliarity`` where the member has a familiarity."""
    sites = []
    for fold in sorted(summaries):
        part = oof[oof["fold"] == fold]
        u = None
        if fold in unfamiliarity:
            scored = unfamiliarity[fold].set_index("image_id")["unfamiliarity"]
            u = scored.reindex(part["image_id"]).to_numpy(np.float64)
        sites.append(site_figures(part, classes, summaries[fold], u, n_boot, seed))
    return {"sites": sites, "mean": mean_over_sites(sites)}


def _fmt(value: float | None, ci: list[float] | None = None, pct: bool = False) -> str:
    if value is None:
        return "n/a"
    scale, digits = (100, 1) if pct else (1, 3)
    text = f"{value * scale:.{digits}f}"
    return text + (f" [{ci[0] * scale:.{digits}f}, {ci[1] * scale:.{digits}f}]" if ci else "")


def render_cross_site(result: dict[str, Any], members: int = 1) -> list[str]:
    """The Markdown section of a cross-site report; in the card of a model that averages
    ``members`` models of the recipe, it says that the figures are of one model per site."""
    run = f" (`{result['run']}`)" if result.get("run") else ""
    ensemble = (
        f" These are the figures of one model of the recipe at each held-out site; this "
        f"package averages {members} members of it."
        if members > 1
        else ""
    )
    lines = [
        "## Cross-site validation",
        "",
        f"Each site predicted by the model of the recipe trained on the other sites{run}; "
        "melanoma threshold and refer rules from that model's training sites (95% lesion-level "
        f"bootstrap intervals).{ensemble}",
        "",
        "| held-out site | images (lesions) | melanoma AUROC | balanced accuracy (%) | mel "
        "sensitivity (%) | mel specificity (%) | ECE | referred (%) | by reason (%) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in result["sites"]:
        reasons = ", ".join(f"{k} {v * 100:.1f}" for k, v in s["refer"]["by_reason"].items())
        lines.append(
            f"| {s['site']} | {s['n']} ({s['n_lesions']}) | "
            f"{_fmt(s['mel_auroc'], s['mel_auroc_ci95'])} | "
            f"{_fmt(s['balanced_accuracy'], s['balanced_accuracy_ci95'], pct=True)} | "
            f"{_fmt(s['mel_sensitivity'], s['mel_sensitivity_ci95'], pct=True)} | "
            f"{_fmt(s['mel_specificity'], s['mel_specificity_ci95'], pct=True)} | "
            f"{_fmt(s['ece'], s['ece_ci95'])} | {s['refer']['rate'] * 100:.1f} | {reasons} |"
        )
    mean = result["mean"]
    lines += [
        f"| mean of {mean['n_sites']} | | {_fmt(mean['mel_auroc'])} | "
        f"{_fmt(mean['balanced_accuracy'], pct=True)} | {_fmt(mean['mel_sensitivity'], pct=True)} "
        f"| {_fmt(mean['mel_specificity'], pct=True)} | {_fmt(mean['ece'])} | | |",
        "",
        "Classes per site (images); absent classes are left out of that site's balanced "
        f"accuracy, rare ones (< {RARE_IMAGES} images) rest on few lesions:",
        "",
    ]
    for s in result["sites"]:
        counts = ", ".join(f"{c} {n}" for c, n in s["support"].items())
        notes = []
        if s["classes_absent"]:
            notes.append("absent: " + ", ".join(s["classes_absent"]))
        if s["classes_rare"]:
            notes.append("rare: " + ", ".join(s["classes_rare"]))
        left = f"; {s['n_left_out']} image(s) of other sites left out of training (same lesion)"
        lines.append(
            f"- {s['site']}: {counts}"
            + (f" ({'; '.join(notes)})" if notes else "")
            + (left if s["n_left_out"] else "")
        )
    return lines

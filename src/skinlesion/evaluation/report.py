"""Reports computed from saved predictions: out-of-fold after training, external after evaluate.

Every number is recomputed from a predictions CSV on disk, so anyone can check it: read the CSV,
feed the class columns to scikit-learn, get the same figure.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from skinlesion.core.errors import DataError
from skinlesion.core.paths import check_writable_dir, check_writable_file
from skinlesion.core.run_folder import RunFolder
from skinlesion.evaluation.cross_site import cross_site_figures, render_cross_site
from skinlesion.evaluation.metrics import (
    evaluate_predictions,
    melanoma_threshold_for_specificity,
    point_metrics,
)
from skinlesion.evaluation.plots import (
    plot_confusion_matrices,
    plot_reliability_diagram,
    plot_roc_curves,
)
from skinlesion.evaluation.prediction_files import (
    RAW_PREFIX,
    read_holdout_unfamiliarity,
    read_predictions,
    write_predictions,
)
from skinlesion.evaluation.refer_figures import (
    plot_risk_coverage,
    render_risk_coverage,
    risk_coverage,
)
from skinlesion.inference.refer import fit_refer_reference

log = logging.getLogger(__name__)

# Share of out-of-fold images below which the top-class confidence counts as "low": the
# confidence at this quantile of the OOF predictions is the operating threshold that external
# sets are compared against.
LOW_CONFIDENCE_QUANTILE = 0.10


def collect_oof(run_dir: Path) -> pd.DataFrame:
    """Concatenate ``fold_*/val_predictions.csv``; each image must appear exactly once, and
    every fold must have the same classes."""
    files = [read_predictions(p) for p in RunFolder(run_dir).val_prediction_files()]
    if not files:
        raise DataError(f"{run_dir}: no fold_*/val_predictions.csv (has a fold finished?)")
    other = [f"{f.path}: {list(f.classes)}" for f in files if f.classes != files[0].classes]
    if other:
        title = f"{run_dir}: folds predict other classes than {files[0].path}"
        raise DataError(title, [f"{files[0].path}: {list(files[0].classes)}", *other])
    oof = pd.concat([f.table for f in files], ignore_index=True).sort_values(["fold", "image_id"])
    dup = oof["image_id"][oof["image_id"].duplicated()]
    if len(dup):
        raise DataError(f"{run_dir}: images predicted by several folds: {dup.tolist()[:5]}")
    return oof.reset_index(drop=True)


def confidence_indicators(probs: np.ndarray, threshold: float) -> dict[str, float]:
    conf = probs.max(1)
    return {
        "mean_max_probability": float(conf.mean()),
        "share_below_threshold": float((conf < threshold).mean()),
        "confidence_threshold": float(threshold),
    }


def write_plots(
    y: np.ndarray,
    probs: np.ndarray,
    cm: list[list[int]],
    out: Path,
    raw: np.ndarray | None = None,
    *,
    classes: Sequence[str],
) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [plot_confusion_matrices(cm, classes, out / "confusion_matrix.png")]
    if raw is not None:
        paths.append(plot_reliability_diagram(y, raw, out / "reliability.png", probs_after=probs))
    else:
        paths.append(plot_reliability_diagram(y, probs, out / "reliability.png"))
    present = sorted(set(y.tolist()))
    if len(present) >= 2:
        paths.append(plot_roc_curves(y, probs, classes, out / "roc_curves.png"))
    # Relative to the report folder, so a moved run folder stays consistent.
    return [p.name for p in paths]


def _melanoma_threshold(y: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> float | None:
    """The OOF p(mel) threshold at 95% specificity; ``None`` for a class list without ``mel``."""
    if "mel" not in classes:
        log.info("no 'mel' class: the melanoma threshold and figures are left out")
        return None
    return melanoma_threshold_for_specificity(y, probs, 0.95, classes=classes)


def check_report_writable(run: RunFolder) -> None:
    """The report's files and ``plots/`` can be written in the run folder (checked before the
    bootstrap, so a file in the way fails in seconds)."""
    for path in (run.oof_predictions, run.oof_metrics, run.report):
        check_writable_file(path, "report")
    check_writable_dir(run.plots, "report")


def write_oof_report(run_dir: str | Path, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """``oof_predictions.csv``, ``oof_metrics.json``, ``plots/`` and ``report.md`` of a run."""
    run_dir = Path(run_dir)
    run = RunFolder(run_dir)
    check_report_writable(run)
    write_predictions(collect_oof(run_dir), run.oof_predictions)
    saved = read_predictions(run.oof_predictions)  # figures from the file
    oof, classes = saved.table, list(saved.classes)
    y, probs = saved.labels(), saved.probabilities()
    raw = saved.probabilities(RAW_PREFIX) if saved.has_raw else None
    threshold = _melanoma_threshold(y, probs, classes)
    grouped = run.read_dataset().get("grouped", True)
    metrics = evaluate_predictions(
        y,
        probs,
        # Without groups every image is its own: resample images, and say so.
        groups=oof["lesion_id"].to_numpy() if grouped else None,
        classes=classes,
        mel_threshold=threshold,
        n_boot=n_boot,
        seed=seed,
    )
    conf_threshold = float(np.quantile(probs.max(1), LOW_CONFIDENCE_QUANTILE))
    result: dict[str, Any] = {
        "source": "out-of-fold",
        "folds": sorted(int(f) for f in oof["fold"].unique()),
        "grouped": bool(grouped),
        "mel_threshold": threshold,
        "mel_threshold_rule": "lowest p(mel) threshold with specificity >= 0.95 on OOF",
        "domain": confidence_indicators(probs, conf_threshold),
        **metrics,
    }
    # The refer rules a packaged model carries, and the table a user picks an operating point from.
    result["refer"] = fit_refer_reference(probs)
    result["risk_coverage"] = risk_coverage(y, probs, result["refer"])
    if raw is not None:
        before = point_metrics(y, raw, classes=classes)
        result["calibration"] = {
            "before": {k: before[k] for k in ("ece", "log_loss", "brier")},
            "after": {k: metrics["point"][k] for k in ("ece", "log_loss", "brier")},
        }
    if "source" in oof.columns:
        result["per_source"] = per_source_figures(oof["source"].to_numpy(), y, probs, classes)
    sites = _cross_site(run, oof, classes, n_boot, seed)
    if sites is not None:
        result["source"] = "held-out sites (cross-site validation)"
        result["cross_site"] = sites
    cm = metrics["point"]["confusion_matrix"]
    result["plots"] = write_plots(y, probs, cm, run.plots, raw, classes=classes)
    rc_plot = plot_risk_coverage(y, probs, run.plots / "risk_coverage.png")
    result["plots"].append(rc_plot.name)
    run.oof_metrics.write_text(json.dumps(result, indent=2, allow_nan=False))
    run.report.write_text(render_markdown(result, f"Out-of-fold report: {run_dir}"))
    log.info("report: %s", run.report)
    return result


def _cross_site(
    run: RunFolder, oof: pd.DataFrame, classes: Sequence[str], n_boot: int, seed: int
) -> dict[str, Any] | None:
    """The cross-site figures of a run whose folds each held out a site, else ``None``."""
    summaries, scored = {}, {}
    for folder in run.fold_folders():
        if not folder.finished:
            continue
        summary = folder.read_summary()
        if summary.get("holdout_site") is None:
            return None
        summaries[folder.number] = summary
        if folder.holdout_unfamiliarity.is_file():
            scored[folder.number] = read_holdout_unfamiliarity(folder.holdout_unfamiliarity)
    if not summaries:
        return None
    return cross_site_figures(oof, classes, summaries, scored, n_boot, seed)


def per_source_figures(
    sources: np.ndarray, y: np.ndarray, probs: np.ndarray, classes: Sequence[str]
) -> dict[str, Any]:
    """Point figures of each source's images (full softmax, argmax over every class): balanced
    accuracy and macro AUROC over the classes the source has, each such class's recall and
    AUROC, and the melanoma AUROC where it has melanomas."""
    out: dict[str, Any] = {}
    for name in sorted(set(sources.tolist())):
        keep = sources == name
        p = point_metrics(y[keep], probs[keep], classes=classes)
        per_class = {
            c: {"support": v["support"], "recall": v["recall"], "auroc": v["auroc"]}
            for c, v in p["per_class"].items()
            if not v["absent"]
        }
        out[str(name)] = {
            "n": p["n"],
            "classes_present": p["classes_present"],
            "balanced_accuracy": p["balanced_accuracy"],
            "macro_auroc": p["macro_auroc"],
            "mel_auroc": per_class["mel"]["auroc"] if "mel" in per_class else None,
            "per_class": per_class,
        }
    return out


def _per_source(result: dict[str, Any]) -> list[str]:
    """The per-source table of a run of sources (none for one set)."""
    if not result.get("per_source"):
        return []
    lines = [
        "",
        "Per source (balanced accuracy and AUROCs over the classes each source has; "
        "recall / AUROC per class):",
        "",
        "| source | n | balanced accuracy (%) | macro AUROC | melanoma AUROC | per class |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, f in result["per_source"].items():
        classes = ", ".join(
            f"{c} {_fmt(v['recall'], pct=True)} / {_fmt(v['auroc'])}"
            for c, v in f["per_class"].items()
        )
        lines.append(
            f"| {name} | {f['n']} | {_fmt(f['balanced_accuracy'], pct=True)} | "
            f"{_fmt(f['macro_auroc'])} | {_fmt(f['mel_auroc'])} | {classes} |"
        )
    return lines


def _fmt(value: float | None, ci: list[float] | None = None, pct: bool = False) -> str:
    if value is None:
        return "absent"
    scale = 100.0 if pct else 1.0
    text = f"{value * scale:.1f}" if pct else f"{value:.3f}"
    if ci:
        text += (
            f" [{ci[0] * scale:.1f}, {ci[1] * scale:.1f}]"
            if pct
            else f" [{ci[0]:.3f}, {ci[1]:.3f}]"
        )
    return text


def render_markdown(result: dict[str, Any], title: str) -> str:
    """The headline table (with 95% intervals), calibration, per-class table."""
    p, ci = result["point"], result.get("ci95", {})
    mel = p["mel"]
    unit = result.get("bootstrap_unit", "image")
    lines = [f"# {title}", "", *_leakage_warning(result)]
    lines += [
        f"n = {p['n']} images; classes present: {', '.join(p['classes_present'])}"
        + (f"; absent: {', '.join(p['classes_absent'])}" if p["classes_absent"] else ""),
        f"95% intervals: bootstrap over {unit}s ({result.get('n_boot', 0)} resamples).",
        "",
        "| metric | value [95% CI] |",
        "| --- | --- |",
    ]
    for label, key, pct in _HEADLINE:
        lines.append(f"| {label} | {_fmt(p[key], ci.get(key), pct)} |")
    if p["classes_absent"] and "predicted_absent" in p:  # e.g. bcc predicted on a set without bcc
        absent = _fmt(p["predicted_absent"], ci.get("predicted_absent"), True)
        lines.append(f"| predicted as a class these images lack (%) | {absent} |")
    mel_ci = ci.get("mel", {})
    if "mel" in p["per_class"]:  # melanoma figures only for a class list that has it
        for label, key in _MELANOMA:
            lines.append(f"| {label} | {_fmt(mel.get(key), mel_ci.get(key), True)} |")
    sites = ["", *render_cross_site(result["cross_site"])] if result.get("cross_site") else []
    body = lines + _notes(result) + _per_class(p) + _per_source(result) + sites
    return "\n".join(body) + "\n"


def _leakage_warning(result: dict[str, Any]) -> list[str]:
    if result.get("grouped", True):
        return []
    return [
        "**Warning: leakage cannot be ruled out.** The labels name no lesion or patient (group) "
        "for the images, so each image was its own group: lesion-level cross-validation was not "
        "possible, images of one lesion may sit in training and validation folds, and these "
        "figures may be inflated. Intervals resample images.",
        "",
    ]


_HEADLINE = (
    ("balanced accuracy (%)", "balanced_accuracy", True),
    ("macro F1", "macro_f1", False),
    ("accuracy (%)", "accuracy", True),
    ("macro AUROC", "macro_auroc", False),
    ("ECE (15 bins)", "ece", False),
    ("Brier score", "brier", False),
    ("log loss", "log_loss", False),
)
_MELANOMA = (
    ("melanoma sensitivity, argmax (%)", "sensitivity_argmax"),
    ("melanoma specificity, argmax (%)", "specificity_argmax"),
    ("melanoma sensitivity at threshold (%)", "sensitivity_at_threshold"),
    ("melanoma specificity at threshold (%)", "specificity_at_threshold"),
)


def _notes(result: dict[str, Any]) -> list[str]:
    """Threshold, calibration and confidence lines under the headline table."""
    lines: list[str] = []
    if result.get("mel_threshold") is not None:
        lines += [
            "",
            f"Melanoma threshold p(mel) >= {result['mel_threshold']:.4f} "
            f"({result.get('mel_threshold_rule', '')}).",
        ]
    if "calibration" in result:
        cb, ca = result["calibration"]["before"], result["calibration"]["after"]
        lines += ["", "| calibration | before | after temperature scaling |", "| --- | --- | --- |"]
        for key in ("ece", "log_loss", "brier"):
            lines.append(f"| {key} | {cb[key]:.4f} | {ca[key]:.4f} |")
    if "domain" in result:
        d = result["domain"]
        lines += [
            "",
            f"Mean top-class confidence {d['mean_max_probability']:.3f}; "
            f"{d['share_below_threshold'] * 100:.1f}% of images below confidence "
            f"{d['confidence_threshold']:.3f}.",
        ]
        if "reference" in d:
            r = d["reference"]
            lines.append(
                f"Out-of-fold reference: {r['mean_max_probability']:.3f} and "
                f"{r['share_below_threshold'] * 100:.1f}%."
            )
    lines += _refer_lines(result)
    if result.get("risk_coverage"):
        lines += ["", "Risk-coverage (the least confident images referred to a person):", ""]
        lines += render_risk_coverage(result["risk_coverage"])
    return lines


def _refer_lines(result: dict[str, Any]) -> list[str]:
    """The share referred by the model's rules, by reason, and the familiarity's AUROC."""
    refer = result.get("referred")
    if not refer:
        return []
    reasons = ", ".join(f"{k} {v * 100:.1f}%" for k, v in refer["by_reason"].items())
    lines = ["", f"Referred by the model's rules: {refer['rate'] * 100:.1f}% ({reasons})."]
    fam = result.get("familiarity")
    if fam is None:
        lines.append("No familiarity with the model: no check for images unlike its training's.")
    elif fam.get("auroc_vs_training") is not None:
        lines.append(
            f"Unfamiliarity against the training distribution: AUROC "
            f"{fam['auroc_vs_training']:.3f} (against {fam['n_reference']} held-out "
            f"in-distribution scores; 0.5 = alike), median {fam['median_unfamiliarity']:.2f}, "
            f"{fam['share_unfamiliar'] * 100:.1f}% above 1."
        )
    return lines


def _per_class(p: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "| class | support | precision | recall | F1 | AUROC |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for c, v in p["per_class"].items():
        if v.get("absent"):
            lines.append(f"| {c} | 0 | absent | absent | absent | absent |")
        else:
            lines.append(
                f"| {c} | {v['support']} | {_fmt(v['precision'])} | "
                f"{_fmt(v['recall'])} | {_fmt(v['f1'])} | {_fmt(v['auroc'])} |"
            )
    return lines

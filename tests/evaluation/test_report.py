"""Out-of-fold reports: every figure must be recomputable from ``oof_predictions.csv``."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import (
    ABSENT_CLASS,
    PROBE,
    check_point_against_sklearn,
    clip_probs,
    plain_ece,
    run_overrides,
    train_cli,
)
from PIL import Image
from sklearn.metrics import log_loss, roc_auc_score

from skinlesion.cli import main
from skinlesion.core.errors import DataError
from skinlesion.core.labels import CLASSES
from skinlesion.evaluation.metrics import evaluate_predictions
from skinlesion.evaluation.prediction_files import labelled_predictions, write_predictions
from skinlesion.evaluation.report import collect_oof, per_source_figures, render_markdown

TOL = 1e-6


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, syn_root: Path) -> Path:
    """One finished two-fold run; the report keeps the default ``eval.n_boot`` (1000) so that
    ``skinlesion report RUN`` with its defaults must reproduce it."""
    tmp = tmp_path_factory.mktemp("report")
    out = tmp / "run"
    args = run_overrides(PROBE, syn_root, out, tmp / "cache", **{"eval.n_boot": 1000})
    assert train_cli(args) == 0
    return out


def read_oof(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "oof_predictions.csv", dtype={"image_id": str, "lesion_id": str})


def labels_and_probs(df: pd.DataFrame, prefix: str = "") -> tuple[np.ndarray, np.ndarray]:
    y = df["dx"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    return y, df[[f"{prefix}{c}" for c in CLASSES]].to_numpy(np.float64)


def test_oof_predictions_cover_each_image_once(run: Path) -> None:
    oof = read_oof(run)
    folds = pd.read_csv(run / "folds.csv", dtype=str)
    assert [c for c in oof.columns if c in CLASSES] == list(CLASSES)
    assert {"image_id", "lesion_id", "dx", "fold"} <= set(oof.columns)
    assert not oof["image_id"].duplicated().any()
    assert sorted(oof["image_id"]) == sorted(folds["image_id"])
    merged = oof.merge(folds, on="image_id", suffixes=("", "_folds"), validate="one_to_one")
    assert (merged["fold"].astype(str) == merged["fold_folds"]).all()
    assert (merged["dx"] == merged["dx_folds"]).all()
    assert (merged["lesion_id"] == merged["lesion_id_folds"]).all()
    probs = oof[list(CLASSES)].to_numpy(np.float64)
    assert (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    # The fold files are the source: the OOF table is their concatenation.
    parts = pd.concat(
        [pd.read_csv(p, dtype={"image_id": str}) for p in sorted(run.glob("fold_*/val_*.csv"))]
    )
    for fold, part in parts.groupby("fold"):
        assert set(part["image_id"]) == set(oof.loc[oof["fold"] == fold, "image_id"])


def test_oof_metrics_match_sklearn(run: Path) -> None:
    result = json.loads((run / "oof_metrics.json").read_text())
    y, probs = labels_and_probs(read_oof(run))
    assert result["n"] == len(y)
    check_point_against_sklearn(result["point"], y, probs, TOL)
    assert result["folds"] == [0, 1]
    assert result["bootstrap_unit"] == "lesion" and result["n_boot"] == 1000
    lo, hi = result["ci95"]["balanced_accuracy"]
    assert lo <= result["point"]["balanced_accuracy"] <= hi


def test_melanoma_threshold_and_domain_follow_their_rules(run: Path) -> None:
    result = json.loads((run / "oof_metrics.json").read_text())
    y, probs = labels_and_probs(read_oof(run))
    mel = CLASSES.index("mel")
    t = result["mel_threshold"]
    negatives = probs[y != mel, mel]
    assert (negatives < t).mean() >= 0.95
    # The smallest such threshold: any lower observed score misses the target.
    lower = np.unique(probs[:, mel])
    lower = lower[lower < t]
    if len(lower):
        assert (negatives < lower[-1]).mean() < 0.95
    flagged = probs[:, mel] >= t
    mel_point = result["point"]["mel"]
    assert mel_point["threshold"] == t
    assert mel_point["sensitivity_at_threshold"] == pytest.approx(flagged[y == mel].mean())
    assert mel_point["specificity_at_threshold"] == pytest.approx((~flagged[y != mel]).mean())
    conf = probs.max(1)
    domain = result["domain"]
    assert domain["confidence_threshold"] == pytest.approx(np.quantile(conf, 0.1), abs=TOL)
    assert domain["mean_max_probability"] == pytest.approx(conf.mean(), abs=TOL)
    assert domain["share_below_threshold"] == pytest.approx(
        (conf < domain["confidence_threshold"]).mean()
    )


def test_temperature_scaling_does_not_hurt_calibration(run: Path) -> None:
    result = json.loads((run / "oof_metrics.json").read_text())
    oof = read_oof(run)
    y, after = labels_and_probs(oof)
    _, before = labels_and_probs(oof, "raw_")
    cal = result["calibration"]
    labels = list(range(len(CLASSES)))
    for when, probs in (("before", before), ("after", after)):
        expected = log_loss(y, clip_probs(probs), labels=labels)
        assert cal[when]["log_loss"] == pytest.approx(expected, abs=TOL), when
    assert cal["before"]["ece"] == pytest.approx(plain_ece(y, before), abs=TOL)
    assert cal["after"] == {k: result["point"][k] for k in ("ece", "log_loss", "brier")}
    assert cal["before"]["ece"] >= cal["after"]["ece"] - 1e-9
    assert cal["after"]["log_loss"] <= cal["before"]["log_loss"] + 1e-9
    # Each fold's temperature was fitted on that fold: its calibrated predictions must be the
    # raw ones with logits divided by T (same argmax, T from the checkpoint summary).
    for fold, part in oof.groupby("fold"):
        t = json.loads((run / f"fold_{fold}" / "summary.json").read_text())["temperature"]
        logp = np.log(part[[f"raw_{c}" for c in CLASSES]].to_numpy(np.float64))
        z = logp / t
        expected = np.exp(z - z.max(1, keepdims=True))
        expected /= expected.sum(1, keepdims=True)
        np.testing.assert_allclose(part[list(CLASSES)].to_numpy(), expected, atol=1e-5)


def test_plots_and_headline_table(run: Path) -> None:
    result = json.loads((run / "oof_metrics.json").read_text())
    for name in ("confusion_matrix.png", "reliability.png", "roc_curves.png"):
        path = run / "plots" / name
        assert name in result["plots"]
        with Image.open(path) as image:
            assert image.format == "PNG"
            image.verify()
    md = (run / "report.md").read_text()
    p, ci = result["point"], result["ci95"]
    bal = p["balanced_accuracy"] * 100
    lo, hi = (v * 100 for v in ci["balanced_accuracy"])
    assert f"| balanced accuracy (%) | {bal:.1f} [{lo:.1f}, {hi:.1f}] |" in md
    f1_lo, f1_hi = ci["macro_f1"]
    assert f"| macro F1 | {p['macro_f1']:.3f} [{f1_lo:.3f}, {f1_hi:.3f}] |" in md
    for label in ("accuracy (%)", "macro AUROC", "log loss", "melanoma sensitivity, argmax (%)"):
        assert re.search(rf"\| {re.escape(label)} \| [0-9.]+ \[[0-9.]+, [0-9.]+\] \|", md), label
    assert "| calibration | before | after temperature scaling |" in md
    assert f"p(mel) >= {result['mel_threshold']:.4f}" in md


def test_cli_report_regenerates_identically(run: Path) -> None:
    saved = {n: (run / n).read_bytes() for n in ("report.md", "oof_metrics.json")}
    saved_oof = (run / "oof_predictions.csv").read_bytes()
    (run / "report.md").unlink()
    (run / "oof_metrics.json").unlink()
    (run / "oof_predictions.csv").unlink()
    shutil.rmtree(run / "plots")
    assert main(["report", str(run)]) == 0
    for name, content in saved.items():
        assert (run / name).read_bytes() == content, name
    assert (run / "oof_predictions.csv").read_bytes() == saved_oof
    assert (run / "plots" / "roc_curves.png").is_file()


def test_cli_report_without_predictions_is_a_clean_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "val_predictions.csv" in capsys.readouterr().err


def _hand_result() -> dict[str, Any]:
    point = {
        "n": 4,
        "classes_present": ["mel", "nv"],
        "classes_absent": ["akiec", "bcc", "bkl", "df", "vasc"],
        "accuracy": 0.75,
        "balanced_accuracy": 0.75,
        "macro_f1": 0.7333333,
        "macro_auroc": 0.875,
        "ece": 0.125,
        "brier": 0.25,
        "log_loss": 0.5,
        "per_class": {c: dict(ABSENT_CLASS) for c in CLASSES},
        "mel": {
            "sensitivity_argmax": 0.5,
            "specificity_argmax": 1.0,
            "sensitivity_at_threshold": None,
            "specificity_at_threshold": None,
            "threshold": None,
        },
    }
    point["per_class"]["mel"] = {
        "precision": 1.0,
        "recall": 0.5,
        "f1": 2 / 3,
        "auroc": 0.875,
        "support": 2,
        "absent": False,
    }
    point["per_class"]["nv"] = {
        "precision": 2 / 3,
        "recall": 1.0,
        "f1": 0.8,
        "auroc": 0.875,
        "support": 2,
        "absent": False,
    }
    return {
        "point": point,
        "ci95": {"balanced_accuracy": [0.5, 1.0], "mel": {"sensitivity_argmax": [0.0, 1.0]}},
        "n_boot": 200,
        "bootstrap_unit": "lesion",
        "mel_threshold": None,
        "domain": {
            "mean_max_probability": 0.8,
            "share_below_threshold": 0.25,
            "confidence_threshold": 0.6,
            "reference": {"mean_max_probability": 0.9, "share_below_threshold": 0.1},
        },
    }


def test_render_markdown_with_absent_classes() -> None:
    md = render_markdown(_hand_result(), "External evaluation: x.csv")
    lines = md.splitlines()
    assert lines[0] == "# External evaluation: x.csv"
    assert "n = 4 images; classes present: mel, nv; absent: akiec, bcc, bkl, df, vasc" in md
    assert "bootstrap over lesions (200 resamples)" in md
    assert "| balanced accuracy (%) | 75.0 [50.0, 100.0] |" in lines
    assert "| macro F1 | 0.733 |" in lines  # no interval given: none printed
    assert "| melanoma sensitivity, argmax (%) | 50.0 [0.0, 100.0] |" in lines
    assert "| melanoma sensitivity at threshold (%) | absent |" in lines
    for c in ("akiec", "bcc", "bkl", "df", "vasc"):
        assert f"| {c} | 0 | absent | absent | absent | absent |" in lines
    assert "| mel | 2 | 1.000 | 0.500 | 0.667 | 0.875 |" in lines
    assert "| nv | 2 | 0.667 | 1.000 | 0.800 | 0.875 |" in lines
    assert "Melanoma threshold" not in md and "| calibration |" not in md
    assert "25.0% of images below confidence 0.600" in md
    assert "Out-of-fold reference: 0.900 and 10.0%." in md
    assert md.endswith("\n")


def test_share_predicted_as_absent_classes_is_shown_only_when_classes_are_absent() -> None:
    result = _hand_result()
    result["point"]["predicted_absent"] = 0.25
    result["ci95"]["predicted_absent"] = [0.0, 0.5]
    lines = render_markdown(result, "t").splitlines()
    assert "| predicted as a class these images lack (%) | 25.0 [0.0, 50.0] |" in lines
    result["point"]["classes_absent"] = []
    assert "predicted as a class" not in render_markdown(result, "t")


def test_render_markdown_from_computed_metrics() -> None:
    """The renderer accepts what ``evaluate_predictions`` returns, absent classes included."""
    rng = np.random.default_rng(0)
    mel, nv = CLASSES.index("mel"), CLASSES.index("nv")
    y = np.array([mel] * 10 + [nv] * 30)
    probs = rng.dirichlet(np.ones(len(CLASSES)), size=len(y))
    probs[np.arange(len(y)), y] += 2.0
    probs /= probs.sum(1, keepdims=True)
    result = evaluate_predictions(y, probs, classes=CLASSES, mel_threshold=0.3, n_boot=50)
    result["mel_threshold"] = 0.3
    md = render_markdown(result, "t")
    assert "absent: akiec, bcc, bkl, df, vasc" in md
    assert "| vasc | 0 | absent | absent | absent | absent |" in md
    assert "| mel | 10 |" in md and "| nv | 30 |" in md
    assert "Melanoma threshold p(mel) >= 0.3000" in md
    assert "absent" not in md.split("| class |")[0].split("| metric |")[1]


def test_per_source_figures_known_values() -> None:
    """Source b has bkl, mel and nv only: its balanced accuracy averages those 3 recalls (the
    argmax of the full softmax, so a prediction of another class counts as wrong), and its
    AUROCs are over its own images."""
    classes = list(CLASSES)
    bkl, mel, nv, bcc = (classes.index(c) for c in ("bkl", "mel", "nv", "bcc"))
    rows = [  # (source, true class, class given most probability, its p(mel))
        ("a", bcc, bcc, 0.1),
        ("a", mel, mel, 0.6),
        ("a", mel, nv, 0.3),
        ("b", mel, mel, 0.7),
        ("b", mel, bcc, 0.4),  # wrong: a class b does not have
        ("b", nv, nv, 0.2),
        ("b", nv, nv, 0.1),
        ("b", bkl, mel, 0.5),
    ]
    probs = np.full((len(rows), 7), 0.02)
    for i, (_, _, top, p_mel) in enumerate(rows):
        probs[i, mel] = p_mel
        probs[i, top] = max(probs[i, top], 0.85 - p_mel if top != mel else p_mel)
    probs /= probs.sum(1, keepdims=True)
    sources = np.array([r[0] for r in rows])
    y = np.array([r[1] for r in rows])
    assert (probs.argmax(1) == [r[2] for r in rows]).all()
    figs = per_source_figures(sources, y, probs, classes)
    b = figs["b"]
    assert b["n"] == 5 and b["classes_present"] == ["bkl", "mel", "nv"]
    assert b["balanced_accuracy"] == pytest.approx((0 + 0.5 + 1) / 3)
    keep = sources == "b"
    assert b["mel_auroc"] == pytest.approx(roc_auc_score(y[keep] == mel, probs[keep, mel]))
    assert set(b["per_class"]) == {"bkl", "mel", "nv"}
    assert b["per_class"]["mel"]["recall"] == pytest.approx(0.5)
    assert figs["a"]["balanced_accuracy"] == pytest.approx((1 + 0.5) / 2)
    assert "nv" not in figs["a"]["per_class"] and figs["a"]["per_class"]["bcc"]["auroc"] == 1.0


def test_folds_that_predict_other_classes_are_refused(tmp_path: Path) -> None:
    for fold, classes in enumerate((("mel", "nv"), ("bkl", "mel", "nv"))):
        keys = pd.DataFrame(
            {"image_id": [f"f{fold}_{i}" for i in range(4)], "lesion_id": "L", "dx": "mel"}
        ).assign(fold=fold)
        probs = np.full((4, len(classes)), 1 / len(classes))
        (tmp_path / f"fold_{fold}").mkdir()
        path = tmp_path / f"fold_{fold}" / "val_predictions.csv"
        write_predictions(labelled_predictions(keys, probs, classes), path)
    with pytest.raises(DataError, match="folds predict other classes"):
        collect_oof(tmp_path)

"""Paired lesion-bootstrap comparison of two runs (``skinlesion compare``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from skinlesion.cli import main
from skinlesion.core.errors import DataError
from skinlesion.core.labels import CLASSES
from skinlesion.evaluation.metrics import point_metrics
from skinlesion.evaluation.paired import compare_runs, paired_bootstrap

K = len(CLASSES)


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(K), 12)
    groups = (np.arange(len(y)) // 2).astype(str)  # two images per lesion
    noisy = rng.dirichlet(np.ones(K), size=len(y))
    noisy[np.arange(len(y)), y] += 0.3
    noisy /= noisy.sum(1, keepdims=True)
    good = np.eye(K)[y] * 0.9 + 0.1 / K
    return y, groups, noisy, good


def _run(folder: Path, y: np.ndarray, groups: np.ndarray, probs: np.ndarray) -> Path:
    oof = pd.DataFrame(
        {
            "image_id": [f"ISIC_{i:07d}" for i in range(len(y))],
            "lesion_id": groups,
            "dx": [CLASSES[i] for i in y],
            "fold": np.arange(len(y)) % 3,
        }
    )
    for i, c in enumerate(CLASSES):
        oof[c] = probs[:, i]
    oof["prediction"] = [CLASSES[i] for i in probs.argmax(1)]
    for i, c in enumerate(CLASSES):
        oof[f"raw_{c}"] = probs[:, i]
    folder.mkdir(parents=True)
    oof.to_csv(folder / "oof_predictions.csv", index=False)
    return folder


def test_difference_is_b_minus_a_with_an_interval_around_it() -> None:
    y, groups, noisy, good = _data()
    result = paired_bootstrap(y, noisy, good, groups, n_boot=200, seed=0, classes=CLASSES)
    a, b = point_metrics(y, noisy, classes=CLASSES), point_metrics(y, good, classes=CLASSES)
    r = result["balanced_accuracy"]
    assert r["a"] == pytest.approx(a["balanced_accuracy"])
    assert r["b"] == pytest.approx(b["balanced_accuracy"]) == pytest.approx(1.0)
    assert r["difference"] == pytest.approx(b["balanced_accuracy"] - a["balanced_accuracy"])
    assert 0 < r["ci95"][0] <= r["difference"] <= r["ci95"][1]
    same = paired_bootstrap(y, noisy, noisy.copy(), groups, n_boot=50, seed=0, classes=CLASSES)
    assert same["macro_auroc"]["difference"] == 0.0 and same["macro_auroc"]["ci95"] == [0.0, 0.0]


def test_compare_cli_prints_the_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    y, groups, noisy, good = _data()
    a = _run(tmp_path / "a", y, groups, noisy)
    b = _run(tmp_path / "b", y, groups, good)
    out = tmp_path / "cmp.json"
    assert main(["compare", str(a), str(b), "--n-boot", "50", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| metric | A | B | B - A [95% CI] |" in text
    row = next(line for line in text.splitlines() if line.startswith("| balanced_accuracy "))
    saved = json.loads(out.read_text())
    assert saved["n_images"] == len(y) and saved["n_lesions"] == len(y) // 2
    assert f"{saved['metrics']['balanced_accuracy']['difference']:+.3f}" in row


def test_runs_on_other_folds_are_refused(tmp_path: Path) -> None:
    y, groups, noisy, good = _data()
    a = _run(tmp_path / "a", y, groups, noisy)
    b = _run(tmp_path / "b", y, groups, good)
    oof = pd.read_csv(b / "oof_predictions.csv")
    oof["fold"] = (oof["fold"] + 1) % 3
    oof.drop(index=0).to_csv(b / "oof_predictions.csv", index=False)
    with pytest.raises(DataError) as err:
        compare_runs(a, b, n_boot=0)
    text = str(err.value) + " ".join(getattr(err.value, "problems", []))
    assert "another fold" in text and "one run only" in text
    assert main(["compare", str(a), str(tmp_path / "missing")]) == 2


def _evaluation(
    folder: Path, y: np.ndarray, probs: np.ndarray, lesions: bool, familiar: bool = False
) -> Path:
    """An ``evaluate`` output folder: predictions.csv over the 7 classes, 3 of them present;
    ``familiar``: of a model with a familiarity, whose table ends with ``unfamiliarity``."""
    pred = pd.DataFrame({"image_id": [f"ISIC_{i:07d}" for i in range(len(y))]})
    if lesions:
        pred["lesion_id"] = [f"L{i // 2}" for i in range(len(y))]
    pred["dx"] = [CLASSES[i] for i in y]
    for i, c in enumerate(CLASSES):
        pred[c] = probs[:, i]
    pred["prediction"] = [CLASSES[i] for i in probs.argmax(1)]
    if familiar:
        pred["unfamiliarity"] = np.linspace(0.1, 2.0, len(y))
    folder.mkdir(parents=True)
    pred.to_csv(folder / "predictions.csv", index=False)
    return folder


@pytest.mark.parametrize("lesions", [False, True])
def test_two_evaluations_of_one_set_are_compared(
    tmp_path: Path, capsys: pytest.CaptureFixture, lesions: bool
) -> None:
    y, _, noisy, good = _data()
    keep = np.isin(y, [CLASSES.index(c) for c in ("bkl", "mel", "nv")])  # ISIC 2017's classes
    y, noisy, good = y[keep], noisy[keep], good[keep]
    a = _evaluation(tmp_path / "a", y, noisy, lesions)
    # B's model has a familiarity (its table ends with ``unfamiliarity``), A's has none.
    b = _evaluation(tmp_path / "b", y, good, lesions, familiar=True)
    result = compare_runs(a, b, n_boot=50)
    assert result["kind"] == "evaluation"
    assert result["n_images"] == len(y)
    assert result["n_lesions"] == (len(y) // 2 if lesions else len(y))
    expected = paired_bootstrap(
        y,
        noisy,
        good,
        pd.read_csv(a / "predictions.csv")["lesion_id"].astype(str).to_numpy()
        if lesions
        else np.array([f"ISIC_{i:07d}" for i in range(len(y))]),
        n_boot=50,
        classes=CLASSES,
    )
    assert result["metrics"] == expected
    # Melanoma AUROC is among the paired figures, and equals the point metric.
    assert result["metrics"]["mel_auroc"]["a"] == pytest.approx(
        point_metrics(y, noisy, classes=CLASSES)["per_class"]["mel"]["auroc"]
    )
    assert main(["compare", str(a), str(b), "--n-boot", "20"]) == 0
    assert "same labelled images" in capsys.readouterr().out


def test_a_run_and_an_evaluation_are_not_compared(tmp_path: Path) -> None:
    y, groups, noisy, _ = _data()
    run = _run(tmp_path / "run", y, groups, noisy)
    evaluation = _evaluation(tmp_path / "eval", y, noisy, lesions=True)
    with pytest.raises(DataError) as err:
        compare_runs(run, evaluation, n_boot=0)
    assert (
        "a training run's out-of-fold predictions cannot be compared with an evaluation's"
        in " ".join(err.value.problems)
    )
    with pytest.raises(DataError, match="no predictions"):
        compare_runs(run, tmp_path, n_boot=0)


def test_melanoma_sensitivity_at_95_specificity_is_a_point_of_the_roc() -> None:
    from skinlesion.evaluation.paired import sensitivity_at_specificity

    mel = CLASSES.index("mel")
    # 20 other lesions with p(mel) 0.00..0.19 and 4 melanomas with 0.185, 0.30, 0.05, 0.50:
    # 95% specificity (19 of 20 below) needs a threshold above 0.18, so 3 of 4 are found.
    p_other = np.arange(20) / 100
    p_mel = np.array([0.185, 0.30, 0.05, 0.50])
    scores = np.r_[p_other, p_mel]
    probs = np.full((24, K), 0.0)
    probs[:, mel] = scores
    probs[:, CLASSES.index("nv")] = 1 - scores
    y = np.r_[np.full(20, CLASSES.index("nv")), np.full(4, mel)]
    assert sensitivity_at_specificity(y, probs, classes=CLASSES) == pytest.approx(0.75)
    assert sensitivity_at_specificity(y, probs, classes=CLASSES, specificity=1.0) == pytest.approx(
        0.5
    )
    assert sensitivity_at_specificity(y, probs, classes=CLASSES, specificity=0.90) == pytest.approx(
        0.75
    )
    assert sensitivity_at_specificity(y, probs, classes=CLASSES, specificity=0.25) == pytest.approx(
        1.0
    )
    assert sensitivity_at_specificity(y[:20], probs[:20], classes=CLASSES) is None  # no melanoma
    y2, groups, noisy, good = _data()
    result = paired_bootstrap(y2, noisy, good, groups, n_boot=50, seed=0, classes=CLASSES)
    assert result["mel_sensitivity_at_spec95"]["b"] == pytest.approx(1.0)


def test_share_predicted_as_absent_classes_is_paired_only_when_classes_are_absent() -> None:
    from skinlesion.evaluation.paired import scalar_metrics

    y = np.array([CLASSES.index("mel"), CLASSES.index("nv")] * 4)
    probs = np.full((8, K), 0.05)
    probs[:4, CLASSES.index("bcc")] = 0.7  # half predicted bcc, a class these images lack
    probs[np.arange(4, 8), y[4:]] = 0.7
    assert scalar_metrics(y, probs, classes=CLASSES)["predicted_absent"] == pytest.approx(0.5)
    y_all = np.arange(K)
    assert "predicted_absent" not in scalar_metrics(y_all, np.eye(K), classes=CLASSES)

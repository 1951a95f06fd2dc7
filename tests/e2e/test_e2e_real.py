"""End to end through the real entry points on the real HAM10000 copy (skips when absent)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, log_loss

from skinlesion.cli import main
from skinlesion.core.labels import CLASSES
from skinlesion.models.checkpoint import load_checkpoint

REPO = Path(__file__).parents[2]


@pytest.mark.slow
def test_quick_recipe_on_real_data(ham_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "quick"
    assert (
        main(
            [
                "train",
                "--config",
                str(REPO / "configs" / "quick.yaml"),
                "--no-progress",
                f"data.root={ham_dir}",
                f"data.cache_dir={tmp_path / 'cache'}",
                f"output_dir={out}",
            ]
        )
        == 0
    )
    folds = pd.read_csv(out / "folds.csv")
    assert folds.groupby("lesion_id")["fold"].nunique().max() == 1
    for fold in (0, 1):
        metrics = pd.read_csv(out / f"fold_{fold}" / "metrics.csv")
        ckpt = load_checkpoint(out / f"fold_{fold}" / "best.pt")
        assert ckpt["epoch"] == int(metrics.loc[metrics["val_loss"].idxmin(), "epoch"])
    oof = pd.read_csv(out / "oof_predictions.csv")
    assert sorted(oof["image_id"]) == sorted(folds[folds["fold"].isin([0, 1])]["image_id"])
    y = oof["dx"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    p = oof[list(CLASSES)].to_numpy()
    saved = json.loads((out / "oof_metrics.json").read_text())["point"]
    assert saved["balanced_accuracy"] == pytest.approx(
        balanced_accuracy_score(y, p.argmax(1)), abs=1e-6
    )
    present = sorted(set(y.tolist()))
    assert saved["macro_f1"] == pytest.approx(
        f1_score(y, p.argmax(1), average="macro", labels=present), abs=1e-6
    )
    assert saved["log_loss"] == pytest.approx(log_loss(y, p, labels=list(range(7))), abs=1e-6)
    # What users get from fold 0's model is what the run reported for its validation images:
    # same preprocessing, views and temperature (a like-for-like check that holds on any CPU,
    # where a floor on the accuracy of a few CPU minutes of training would not).
    val = pd.read_csv(out / "fold_0" / "val_predictions.csv").head(16)
    paths = {p.stem: p for p in ham_dir.rglob("*.jpg")}
    fold_csv = tmp_path / "fold0.csv"
    argv = ["predict", "--model", str(out / "fold_0" / "best.pt")]
    argv += [*(str(paths[i]) for i in val["image_id"]), "--output", str(fold_csv), "--no-progress"]
    assert main(argv) == 0
    np.testing.assert_allclose(
        pd.read_csv(fold_csv)[list(CLASSES)].to_numpy(), val[list(CLASSES)].to_numpy(), atol=1e-5
    )
    images = sorted((ham_dir / "HAM10000_images_part_1").glob("*.jpg"))[:4]
    csv = tmp_path / "preds.csv"
    assert (
        main(
            [
                "predict",
                "--model",
                str(out),
                *map(str, images),
                "--output",
                str(csv),
                "--no-progress",
            ]
        )
        == 0
    )
    preds = pd.read_csv(csv)
    np.testing.assert_allclose(preds[list(CLASSES)].sum(axis=1), 1.0, atol=1e-5)

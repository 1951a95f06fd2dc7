"""configs/isic2017_quick.yaml at toy size on the real ISIC 2017 copy (skips when absent): the
generic CSV format trains on train+val, warns that it has no groups, and predict writes
exactly the 3 probability columns."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ISIC_DIR, real_data_dir

from skinlesion.cli import main
from skinlesion.inference.table import table_columns

REPO = Path(__file__).parents[2]
ISIC_CLASSES = ["bkl", "mel", "nv"]


@pytest.fixture
def isic_dir() -> Path:
    return real_data_dir(ISIC_DIR, ISIC_DIR / "labels.csv", "ISIC 2017")


@pytest.mark.slow
def test_isic2017_quick_recipe_at_toy_size(
    isic_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "isic"
    toy = [
        f"data.images={isic_dir / 'images'}",
        f"data.labels={isic_dir / 'labels.csv'}",
        "data.image_size=32",
        "data.max_images=40",
        f"data.cache_dir={tmp_path / 'cache'}",
        "cv.n_folds=2",
        "cv.folds_to_run=[0]",
        "model.pretrained=false",
        "train.epochs=1",
        "train.steps_per_epoch=2",
        "train.batch_size=8",
        "train.num_threads=2",
        "eval.n_boot=10",
        f"output_dir={out}",
    ]
    config = str(REPO / "configs" / "isic2017_quick.yaml")
    with caplog.at_level(logging.WARNING):
        assert main(["train", "--config", config, "--no-progress", *toy]) == 0
    assert "LEAKAGE CANNOT BE RULED OUT" in caplog.text
    labels = pd.read_csv(isic_dir / "labels.csv", dtype=str)
    folds = pd.read_csv(out / "folds.csv", dtype=str)
    train_ids = set(labels.loc[labels["split"].isin(["train", "val"]), "image_id"])
    assert set(folds["image_id"]) <= train_ids  # the test split stays out
    assert json.loads((out / "dataset.json").read_text())["classes"] == ISIC_CLASSES
    assert "leakage cannot be ruled out" in (out / "report.md").read_text()
    test_ids = labels.loc[labels["split"] == "test", "image_id"].head(3)
    images = [str(isic_dir / "images" / f"{i}.jpg") for i in test_ids]
    csv = tmp_path / "preds.csv"
    assert main(["predict", "--model", str(out), *images, "--output", str(csv)]) == 0
    preds = pd.read_csv(csv)
    assert list(preds.columns) == table_columns(ISIC_CLASSES)
    np.testing.assert_allclose(preds[ISIC_CLASSES].sum(axis=1), 1.0, atol=1e-5)

"""A run on a generic labelled set (``data.format: csv``) through the real entry points: the
data's class list reaches the checkpoints, predictions, reports and evaluation, and a set
without a group column is flagged for possible leakage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import FINETUNE, train_cli
from PIL import Image

from skinlesion.cli import main
from skinlesion.models.checkpoint import load_checkpoint

CLASSES3 = ("bcc", "nv", "vasc")  # no mel: the melanoma figures must be left out


def _labelled_set(root: Path, per_class: int = 6) -> tuple[Path, Path]:
    """Tinted noise images (one tint a class) and a labels file without a group column."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    rows = []
    for c, dx in enumerate(CLASSES3):
        for i in range(per_class):
            img = rng.integers(0, 80, (24, 32, 3), dtype=np.uint8)
            img[..., c] += 150
            name = f"{dx}{i}"
            Image.fromarray(img).save(root / "images" / f"{name}.png")
            rows.append({"name": name, "diagnosis": dx, "split": "test" if i == 0 else "train"})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root / "images", root / "labels.csv"


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("csvset")
    images, labels = _labelled_set(root)
    out = root / "run"
    overrides = {
        **FINETUNE,
        "data.format": "csv",
        "data.images": images,
        "data.labels": labels,
        "data.columns": "{image: name, label: diagnosis}",
        "data.where": "{split: [train]}",
        "data.cache_dir": root / "cache",
        "cv.folds_to_run": "[0]",
        "train.epochs": 1,
        "output_dir": out,
    }
    assert train_cli([f"{k}={v}" for k, v in overrides.items()]) == 0
    return out, images, labels


def test_run_carries_the_data_classes(csv_run: tuple[Path, Path, Path]) -> None:
    out, _, _ = csv_run
    ckpt = load_checkpoint(out / "fold_0" / "best.pt")
    assert tuple(ckpt["class_names"]) == CLASSES3
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["classes"] == list(CLASSES3) and dataset["grouped"] is False
    assert dataset["n_images"] == 15  # the test split left out
    oof = pd.read_csv(out / "oof_predictions.csv")
    assert [c for c in CLASSES3 if c in oof.columns] == list(CLASSES3)
    np.testing.assert_allclose(oof[list(CLASSES3)].sum(axis=1), 1.0, atol=1e-5)


def test_no_group_column_is_flagged_in_log_and_report(csv_run: tuple[Path, Path, Path]) -> None:
    out, _, _ = csv_run
    assert "LEAKAGE CANNOT BE RULED OUT" in (out / "train.log").read_text()
    report = (out / "report.md").read_text()
    assert "leakage cannot be ruled out" in report
    assert "melanoma" not in report.lower().replace("no melanoma", "")
    metrics = json.loads((out / "oof_metrics.json").read_text())
    assert metrics["mel_threshold"] is None and metrics["bootstrap_unit"] == "image"
    assert list(metrics["point"]["per_class"]) == list(CLASSES3)


def test_predict_and_evaluate_use_the_spec_names(
    csv_run: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    out, images, labels = csv_run
    preds = tmp_path / "preds.csv"
    pngs = sorted(images.glob("*0.png"))
    assert main(["predict", "--model", str(out), *map(str, pngs), "--output", str(preds)]) == 0
    df = pd.read_csv(preds)
    probs = [c for c in df.columns if c in CLASSES3 or c in ("mel", "akiec")]
    assert probs == list(CLASSES3)
    # The evaluate labels file uses the canonical column names.
    table = pd.read_csv(labels).rename(columns={"name": "image_id", "diagnosis": "dx"})
    table.to_csv(tmp_path / "labels.csv", index=False)
    args = ["evaluate", "--model", str(out), "--labels", str(tmp_path / "labels.csv")]
    args += ["--images", str(images), "--output", str(tmp_path / "ev"), "--where", "split=test"]
    assert main([*args, "--n-boot", "10", "--no-progress"]) == 0
    result = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert result["n"] == 3 and list(result["point"]["per_class"]) == list(CLASSES3)

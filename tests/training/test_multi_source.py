"""A run of two sources through the real entry point (synthetic HAM10000 + a 3-class csv set, 1
epoch at 32 px): the sources reach folds.csv, the predictions, the report and the model card's
data line, and the model's classes are the union of theirs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from conftest import FINETUNE, make_csv_source, train_cli

from skinlesion.cli import main
from skinlesion.core.labels import CLASSES
from skinlesion.models.checkpoint import load_checkpoint

EXT = {"bkl": 6, "mel": 6, "nv": 8}


@pytest.fixture(scope="module")
def sources_run(tmp_path_factory: pytest.TempPathFactory, syn_root: Path) -> Path:
    root = tmp_path_factory.mktemp("sources_run")
    images, labels = make_csv_source(root / "ext", EXT)
    sources = (
        f"[{{name: ham, format: ham10000, root: {syn_root}}}, "
        f"{{name: ext, format: csv, images: {images}, labels: {labels}, "
        f"where: {{split: [train]}}}}]"
    )
    overrides = {
        **FINETUNE,
        "data.sources": sources,
        "data.cache_dir": root / "cache",
        "cv.folds_to_run": "[0]",
        "train.epochs": 1,
        "output_dir": root / "run",
    }
    assert train_cli([f"{k}={v}" for k, v in overrides.items()]) == 0
    return root / "run"


def test_folds_and_predictions_carry_the_source(sources_run: Path) -> None:
    folds = pd.read_csv(sources_run / "folds.csv", dtype=str)
    assert list(folds.columns) == ["image_id", "lesion_id", "dx", "fold", "source"]
    assert set(folds["source"]) == {"ham", "ext"}
    assert (folds["lesion_id"].str.split(":").str[0] == folds["source"]).all()
    assert not folds["image_id"].str.endswith(("bkl5", "mel5", "nv7")).any()  # test split
    for name in ("fold_0/val_predictions.csv", "oof_predictions.csv"):
        preds = pd.read_csv(sources_run / name, dtype={"image_id": str})
        assert list(preds.columns[:5]) == ["image_id", "lesion_id", "dx", "source", "fold"]
        assert list(preds.columns[5:12]) == list(CLASSES)  # the full softmax over the union
        assert set(preds["source"]) == {"ham", "ext"}
        merged = preds.merge(folds, on="image_id", suffixes=("", "_folds"))
        assert (merged["source"] == merged["source_folds"]).all()


def test_model_classes_are_the_union(sources_run: Path) -> None:
    ckpt = load_checkpoint(sources_run / "fold_0" / "best.pt")
    assert tuple(ckpt["class_names"]) == CLASSES
    dataset = json.loads((sources_run / "dataset.json").read_text())
    assert dataset["format"] == "sources"
    spaces = {s["name"]: s["classes"] for s in dataset["sources"]}
    assert spaces == {"ham": list(CLASSES), "ext": ["bkl", "mel", "nv"]}
    metrics = pd.read_csv(sources_run / "fold_0" / "metrics.csv")
    assert all(math.isfinite(v) for v in metrics["val_loss"])
    log = (sources_run / "train.log").read_text()
    assert "data.sources[1] (ext)" in log and "LEAKAGE CANNOT BE RULED OUT" in log


def test_report_has_per_source_figures(sources_run: Path) -> None:
    metrics = json.loads((sources_run / "oof_metrics.json").read_text())
    per_source = metrics["per_source"]
    assert set(per_source) == {"ham", "ext"}
    ext = per_source["ext"]
    assert ext["classes_present"] == ["bkl", "mel", "nv"] and set(ext["per_class"]) == set(EXT)
    assert 0 <= ext["balanced_accuracy"] <= 1
    assert ext["mel_auroc"] == ext["per_class"]["mel"]["auroc"]
    oof = pd.read_csv(sources_run / "oof_predictions.csv")
    assert ext["n"] == (oof["source"] == "ext").sum()
    report = (sources_run / "report.md").read_text()
    assert "Per source" in report
    assert any(line.startswith("| ext | ") for line in report.splitlines())
    assert any(line.startswith("| ham | ") for line in report.splitlines())


def test_model_card_names_the_sources(sources_run: Path, tmp_path: Path) -> None:
    assert (
        main(["package", str(sources_run), "--name", "two-sources", "--out-root", str(tmp_path)])
        == 0
    )
    card = json.loads((tmp_path / "two-sources" / "card.json").read_text())
    data = card["training_data"]
    assert data.startswith("2 sources: ham (ham10000 set ")
    assert "ext (csv set " in data and "classes akiec, bcc, bkl, df, mel, nv, vasc" in data


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "data.sources[1] (ext): images: {missing} is not a folder"),
        (["train.scheme=linear_probe"], "train.scheme=linear_probe does not take data.sources"),
        (["data.root=x"], "data.root: describes one labelled set"),
    ],
)
def test_faults_fail_before_any_work(
    syn_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    missing = tmp_path / "missing"
    sources = (
        f"data.sources=[{{name: ham, format: ham10000, root: {syn_root}}}, "
        f"{{name: ext, format: csv, images: {missing}, labels: {tmp_path / 'l.csv'}}}]"
    )
    args = [sources, f"output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'c'}", *extra]
    assert train_cli(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("skinlesion train: error: ") == 1
    assert message.format(missing=missing) in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("{split: [trian]}", "no row has split 'trian'; did you mean train?"),
        ("{spilt: [train]}", "no column 'spilt'; did you mean split?"),
    ],
)
def test_a_where_typo_fails_with_its_close_match_before_any_folder(
    syn_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str, message: str
) -> None:
    images, labels = make_csv_source(tmp_path / "ext", EXT)
    sources = (
        f"data.sources=[{{name: ham, format: ham10000, root: {syn_root}}}, "
        f"{{name: ext, format: csv, images: {images}, labels: {labels}, where: {where}}}]"
    )
    args = [sources, f"output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'c'}"]
    assert train_cli([*args, *(f"{k}={v}" for k, v in FINETUNE.items())]) == 2
    err = capsys.readouterr().err
    assert message in err and "set data.columns" not in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "c").exists()

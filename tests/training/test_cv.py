"""Training through the real entry points on a small synthetic HAM10000 folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import FINETUNE, crash_on_call, run_overrides, train_cli

from skinlesion.cli import main
from skinlesion.core.config import load_config
from skinlesion.core.labels import CLASSES
from skinlesion.inference.table import table_columns
from skinlesion.models.checkpoint import load_checkpoint
from skinlesion.training.run_data import load_run_data


def tiny_overrides(root: Path, out: Path, cache: Path, **extra: str) -> list[str]:
    return run_overrides(FINETUNE, root, out, cache, **extra)


def test_train_writes_self_describing_run(syn_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert train_cli(tiny_overrides(syn_root, out, tmp_path / "cache")) == 0
    for name in (
        "config.yaml",
        "folds.csv",
        "environment.json",
        "train.log",
        "oof_predictions.csv",
        "oof_metrics.json",
        "report.md",
    ):
        assert (out / name).is_file(), name
    folds = pd.read_csv(out / "folds.csv")
    assert list(folds.columns) == ["image_id", "lesion_id", "dx", "fold"]
    assert folds.groupby("lesion_id")["fold"].nunique().max() == 1
    oof = pd.read_csv(out / "oof_predictions.csv")
    assert sorted(oof["image_id"]) == sorted(folds["image_id"])  # every image exactly once
    np.testing.assert_allclose(oof[list(CLASSES)].sum(axis=1), 1.0, atol=1e-6)
    for fold in (0, 1):
        metrics = pd.read_csv(out / f"fold_{fold}" / "metrics.csv")
        assert {
            "epoch",
            "train_loss",
            "val_loss",
            "val_balanced_accuracy",
            "val_macro_f1",
            "lr",
            "seconds",
        } <= set(metrics.columns)
        assert metrics["epoch"].tolist() == [1, 2, 3]
        raw = torch.load(out / f"fold_{fold}" / "best.pt", weights_only=True)
        ckpt = load_checkpoint(out / f"fold_{fold}" / "best.pt")
        assert raw["epoch"] == ckpt["epoch"]
        best = int(metrics.loc[metrics["val_loss"].idxmin(), "epoch"])
        assert ckpt["epoch"] == best
        assert ckpt["metrics"]["val_loss"] == pytest.approx(metrics["val_loss"].min())
        assert ckpt["class_names"] == list(CLASSES)
        assert ckpt["preprocessing"]["size"] == 32
        assert ckpt["fold"] == fold and ckpt["temperature"] > 0
        assert ckpt["config"]["train"]["epochs"] == 3


def test_predict_ensemble_and_bad_file(syn_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert (
        train_cli(
            tiny_overrides(
                syn_root,
                out,
                tmp_path / "cache",
                **{"cv.folds_to_run": "[0]", "train.epochs": "1", "eval.tta": "2"},
            )
        )
        == 0
    )
    images = sorted(syn_root.glob("HAM10000_images_part_1/*.jpg"))[:3]
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    png = tmp_path / "gray.png"
    from PIL import Image

    Image.open(images[0]).convert("L").save(png)
    csv = tmp_path / "preds.csv"
    args = [
        "predict",
        "--model",
        str(out),
        *map(str, images),
        str(bad),
        str(png),
        "--output",
        str(csv),
        "--no-progress",
        "--tta",
        "2",
    ]
    assert main(args) == 1  # one file failed, the others were still predicted
    df = pd.read_csv(csv, keep_default_na=False)
    assert list(df.columns) == table_columns(CLASSES)
    good = df[df["error"] == ""]
    assert len(good) == 4
    np.testing.assert_allclose(good[list(CLASSES)].astype(float).sum(axis=1), 1.0, atol=1e-5)
    assert set(good["prediction"]) <= set(CLASSES)
    failed = df[df["error"] != ""]
    assert failed["image"].tolist() == [str(bad)] and "notes.jpg" in failed["error"].iloc[0]


def test_resume_after_interruption_matches_uninterrupted(
    syn_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    extra = {"cv.folds_to_run": "[0]", "eval.calibrate": "false"}
    full = tmp_path / "full"
    assert train_cli(tiny_overrides(syn_root, full, cache, **extra)) == 0

    crashed = tmp_path / "crashed"
    undo = crash_on_call(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train_cli(tiny_overrides(syn_root, crashed, cache, **extra))
    undo()
    assert pd.read_csv(crashed / "fold_0" / "metrics.csv")["epoch"].tolist() == [1, 2]
    # Without --resume the folder is protected.
    assert train_cli(tiny_overrides(syn_root, crashed, cache, **extra)) == 2
    assert train_cli(["--resume", *tiny_overrides(syn_root, crashed, cache, **extra)]) == 0
    a = pd.read_csv(full / "fold_0" / "metrics.csv")
    b = pd.read_csv(crashed / "fold_0" / "metrics.csv")
    assert b["epoch"].tolist() == [1, 2, 3]
    cols = ["train_loss", "val_loss", "val_balanced_accuracy"]
    np.testing.assert_allclose(a[cols].to_numpy(), b[cols].to_numpy(), rtol=1e-4, atol=1e-5)


def test_resume_refuses_changed_training_keys_before_any_work(
    syn_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    args = tiny_overrides(
        syn_root, out, tmp_path / "cache", **{"cv.folds_to_run": "[0]", "train.epochs": "1"}
    )
    assert train_cli(args) == 0
    kept = {p: p.read_bytes() for p in (out / "config.yaml", out / "train.log")}
    capsys.readouterr()
    assert train_cli(["--resume", *args, "train.lr=0.001"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "train.lr: 0.0003 -> 0.001" in err and str(out) in err
    assert train_cli(["--resume", *args, "loss.gamma=0.5", "train.epochs=2"]) == 2
    err = capsys.readouterr().err
    assert "train.epochs: 1 -> 2" in err and "loss.gamma: 2.0 -> 0.5" in err
    # Refused before the log or the saved config were touched.
    assert all(p.read_bytes() == data for p, data in kept.items())


def test_resume_accepts_machine_settings_and_more_folds(syn_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = tiny_overrides(
        syn_root, out, tmp_path / "cache", **{"cv.folds_to_run": "[0]", "train.epochs": "1"}
    )
    assert train_cli(args) == 0
    fold0 = (out / "fold_0" / "best.pt").read_bytes()
    moved = [f"data.cache_dir={tmp_path / 'cache2'}", "train.num_threads=1", "train.device=cpu"]
    assert train_cli(["--resume", *args, *moved, "cv.folds_to_run=[1]"]) == 0
    saved = load_config(out / "config.yaml")
    assert saved.cv.folds_to_run == [0, 1]  # the folder holds both parts' folds
    assert saved.train.num_threads == 1 and saved.data.cache_dir == str(tmp_path / "cache2")
    assert (out / "fold_1" / "summary.json").is_file()
    assert (out / "fold_0" / "best.pt").read_bytes() == fold0


def test_bad_config_key_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    assert train_cli(["train.lrr=0.1"]) == 2
    assert "train.lrr" in capsys.readouterr().err


def test_folds_file_is_used(syn_root: Path, tmp_path: Path) -> None:
    folds_csv = tmp_path / "folds.csv"
    assert (
        main(
            [
                "split",
                "--labels",
                str(syn_root / "HAM10000_metadata.csv"),
                "--folds",
                "3",
                "--seed",
                "7",
                "--out",
                str(folds_csv),
            ]
        )
        == 0
    )
    out = tmp_path / "run"
    args = tiny_overrides(
        syn_root,
        out,
        tmp_path / "cache",
        **{"cv.folds_file": str(folds_csv), "cv.folds_to_run": "[2]", "train.epochs": "1"},
    )
    assert train_cli(args) == 0
    saved = pd.read_csv(out / "folds.csv").sort_values("image_id").reset_index(drop=True)
    given = pd.read_csv(folds_csv).sort_values("image_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(saved, given)
    assert (out / "fold_2" / "best.pt").is_file() and not (out / "fold_0").exists()


def test_config_run_reads_cache_not_jpegs(
    syn_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(None, tiny_overrides(syn_root, tmp_path / "r1", tmp_path / "cache"))
    data = load_run_data(cfg, None, progress=False)
    assert data.images.dtype == np.uint8 and data.images.shape[1:] == (32, 32, 3)
    # Once cached, building the run data again decodes nothing.
    from skinlesion.data import cache as cache_mod

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("decoded a JPEG although the cache exists")

    monkeypatch.setattr(cache_mod, "prepare_image", boom)
    again = load_run_data(cfg, None, progress=False)
    assert np.array_equal(np.asarray(again.images), np.asarray(data.images))


def test_predict_defaults_to_the_runs_tta(syn_root: Path, tmp_path: Path) -> None:
    from skinlesion.core.runtime import resolve_runtime
    from skinlesion.inference.predict import load_ensemble, predict_images

    out = tmp_path / "run"
    args = tiny_overrides(
        syn_root,
        out,
        tmp_path / "cache",
        **{"cv.folds_to_run": "[0]", "train.epochs": "1", "eval.tta": "4"},
    )
    assert train_cli(args) == 0
    runtime = resolve_runtime("cpu")
    members = load_ensemble(out, runtime)
    assert members[0].tta == 4
    images = [str(p) for p in sorted(syn_root.rglob("*.jpg"))[:3]]
    default = predict_images(images, members, runtime, progress=False).probs
    four = predict_images(images, members, runtime, tta=4, progress=False).probs
    one = predict_images(images, members, runtime, tta=1, progress=False).probs
    np.testing.assert_allclose(default, four)
    assert not np.allclose(default, one)


@pytest.mark.parametrize("made", [False, True])
def test_resume_into_a_folder_without_a_run_fails_naming_it(
    syn_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], made: bool
) -> None:
    """A mistyped output_dir with --resume must not start hours of training from scratch."""
    out = tmp_path / "rnus" / "quick"
    if made:
        out.mkdir(parents=True)
    args = tiny_overrides(syn_root, out, tmp_path / "cache")
    assert train_cli(["--resume", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"output_dir: {out} " in err and "drop --resume" in err
    assert ("holds no run" if made else "does not exist") in err
    assert out.exists() == made and not (tmp_path / "cache").exists()

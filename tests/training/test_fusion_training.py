"""Training, predicting and evaluating with patient metadata fused into the model."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import FINETUNE, PROBE, check_not_saturated, run_overrides, train_cli

from skinlesion.cli import main
from skinlesion.core.labels import CLASSES
from skinlesion.core.runtime import resolve_runtime
from skinlesion.data.tabular import fit_metadata_spec, missing_vector
from skinlesion.inference.resolve import resolve_model
from skinlesion.models.checkpoint import checkpoint_metadata, load_checkpoint
from skinlesion.publishing.package import package_run
from skinlesion.training.probe import probe_set

META = {"model.metadata": "[age,sex,localization]"}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def syn_root(synthetic_ham: Callable[..., Path]) -> Path:
    return synthetic_ham(6)


@pytest.fixture(scope="module")
def weak_root(synthetic_ham: Callable[..., Path]) -> Path:
    """Lesions that neither the image nor the metadata fix: a linear probe's out-of-fold
    probabilities stay away from 1, so an encoding that differs from training's shows."""
    return synthetic_ham(6, weak_metadata=True, look_noise=0.4)


def _predict(tmp_path: Path, model: Path, images: list[str], *extra: str) -> pd.DataFrame:
    out = tmp_path / f"pred{len(list(tmp_path.glob('pred*')))}.csv"
    args = ["predict", "--no-progress", "--model", str(model), *images, "--output", str(out)]
    assert main([*args, *extra]) == 0
    return pd.read_csv(out)


def _images(root: Path, ids: list[str]) -> list[str]:
    return [str(next(root.rglob(f"{i}.jpg"))) for i in ids]


def test_quick_recipe_with_metadata_finetunes_and_predicts(syn_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = run_overrides(
        {
            **FINETUNE,
            **META,
            "model.metadata_hidden": 16,
            "data.max_images": "null",
            "cv.folds_to_run": "[0]",
            "train.epochs": 2,
            # Uncalibrated, so that the few steps' metadata effect is not flattened away.
            "eval.calibrate": "false",
        },
        syn_root,
        out,
        tmp_path / "cache",
    )
    assert train_cli(["--config", str(REPO / "configs" / "quick.yaml"), *overrides]) == 0
    ckpt = load_checkpoint(out / "fold_0" / "best.pt")
    spec = checkpoint_metadata(ckpt)
    assert spec is not None and spec.fields == ("age", "sex", "localization")
    assert ckpt["metadata"]["hidden"] == 16
    oof = pd.read_csv(out / "oof_predictions.csv")
    assert np.allclose(oof[list(CLASSES)].sum(axis=1), 1, atol=1e-5)
    table = pd.read_csv(syn_root / "HAM10000_metadata.csv")
    ids = table["image_id"].head(6).tolist()
    meta_csv = tmp_path / "meta.csv"
    # One image has no row: it is predicted without metadata.
    table[table["image_id"] != ids[0]][["image_id", "age", "sex", "localization"]].to_csv(
        meta_csv, index=False
    )
    with_meta = _predict(tmp_path, out, _images(syn_root, ids), "--metadata", str(meta_csv))
    without = _predict(tmp_path, out, _images(syn_root, ids))
    for df in (with_meta, without):
        assert np.allclose(df[list(CLASSES)].sum(axis=1), 1, atol=1e-5)
        assert (df["error"].isna()).all()
    p_with, p_without = with_meta[list(CLASSES)].to_numpy(), without[list(CLASSES)].to_numpy()
    assert np.allclose(p_with[0], p_without[0], atol=1e-6)
    assert not np.allclose(p_with[1:], p_without[1:], atol=1e-4)


def test_probe_with_metadata_reproduces_oof_and_evaluates(
    weak_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    syn_root = weak_root
    out = tmp_path / "probe"
    args = run_overrides({**PROBE, **META, "data.image_size": 48}, syn_root, out, tmp_path / "c")
    assert train_cli(args) == 0
    ckpt = load_checkpoint(out / "fold_0" / "best.pt")
    assert ckpt["metadata"]["hidden"] == 0
    oof = pd.read_csv(out / "oof_predictions.csv", dtype={"image_id": str})
    check_not_saturated(oof[list(CLASSES)].to_numpy())
    fold0 = oof[oof["fold"] == 0].head(8)
    table = pd.read_csv(syn_root / "HAM10000_metadata.csv")
    meta_csv = tmp_path / "meta.csv"
    table.to_csv(meta_csv, index=False)
    images = _images(syn_root, fold0["image_id"].tolist())
    ckpt_path = str(out / "fold_0" / "best.pt")
    pred = _predict(tmp_path, Path(ckpt_path), images, "--metadata", str(meta_csv))
    # The head saw [embedding, encoded metadata]: predict encodes the same way.
    assert np.allclose(pred[list(CLASSES)], fold0[list(CLASSES)], atol=1e-4)
    # The whole run (both folds sharing one backbone pass) also predicts with the metadata.
    both = _predict(tmp_path, out, images, "--metadata", str(meta_csv))
    assert np.allclose(both[list(CLASSES)].sum(axis=1), 1, atol=1e-5)
    # A packaged copy (fold 0: two probe members would exceed the 25 MiB limit) carries the
    # member's encoding and predicts as its checkpoint does.
    folder = package_run(out, "fused", out_root=tmp_path / "zoo", folds=[0])
    packaged = resolve_model(folder, resolve_runtime("cpu"))
    assert packaged.uses_metadata
    # Its card says what it takes: a reader of the card alone knows to give metadata.
    card = json.loads((folder / "card.json").read_text())
    assert card["metadata"]["fields"] == ["age", "sex", "localization"]
    assert (
        "Fused with patient metadata (age, sex, localization"
        in (folder / "MODEL_CARD.md").read_text()
    )
    records = table.set_index("image_id").loc[fold0["image_id"]].reset_index()
    again = packaged.predict(images, metadata=records)
    # Packaged weights are float16 (publishing/package.half_precision): on this small untrained
    # backbone that moves probabilities by up to 2.5e-3; a wrong encoding moves them by 1e-1.
    assert np.allclose(again[list(CLASSES)], pred[list(CLASSES)], atol=5e-3)
    # evaluate reads the metadata from the labels file's columns unless told not to.
    part = sorted(syn_root.glob("HAM10000_images_part_1"))[0]
    labels = table[table["image_id"].isin({p.stem for p in part.iterdir()})]
    labels_csv = tmp_path / "labels.csv"
    labels.to_csv(labels_csv, index=False)
    odd = labels.copy()
    odd.loc[odd.index[:2], "localization"] = "mucosa"  # a site no training image had
    odd_csv = tmp_path / "odd.csv"
    odd.to_csv(odd_csv, index=False)
    results = {}
    runs = (
        ("with", labels_csv, []),
        ("without", labels_csv, ["--no-metadata"]),
        ("odd", odd_csv, []),
    )
    for name, csv, flag in runs:
        args = ["evaluate", "--no-progress", "--model", str(out), "--labels", str(csv)]
        args += ["--images", str(part), "--output", str(tmp_path / name), "--n-boot", "0", *flag]
        with caplog.at_level(logging.WARNING, logger="skinlesion"):
            assert main(args) == 0
        results[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert results["with"]["metadata"] == ["age", "sex", "localization"]
    assert results["without"]["metadata"] == []
    assert results["without"]["metadata_unseen"] == {}
    # A value outside the training vocabulary is reported (it encodes as "unknown").
    assert results["odd"]["metadata_unseen"] == {"localization": {"mucosa": 2}}
    assert f"{odd_csv}: metadata the model never saw in training" in caplog.text
    assert "localization 'mucosa' x2" in caplog.text
    with_p = pd.read_csv(tmp_path / "with" / "predictions.csv")[list(CLASSES)].to_numpy()
    without_p = pd.read_csv(tmp_path / "without" / "predictions.csv")[list(CLASSES)].to_numpy()
    assert not np.allclose(with_p, without_p, atol=1e-4)


def test_probe_set_adds_all_missing_copies() -> None:
    from skinlesion.core.config import load_config

    cfg = load_config(None, ["model.metadata=[age,sex]", "model.metadata_drop=0.25"])
    table = pd.DataFrame(
        {
            "row": [0, 1, 2],
            "label": [0, 1, 1],
            "age": [40.0, 60.0, 50.0],
            "sex": ["male", "female", "male"],
        }
    )
    emb = np.arange(6, dtype=np.float64).reshape(3, 2)
    spec = fit_metadata_spec(table.iloc[:2], ("age", "sex"))
    s = probe_set(cfg, emb, table.iloc[:2], table.iloc[2:], 2, spec)
    assert s.x_tr.shape == (4, 2 + spec.dim) and s.x_va.shape == (1, 2 + spec.dim)
    assert s.y_tr.tolist() == [0, 1, 0, 1]
    # Class-balanced weights (equal here), split 0.75 : 0.25 between originals and copies.
    assert s.w_tr.tolist() == pytest.approx([0.75, 0.75, 0.25, 0.25])
    assert np.array_equal(s.x_tr[2:, :2], emb[:2])
    assert np.array_equal(s.x_tr[2:, 2:], np.tile(missing_vector(spec), (2, 1)))
    assert s.x_va[0].tolist() == [4.0, 5.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]

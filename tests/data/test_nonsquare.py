"""Non-square inputs (``data.image_size: [H, W]``): config, resize, cache, TTA and a run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from skinlesion.cli import main
from skinlesion.core.config import ConfigError, load_config
from skinlesion.data.augment import AugmentConfig, augment_batch, tta_views
from skinlesion.data.cache import build_cache, cache_key
from skinlesion.data.preprocess import PreprocessSpec, prepare_image, size_hw, size_label
from skinlesion.data.synthetic import make_synthetic_ham10000
from skinlesion.models.checkpoint import load_checkpoint


def test_config_takes_h_w_and_checks_it() -> None:
    cfg = load_config(None, ["data.image_size=[150, 200]", "eval.tta=4"])
    assert cfg.data.image_size == (150, 200)
    assert load_config(None, ["data.image_size=192"]).data.image_size == 192
    with pytest.raises(ConfigError, match="16..1024"):
        load_config(None, ["data.image_size=[8, 200]"])
    with pytest.raises(ConfigError, match="eval.tta"):
        load_config(None, ["data.image_size=[150, 200]", "eval.tta=8"])
    # A square [S, S] keeps all 8 views.
    assert load_config(None, ["data.image_size=[64, 64]", "eval.tta=8"]).eval.tta == 8


def test_prepare_image_keeps_the_aspect(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(path)
    assert prepare_image(path, (150, 200)).shape == (150, 200, 3)
    assert prepare_image(path, 96).shape == (96, 96, 3)
    assert (
        size_hw(96) == (96, 96) and size_label(96) == "96" and size_label((150, 200)) == "150x200"
    )


def test_spec_round_trips_a_tuple_size() -> None:
    spec = PreprocessSpec(size=(150, 200), mean=(0.5,) * 3, std=(0.25,) * 3)
    d = spec.to_dict()
    assert d["size"] == [150, 200]
    assert PreprocessSpec.from_dict(d) == spec and spec.hw == (150, 200)


def test_tta_views_keep_a_non_square_shape() -> None:
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    views = tta_views(x, 4)
    assert all(v.shape == x.shape for v in views)
    torch.testing.assert_close(views[3], x.flip(-1).flip(-2))  # rot180
    assert len({tuple(v.flatten().tolist()) for v in views}) == 4
    with pytest.raises(ValueError, match="shape-keeping"):
        tta_views(x, 5)


def test_augment_and_vignette_on_a_non_square_batch() -> None:
    x = torch.rand(3, 3, 24, 32)
    cfg = AugmentConfig(aspect=(0.8, 1.25), vignette=1.0)
    y = augment_batch(x, cfg, generator=torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    # The vignette darkens every corner relative to the centre.
    assert (y[..., 0, 0].mean() < y[..., 12, 16].mean()).item()


def test_cache_of_h_w_images(tmp_path: Path) -> None:
    make_synthetic_ham10000(tmp_path / "syn", lesions_per_class=1)
    paths = sorted(str(p) for p in (tmp_path / "syn").rglob("*.jpg"))[:4]
    ids = [Path(p).stem for p in paths]
    cache = build_cache(ids, paths, (24, 32), tmp_path / "c", progress=False)
    assert cache.images.shape == (4, 24, 32, 3) and cache.size == (24, 32)
    again = build_cache(ids, paths, (24, 32), tmp_path / "c", progress=False)
    np.testing.assert_array_equal(again.images, cache.images)
    assert cache_key(ids, paths, (24, 32), "bicubic", False) != cache_key(
        ids, paths, (32, 24), "bicubic", False
    )


def test_a_run_at_h_w_trains_and_predicts(tmp_path: Path) -> None:
    make_synthetic_ham10000(tmp_path / "syn", lesions_per_class=3)
    out = tmp_path / "run"
    overrides = {
        "data.root": tmp_path / "syn",
        "data.image_size": "[24,32]",
        "data.cache_dir": tmp_path / "cache",
        "cv.n_folds": 2,
        "cv.folds_to_run": "[0]",
        "model.backbone": "tf_efficientnet_lite0",
        "model.pretrained": "false",
        "train.epochs": 1,
        "train.batch_size": 8,
        "train.steps_per_epoch": 2,
        "train.patience": "null",
        "eval.tta": 4,
        "eval.n_boot": 10,
        "output_dir": out,
    }
    assert main(["train", "--no-progress", *[f"{k}={v}" for k, v in overrides.items()]]) == 0
    ckpt = load_checkpoint(out / "fold_0" / "best.pt")
    assert ckpt["preprocessing"]["size"] == [24, 32]
    img = sorted((tmp_path / "syn").rglob("*.jpg"))[0]
    pred = tmp_path / "p.csv"
    assert (
        main(["predict", "--model", str(out), "--no-progress", str(img), "--output", str(pred)])
        == 0
    )
    import pandas as pd

    row = pd.read_csv(pred).iloc[0]
    assert abs(sum(row[c] for c in ckpt["class_names"]) - 1.0) < 1e-5
    # The default CPU backend (its ONNX graph, exported at H x W) gives the eager probabilities.
    eager = tmp_path / "eager.csv"
    args = ["predict", "--model", str(out), "--no-progress", str(img), "--output", str(eager)]
    assert main([*args, "--backend", "torch"]) == 0
    other = pd.read_csv(eager).iloc[0]
    assert max(abs(row[c] - other[c]) for c in ckpt["class_names"]) < 1e-4

"""Linear probe and freeze_stages."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import PROBE, run_overrides

from skinlesion.cli import main
from skinlesion.core.config import load_config
from skinlesion.core.labels import CLASSES
from skinlesion.data.sampling import sample_weights
from skinlesion.data.synthetic import make_synthetic_ham10000
from skinlesion.models.checkpoint import load_checkpoint
from skinlesion.models.factory import build_model
from skinlesion.models.freezing import freeze_stages
from skinlesion.training import probe
from skinlesion.training.losses import build_loss
from skinlesion.training.run_data import load_run_data


@pytest.fixture(scope="module")
def syn_root(synthetic_ham: Callable[..., Path]) -> Path:
    return synthetic_ham(6)


def probe_args(root: Path, out: Path, cache: Path, **extra: object) -> list[str]:
    """The shared probe at 48 px over 3 folds, with flips (the scheme's default)."""
    base = {**PROBE, "data.image_size": 48, "cv.n_folds": 3, "train.probe_flips": "true"}
    return run_overrides(base, root, out, cache, **extra)


def test_probe_run_is_an_ordinary_run(syn_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "probe"
    assert main(["train", "--no-progress", *probe_args(syn_root, out, tmp_path / "c")]) == 0
    oof = pd.read_csv(out / "oof_predictions.csv")
    assert len(oof) == len(pd.read_csv(syn_root / "HAM10000_metadata.csv"))
    # Each fold's head is the fit of that fold's training embeddings, labels and sampler weights
    # at the chosen strength: refitted here from the cached embeddings, in the same float64.
    data = load_run_data(load_config(out / "config.yaml"), None, progress=False)
    (emb_file,) = (tmp_path / "c" / "embeddings").glob("*.npy")
    emb = np.load(emb_file)
    per_sample = build_loss("focal", reduction="none")
    for fold in range(3):
        metrics = pd.read_csv(out / f"fold_{fold}" / "metrics.csv")
        ckpt = load_checkpoint(out / f"fold_{fold}" / "best.pt")
        assert ckpt["epoch"] == int(metrics.loc[metrics["val_loss"].idxmin(), "epoch"])
        assert ckpt["probe_l2"] in probe.L2_GRID
        train = data.table[data.table["fold"] != fold]
        y = train["label"].to_numpy()
        w, b = probe.fit_linear_head(
            emb[train["row"].to_numpy()], y, sample_weights(y, 7), ckpt["probe_l2"], per_sample, 7
        )
        head = ckpt["state_dict"]
        np.testing.assert_allclose(head["classifier.weight"].numpy(), w, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(head["classifier.bias"].numpy(), b, rtol=1e-5, atol=1e-6)
    # predict with tta=3 (identity + flips) reproduces the flip-averaged OOF probabilities.
    ckpt_path = out / "fold_0" / "best.pt"
    fold0 = oof[oof["fold"] == 0].head(4)
    paths = [str(next(syn_root.rglob(f"{i}.jpg"))) for i in fold0["image_id"]]
    csv = tmp_path / "p.csv"
    assert (
        main(
            [
                "predict",
                "--model",
                str(ckpt_path),
                *paths,
                "--tta",
                "3",
                "--output",
                str(csv),
                "--no-progress",
            ]
        )
        == 0
    )
    pred = pd.read_csv(csv)
    np.testing.assert_allclose(
        pred[list(CLASSES)].to_numpy(), fold0[list(CLASSES)].to_numpy(), atol=2e-3
    )


def test_embedding_cache_reused_and_invalidated(
    syn_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real = probe.compute_embeddings

    def counting(*a: object, **k: object) -> np.ndarray:
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(probe, "compute_embeddings", counting)
    cache = tmp_path / "c"
    # One fold and no familiarity: what is cached is every image's embedding, whatever is fitted.
    quick = {"cv.folds_to_run": "[0]", "eval.familiarity": "false"}
    run = lambda name, **kw: main(  # noqa: E731
        ["train", "--no-progress", *probe_args(syn_root, tmp_path / name, cache, **quick, **kw)]
    )
    assert run("a") == 0 and calls["n"] == 1
    assert run("b") == 0 and calls["n"] == 1  # same backbone, size and data: from disk
    assert run("c", **{"model.backbone": "tf_efficientnet_lite1"}) == 0 and calls["n"] == 2
    assert run("d", **{"data.image_size": 40}) == 0 and calls["n"] == 3
    # Changed data (one image rewritten) -> new image cache -> new embeddings.
    other = tmp_path / "syn_changed"
    make_synthetic_ham10000(other, lesions_per_class=6)
    first = sorted(other.rglob("*.jpg"))[0]
    from PIL import Image

    Image.new("RGB", (64, 48), (10, 200, 10)).save(first)
    assert (
        main(["train", "--no-progress", *probe_args(other, tmp_path / "e", cache, **quick)]) == 0
        and calls["n"] == 4
    )


def _head_objective_gradient(
    x: np.ndarray, y: np.ndarray, weights: np.ndarray, l2: float, w: np.ndarray, b: np.ndarray
) -> float:
    """Largest |gradient| of the probe's objective (weighted focal loss on standardised
    features, plus l2 * |W|^2) at the head ``(w, b)`` given in the original feature space."""
    xt = torch.from_numpy(x)
    mu, sd = xt.mean(0), xt.std(0)
    wz = (torch.from_numpy(w) * sd).requires_grad_()
    bz = (torch.from_numpy(b) + (torch.from_numpy(w) * mu).sum(1)).detach().requires_grad_()
    wt = torch.from_numpy(weights / weights.mean())
    per_sample = build_loss("focal", reduction="none").double()
    loss = (per_sample((xt - mu) / sd @ wz.T + bz, torch.from_numpy(y)) * wt).mean()
    loss = loss + l2 * (wz**2).sum()
    return max(float(g.abs().max()) for g in torch.autograd.grad(loss, [wz, bz]))


def test_fit_linear_head_is_the_minimum_of_its_objective() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (7, 16))
    y = rng.integers(0, 7, 700)
    x = 3.0 * centres[y] + rng.normal(5, 2, (700, 16))  # overlapping classes, off-centre
    weights = rng.uniform(0.5, 2.0, 700)
    l2 = 1e-2
    criterion = build_loss("focal", reduction="none")
    w, b = probe.fit_linear_head(x, y, weights, l2, criterion, 7)
    # A stationary point of the smooth objective, to where L-BFGS stops (2e-6 here): the
    # minimum the probe promises, on any CPU (float64). The zero head it starts from is far from
    # it (0.35), and so is the fit without the sample weights (2e-3) or at l2=3e-2 (2e-2).
    assert _head_objective_gradient(x, y, weights, l2, w, b) < 1e-4
    zero = _head_objective_gradient(x, y, weights, l2, np.zeros_like(w), np.zeros_like(b))
    assert zero > 0.1


def test_freeze_stages_freezes_stem_and_first_stages() -> None:
    model = build_model("tf_efficientnet_lite0", 7, pretrained=False)
    frozen = freeze_stages(model, 3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(
        n.startswith(("conv_stem", "bn1.", "blocks.0.", "blocks.1.", "blocks.2."))
        for n in trainable
    )
    assert any(n.startswith("blocks.3.") for n in trainable) and "classifier.weight" in trainable
    assert frozen
    with pytest.raises(ValueError, match="freeze_stages"):
        freeze_stages(build_model("tf_efficientnet_lite0", 7, pretrained=False), 50)


def test_freeze_stages_training_keeps_frozen_weights(syn_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "ft"
    args = probe_args(
        syn_root,
        out,
        tmp_path / "c",
        **{
            "train.scheme": "finetune",
            "train.freeze_stages": 4,
            "train.epochs": 1,
            "train.batch_size": 8,
            "train.steps_per_epoch": 3,
            "cv.folds_to_run": "[0]",
            "data.image_size": 32,
        },
    )
    assert main(["train", "--no-progress", *args]) == 0
    ckpt = load_checkpoint(out / "fold_0" / "best.pt")
    ref = build_model("tf_efficientnet_lite0", 7, pretrained=True).state_dict()
    for key in ("conv_stem.weight", "blocks.1.0.conv_pw.weight", "bn1.running_mean"):
        torch.testing.assert_close(ckpt["state_dict"][key], ref[key])
    assert not torch.equal(
        ckpt["state_dict"]["blocks.6.0.conv_pw.weight"], ref["blocks.6.0.conv_pw.weight"]
    )


def test_probe_refuses_torchrun_config_combination(
    syn_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under torchrun (2 processes) the linear probe refuses to start instead of fitting every
    fold in each process; without torchrun the same config runs."""
    from skinlesion.core.runtime import DistInfo
    from skinlesion.training import cv

    def no_probe(*a: object, **k: object) -> None:
        raise AssertionError("the probe ran under torchrun")

    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets, read before any work
    monkeypatch.setattr(cv, "init_distributed", lambda: DistInfo(rank=0, world_size=2))
    monkeypatch.setattr(cv.dist, "barrier", lambda: None)  # no process group in this test
    monkeypatch.setattr(cv, "run_linear_probe", no_probe)
    cfg = load_config(None, probe_args(syn_root, tmp_path / "run", tmp_path / "c"))
    assert cfg.train.scheme == "linear_probe"
    with pytest.raises(ValueError, match="linear_probe runs in one process, not 2; drop torchrun"):
        cv.run_cv(cfg, progress=False)
    assert not list((tmp_path / "run").glob("fold_*"))

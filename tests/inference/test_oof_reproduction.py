"""``predict`` with its defaults on ``fold_K/best.pt`` reproduces fold K's out-of-fold rows.

This ties the run's out-of-fold probabilities (and the temperature fitted on them) to what users
get: same preprocessing, same TTA views, same temperature. On the synthetic lesions, which have no
symmetry, a different number of views moves the probabilities far beyond the tolerance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import FINETUNE, PROBE, run_overrides, train_cli

from skinlesion.cli import main
from skinlesion.core.labels import CLASSES
from skinlesion.models.checkpoint import load_checkpoint

TOL = 1e-5


def predict_fold(run: Path, root: Path, fold: int, out: Path, *extra: str) -> pd.DataFrame:
    """``skinlesion predict --model run/fold_K/best.pt`` on fold K's validation images, joined
    with the fold's ``val_predictions.csv``."""
    val = pd.read_csv(run / f"fold_{fold}" / "val_predictions.csv")
    paths = {p.stem: str(p) for p in root.rglob("*.jpg")}
    images = [paths[i] for i in val["image_id"]]
    model = str(run / f"fold_{fold}" / "best.pt")
    argv = ["predict", "--model", model, *images, "--output", str(out), "--no-progress", *extra]
    assert main(argv) == 0
    pred = pd.read_csv(out)
    assert pred["image"].tolist() == images
    return val.assign(**{f"pred_{c}": pred[c].to_numpy() for c in CLASSES})


def check_reproduces(joined: pd.DataFrame) -> None:
    got = joined[[f"pred_{c}" for c in CLASSES]].to_numpy()
    want = joined[list(CLASSES)].to_numpy()
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def check_one_view_differs(joined: pd.DataFrame, run: Path, root: Path, fold: int) -> None:
    """Guard of the test itself: 1 view gives other probabilities than the calibrated views."""
    one = predict_fold(run, root, fold, run / "one_view.csv", "--tta", "1")
    diff = np.abs(one[[f"pred_{c}" for c in CLASSES]].to_numpy() - joined[list(CLASSES)].to_numpy())
    assert diff.max() > 10 * TOL


@pytest.fixture(scope="module")
def finetune_run(tmp_path_factory: pytest.TempPathFactory, syn_root: Path) -> Path:
    tmp = tmp_path_factory.mktemp("oof_finetune")
    # Pretrained features and a few larger steps: outputs that depend on the view.
    extra = {
        "cv.folds_to_run": "[1]",
        "model.pretrained": "true",
        "train.lr": 3e-3,
        "train.epochs": 1,
        "eval.tta": 4,
    }
    assert train_cli(run_overrides(FINETUNE, syn_root, tmp / "run", tmp / "cache", **extra)) == 0
    return tmp / "run"


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory: pytest.TempPathFactory, syn_root: Path) -> Path:
    tmp = tmp_path_factory.mktemp("oof_probe")
    extra = {"train.probe_flips": "true"}  # the scheme's default
    assert train_cli(run_overrides(PROBE, syn_root, tmp / "run", tmp / "cache", **extra)) == 0
    return tmp / "run"


def test_finetune_with_tta4_reproduces_its_oof_rows(finetune_run: Path, syn_root: Path) -> None:
    assert load_checkpoint(finetune_run / "fold_1" / "best.pt")["tta"] == 4
    joined = predict_fold(finetune_run, syn_root, 1, finetune_run / "pred.csv")
    check_reproduces(joined)
    oof = pd.read_csv(finetune_run / "oof_predictions.csv").set_index("image_id")
    np.testing.assert_allclose(
        oof.loc[joined["image_id"], list(CLASSES)].to_numpy(),
        joined[list(CLASSES)].to_numpy(),
        atol=1e-7,
    )
    check_one_view_differs(joined, finetune_run, syn_root, 1)


@pytest.mark.parametrize("fold", [0, 1])
def test_probe_with_flips_reproduces_its_oof_rows(
    probe_run: Path, syn_root: Path, fold: int
) -> None:
    # The temperature was fitted on flip-averaged embeddings: the identity and its two flips.
    assert load_checkpoint(probe_run / f"fold_{fold}" / "best.pt")["tta"] == 3
    joined = predict_fold(probe_run, syn_root, fold, probe_run / f"pred_{fold}.csv")
    check_reproduces(joined)
    check_one_view_differs(joined, probe_run, syn_root, fold)

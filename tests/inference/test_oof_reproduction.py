"""``predict`` with its defaults on ``fold_K/best.pt`` reproduces fold K's out-of-fold rows.

This ties the run's out-of-fold probabilities (and the temperature fitted on them) to what users
get: same preprocessing, same TTA views, same temperature. On the synthetic lesions, which have no
symmetry, a different number of views moves the probabilities far beyond the tolerance.

A fused fine-tune with colour constancy also ties the metadata encoding (the fold's age
standardisation, vocabularies) and the colour correction to inference: on synthetic lesions with
a colour cast per image and metadata that leans towards the class without fixing it, its
out-of-fold probabilities are far from 0 and 1 and differ by image, so a skew shows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import FINETUNE, PROBE, check_not_saturated, run_overrides, train_cli

from skinlesion import load_model
from skinlesion.cli import main
from skinlesion.core.labels import CLASSES
from skinlesion.core.runtime import resolve_runtime
from skinlesion.data.tabular import metadata_table
from skinlesion.inference.predict import Member, predict_images
from skinlesion.models.checkpoint import checkpoint_metadata, load_checkpoint

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
    """Guard of the test itself: 1 view gives other probabilities than the calibrated views, by
    several times the tolerance (9e-5 on an AMD EPYC, so 5 times, not 10)."""
    one = predict_fold(run, root, fold, run / "one_view.csv", "--tta", "1")
    diff = np.abs(one[[f"pred_{c}" for c in CLASSES]].to_numpy() - joined[list(CLASSES)].to_numpy())
    assert diff.max() > 5 * TOL


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


FIELDS = ["age", "sex", "localization"]


@pytest.fixture(scope="module")
def fused_cc_run(
    tmp_path_factory: pytest.TempPathFactory, synthetic_ham: Callable[..., Path]
) -> tuple[Path, Path]:
    """(data root, run) of a fine-tune fused with age/sex/site, with colour constancy, fold 1."""
    # A colour cast per image (what colour constancy removes) and weak metadata: age and site
    # lean towards the class without fixing it.
    root = synthetic_ham(5, weak_metadata=True, colour_cast=0.25)
    tmp = tmp_path_factory.mktemp("oof_fused_cc")
    extra = {
        "cv.folds_to_run": "[1]",
        "model.pretrained": "true",
        "train.lr": 3e-3,
        "eval.tta": 2,
        "data.colour_constancy": "true",
        "model.metadata": f"[{','.join(FIELDS)}]",
        "model.metadata_hidden": 16,
    }
    assert train_cli(run_overrides(FINETUNE, root, tmp / "run", tmp / "cache", **extra)) == 0
    return root, tmp / "run"


def test_fused_finetune_with_colour_constancy_reproduces_its_oof_rows(
    fused_cc_run: tuple[Path, Path], tmp_path: Path
) -> None:
    """The command and the Python API, given the images and their metadata, give the run's
    out-of-fold rows within ``TOL`` (1e-5, absolute, per probability)."""
    root, run = fused_cc_run
    ckpt = load_checkpoint(run / "fold_1" / "best.pt")
    assert ckpt["preprocessing"]["colour_constancy"] is True
    assert checkpoint_metadata(ckpt).fields == tuple(FIELDS)
    oof = pd.read_csv(run / "oof_predictions.csv").set_index("image_id")
    table = root / "HAM10000_metadata.csv"
    # The command: images and a metadata CSV (missing ages included).
    joined = predict_fold(run, root, 1, tmp_path / "pred.csv", "--metadata", str(table))
    want = oof.loc[joined["image_id"], list(CLASSES)].to_numpy()
    np.testing.assert_allclose(joined[list(CLASSES)].to_numpy(), want, atol=1e-7)
    check_not_saturated(want)
    check_reproduces(joined)
    # The Python API: one record per image.
    paths = {p.stem: p for p in root.rglob("*.jpg")}
    images = [paths[i] for i in joined["image_id"]]
    meta = pd.read_csv(table).set_index("image_id").loc[joined["image_id"], FIELDS]
    records = meta.reset_index(drop=True).to_dict("records")
    model = load_model(run, device="cpu")
    got, errors = model.predict_proba(images, metadata=records)
    assert not errors
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    # Guards of the test itself: each skew moves these probabilities far beyond the tolerance.
    runtime = resolve_runtime("cpu")
    table_in = metadata_table(records, len(images))

    def skewed(members: list[Member]) -> float:
        probs = predict_images(images, members, runtime, progress=False, metadata=table_in).probs
        return float(np.abs(probs - want).max())

    members = model.members
    no_cc = [replace(m, spec=replace(m.spec, colour_constancy=False)) for m in members]
    assert skewed(no_cc) > 0.01
    raw_age = [replace(m, metadata=replace(m.metadata, age_mean=0.0, age_std=1.0)) for m in members]
    assert skewed(raw_age) > 0.01
    no_meta = predict_images(images, members, runtime, progress=False).probs
    assert np.abs(no_meta - want).max() > 100 * TOL

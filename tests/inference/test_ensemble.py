"""Fold ensembles on hand-made checkpoints: the shared-backbone fast path, failed rows, the
calibrated views recorded with each model, and the TTA engine."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import BATCH_ATOL

from skinlesion.cli import main
from skinlesion.core.labels import CLASSES
from skinlesion.core.runtime import resolve_runtime
from skinlesion.data.augment import tta_views
from skinlesion.data.preprocess import prepare_with_spec
from skinlesion.inference.forward import predict_logits
from skinlesion.inference.predict import (
    calibrated_views,
    ensemble_probs,
    load_ensemble,
    predict_images,
)
from skinlesion.models.checkpoint import atomic_torch_save, make_checkpoint
from skinlesion.models.factory import build_model, default_spec

BACKBONE = "tf_efficientnet_lite0"
SIZE = 32
RUNTIME = resolve_runtime("cpu")


def random_model(seed: int) -> torch.nn.Module:
    """A random lite0 whose classifier is scaled up, so its classes are far from uniform."""
    torch.manual_seed(seed)
    model = build_model(BACKBONE, len(CLASSES), pretrained=False)
    with torch.no_grad():
        model.get_classifier().weight.mul_(40.0)
    return model.eval()


def write_member(
    path: Path, model: torch.nn.Module, fold: int, temperature: float, **extra: object
) -> Path:
    spec = default_spec(BACKBONE, SIZE)
    ckpt = make_checkpoint(
        model,
        backbone=BACKBONE,
        spec=spec,
        fold=fold,
        epoch=1,
        metrics={"val_loss": 1.0},
        config={"eval": {"tta": 2}},
        temperature=temperature,
    )
    ckpt.update(extra)
    atomic_torch_save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def images(syn_root: Path) -> list[str]:
    return [str(p) for p in sorted(syn_root.rglob("*.jpg"))[:6]]


@pytest.fixture(scope="module")
def probe_like_run(tmp_path_factory: pytest.TempPathFactory, images: list[str]) -> Path:
    """Three folds that share one backbone and differ in classifier and temperature; the
    classifiers are scaled so that logits spread by a few units (probabilities far from both
    uniform and one-hot, so that views, members and temperatures all show)."""
    run = tmp_path_factory.mktemp("shared")
    base = random_model(0)
    spec = default_spec(BACKBONE, SIZE)
    x = torch.from_numpy(prepared(images)).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(spec.mean)[:, None, None]) / torch.tensor(spec.std)[:, None, None]
    with torch.no_grad():
        feats = base.forward_head(base.forward_features(x), pre_logits=True)
    scale = 3.0 / feats.norm(dim=1).mean().item()
    for fold, temperature in enumerate((0.7, 1.0, 1.6)):
        model = copy.deepcopy(base)
        torch.manual_seed(100 + fold)
        with torch.no_grad():
            model.get_classifier().weight.normal_(0, scale)
            model.get_classifier().bias.normal_(0, 0.5)
        write_member(run / f"fold_{fold}" / "best.pt", model, fold, temperature, tta=3)
    return run


def prepared(paths: list[str]) -> np.ndarray:
    spec = default_spec(BACKBONE, SIZE)
    return np.stack([prepare_with_spec(p, spec) for p in paths])


@pytest.mark.parametrize("tta", [1, 3, 8])
def test_shared_backbone_fast_path_equals_each_model_alone(
    probe_like_run: Path, images: list[str], tta: int
) -> None:
    members = load_ensemble(probe_like_run, RUNTIME)
    assert len({m.backbone_id for m in members}) == 1  # the fast path is taken
    spec = members[0].spec
    arr = {spec: prepared(images)}
    fast = ensemble_probs(members, arr, RUNTIME, tta=tta, batch_size=4)
    # Each member on its own: full forward pass, views averaged in logit space, its temperature.
    alone = []
    for m in members:
        logits = predict_logits(
            m.model,
            arr[spec],
            np.arange(len(images)),
            batch_size=4,
            runtime=RUNTIME,
            norm=spec.normalization,
            tta=tta,
        )
        z = torch.from_numpy(logits).double().mean(0) / m.temperature
        alone.append(torch.softmax(z, -1).numpy())
    np.testing.assert_allclose(fast, np.mean(alone, axis=0), atol=BATCH_ATOL)
    # The members really differ, so a fast path that applied one classifier to all would show.
    assert np.abs(alone[0] - alone[2]).max() > 1e-2
    # And so does the ensemble of one member each.
    for m, expected in zip(members, alone, strict=True):
        np.testing.assert_allclose(
            ensemble_probs([m], arr, RUNTIME, tta=tta, batch_size=4), expected, atol=BATCH_ATOL
        )


def test_models_with_different_backbones_take_the_full_path(
    tmp_path: Path, images: list[str]
) -> None:
    for fold in (0, 1):
        write_member(tmp_path / f"fold_{fold}" / "best.pt", random_model(fold), fold, 1.0)
    members = load_ensemble(tmp_path, RUNTIME)
    assert members[0].backbone_id != members[1].backbone_id
    spec = members[0].spec
    arr = {spec: prepared(images)}
    both = ensemble_probs(members, arr, RUNTIME, tta=2)
    each = [ensemble_probs([m], arr, RUNTIME, tta=2) for m in members]
    np.testing.assert_allclose(both, (each[0] + each[1]) / 2, atol=1e-7)
    assert np.abs(each[0] - each[1]).max() > 1e-2


def test_views_differ_on_synthetic_lesions(probe_like_run: Path, images: list[str]) -> None:
    """The synthetic lesions have no symmetry: every TTA view gives other logits."""
    m = load_ensemble(probe_like_run / "fold_0" / "best.pt", RUNTIME)[0]
    logits = predict_logits(
        m.model,
        prepared(images),
        np.arange(len(images)),
        batch_size=8,
        runtime=RUNTIME,
        norm=m.spec.normalization,
        tta=8,
    )
    for a in range(8):
        for b in range(a + 1, 8):
            assert np.abs(logits[a] - logits[b]).max() > 1e-3, (a, b)


def test_predict_logits_views_are_the_dihedral_views(images: list[str]) -> None:
    model = random_model(3)
    spec = default_spec(BACKBONE, SIZE)
    arr = prepared(images)
    rows = np.arange(len(images))
    logits = predict_logits(
        model, arr, rows, batch_size=4, runtime=RUNTIME, norm=spec.normalization, tta=8
    )
    assert logits.shape == (8, len(images), len(CLASSES))
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(spec.mean)[:, None, None]) / torch.tensor(spec.std)[:, None, None]
    with torch.no_grad():
        for v, view in enumerate(tta_views(x, 8)):
            np.testing.assert_allclose(logits[v], model(view).numpy(), atol=1e-4)
    # Batching does not change a row's logits beyond float32 summation order (amplified 40x by
    # this model's scaled classifier, hence the same 1e-4 as above).
    one = predict_logits(
        model, arr, rows[2:3], batch_size=1, runtime=RUNTIME, norm=spec.normalization, tta=8
    )
    np.testing.assert_allclose(one[:, 0], logits[:, 2], atol=1e-4)


def test_calibrated_views_recorded_else_from_config() -> None:
    assert calibrated_views({"tta": 3, "config": {"eval": {"tta": 1}}}) == 3
    assert calibrated_views({"config": {"eval": {"tta": 4}}}) == 4  # written before "tta"
    assert calibrated_views({"config": {}}) == 1
    assert calibrated_views({}) == 1


def test_predict_defaults_to_the_recorded_views(probe_like_run: Path, images: list[str]) -> None:
    members = load_ensemble(probe_like_run, RUNTIME)
    assert [m.tta for m in members] == [3, 3, 3]  # recorded, not the config's eval.tta (2)
    default = predict_images(images, members, RUNTIME, progress=False).probs
    three = predict_images(images, members, RUNTIME, tta=3, progress=False).probs
    two = predict_images(images, members, RUNTIME, tta=2, progress=False).probs
    np.testing.assert_allclose(default, three)
    assert np.abs(default - two).max() > 1e-4


def test_failed_rows_are_empty_and_good_rows_as_if_alone(
    probe_like_run: Path, images: list[str], tmp_path: Path
) -> None:
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    missing = tmp_path / "gone.png"
    sources = [images[0], str(bad), images[1], images[2], str(missing), images[3]]
    members = load_ensemble(probe_like_run, RUNTIME)
    out = predict_images(sources, members, RUNTIME, batch_size=2, progress=False)
    probs, errors = out.probs, out.errors
    assert sorted(errors) == [1, 4]
    assert "notes.jpg" in errors[1] and "gone.png" in errors[4]
    assert np.isnan(probs[[1, 4]]).all()
    for i in (0, 2, 3, 5):
        single = predict_images([sources[i]], members, RUNTIME, progress=False)
        alone = single.probs
        assert not single.errors
        # Equal up to float32 summation order, which depends on the batch's size.
        np.testing.assert_allclose(probs[i], alone[0], atol=1e-5)
    # Through the CLI: the failed rows have empty probabilities and prediction, exit code 1.
    out = tmp_path / "preds.csv"
    argv = ["predict", "--model", str(probe_like_run), *sources, "--output", str(out)]
    assert main([*argv, "--no-progress"]) == 1
    df = pd.read_csv(out, keep_default_na=False, dtype=str)
    assert df["image"].tolist() == sources
    failed = df.iloc[[1, 4]]
    assert (failed[list(CLASSES)] == "").all().all()
    assert (failed["prediction"] == "").all() and (failed["error"] != "").all()
    good = df.drop(index=[1, 4])
    values = good[list(CLASSES)].astype(float).to_numpy()
    np.testing.assert_allclose(values, probs[[0, 2, 3, 5]], atol=BATCH_ATOL)
    assert good["prediction"].tolist() == [CLASSES[k] for k in values.argmax(1)]
    assert (good["error"] == "").all()

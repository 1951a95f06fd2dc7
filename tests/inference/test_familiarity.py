"""Familiarity: Mahalanobis distances with known answers on Gaussian statistics, the
normalisation and threshold where they are defined to be, the file round trip, and its use in
prediction (identity view, ensemble mean, shared backbone)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import (
    HAM_DIR,
    attach_tiny_familiarity,
    make_tiny_packaged,
    requires_ham,
    spread_images,
)

from skinlesion.core.errors import CheckpointError, DataError
from skinlesion.core.runtime import resolve_runtime
from skinlesion.data.nondermoscopy import write_nondermoscopy
from skinlesion.data.preprocess import prepare_with_spec
from skinlesion.inference.familiarity import (
    CALIBRATION_QUANTILE,
    FAMILIARITY_FILE,
    MAX_HELDOUT_SCORES,
    Familiarity,
    feature_stages,
    fit_familiarity,
    load_familiarities,
    load_familiarity,
    save_familiarities,
)
from skinlesion.inference.packaged import load_packaged
from skinlesion.inference.predict import ensemble_outputs, predict_images
from skinlesion.inference.refer import UNFAMILIAR_QUANTILE
from skinlesion.models.fusion import MetadataFusion

DIMS = (4, 6, 8)


def _gaussian_stats(n: int, seed: int, scale: float = 2.0) -> list[np.ndarray]:
    """Per stage, ``n`` draws of an isotropic Gaussian (mean 1, sd ``scale``) of DIMS sizes."""
    rng = np.random.default_rng(seed)
    return [1.0 + scale * rng.standard_normal((n, d)) for d in DIMS]


@pytest.fixture(scope="module")
def fitted() -> Familiarity:
    return fit_familiarity(
        _gaussian_stats(20_000, 0), _gaussian_stats(5_000, 1), _gaussian_stats(5_000, 2)
    )


def test_distance_is_the_mahalanobis_distance_of_the_fitted_gaussian(fitted: Familiarity) -> None:
    # An isotropic covariance (sd 2) is unchanged by the shrinkage to its mean diagonal, so the
    # squared distance of mean + k sd along any axis is k^2.
    g = fitted.stages[1]
    assert g.mean == pytest.approx(np.ones(6), abs=0.05)
    for k, axis in ((1.0, 0), (3.0, 4), (5.0, 2)):
        x = np.ones((1, 6))
        x[0, axis] += 2.0 * k
        assert g.distance(x)[0] == pytest.approx(k * k, rel=0.05)
    # And equals the explicit formula with the shrunk covariance on anisotropic data.
    rng = np.random.default_rng(3)
    a = rng.standard_normal((3000, 5)) @ np.diag([5.0, 2.0, 1.0, 0.5, 0.1])
    fam = fit_familiarity([a], [a[:500]], [a[500:1000]])
    cov = np.cov(a.T, bias=True)
    shrunk = 0.9 * cov + 0.1 * np.trace(cov) / 5 * np.eye(5)
    x = rng.standard_normal((4, 5)) * 3
    r = x - a.mean(0)
    expected = np.einsum("ij,jk,ik->i", r, np.linalg.inv(shrunk), r)
    np.testing.assert_allclose(fam.stages[0].distance(x), expected, rtol=1e-5)


def test_the_mean_scores_low_far_points_high_and_calibration_q99_is_one(
    fitted: Familiarity,
) -> None:
    calib = _gaussian_stats(5_000, 1)
    for g, x in zip(fitted.stages, calib, strict=True):
        assert np.quantile(g.normalised(x), CALIBRATION_QUANTILE) == pytest.approx(1.0, abs=1e-6)
        assert np.median(g.normalised(x)) == pytest.approx(0.0, abs=1e-6)
    at_mean = [np.ones((1, d)) for d in DIMS]
    far = [np.ones((1, d)) + 2.0 * 4 for d in DIMS]  # 4 sd on every axis
    assert fitted.unfamiliarity(at_mean)[0] < 0 < 1 < fitted.unfamiliarity(far)[0]


def test_the_score_is_the_largest_stage_and_the_threshold_the_heldout_q99(
    fitted: Familiarity,
) -> None:
    # Odd in the last stage only: that stage decides.
    x = [np.ones((1, d)) for d in DIMS]
    x[2] = x[2] + 2.0 * 6
    per_stage = [g.normalised(s)[0] for g, s in zip(fitted.stages, x, strict=True)]
    assert per_stage[2] > 10 and max(per_stage[:2]) < 0
    assert fitted.score(x)[0] == pytest.approx(per_stage[2])
    held = fitted.score(_gaussian_stats(5_000, 2))
    assert fitted.threshold == pytest.approx(np.quantile(held, UNFAMILIAR_QUANTILE))
    assert np.mean(fitted.unfamiliarity(_gaussian_stats(5_000, 2)) > 1) == pytest.approx(0.01)
    # A sample of the held-out scores is kept, from the same distribution.
    assert len(fitted.heldout_scores) == MAX_HELDOUT_SCORES
    assert np.median(fitted.heldout_scores) == pytest.approx(np.median(held), abs=0.05)
    assert fitted.info == {"n_fit": 20_000, "n_calibration": 5_000, "n_heldout": 5_000}


def test_save_and_load_give_the_same_scores(fitted: Familiarity, tmp_path: Path) -> None:
    other = fit_familiarity(
        _gaussian_stats(500, 5), _gaussian_stats(100, 6), _gaussian_stats(100, 7)
    )
    path = save_familiarities(tmp_path / FAMILIARITY_FILE, {"fold0.": fitted, "fold1.": other})
    back = load_familiarities(path)
    assert list(back) == ["fold0.", "fold1."]
    x = _gaussian_stats(50, 9, scale=4.0)
    for fam, loaded in ((fitted, back["fold0."]), (other, back["fold1."])):
        np.testing.assert_array_equal(fam.score(x), loaded.score(x))
        assert loaded.threshold == pytest.approx(fam.threshold, rel=1e-6)
        assert loaded.info == fam.info
    assert all(v.dtype == np.float32 for v in fitted.tensors().values())
    single = save_familiarities(tmp_path / "one.safetensors", {"": other})
    np.testing.assert_array_equal(load_familiarity(single).score(x), other.score(x))
    with pytest.raises(CheckpointError, match="expected one"):
        load_familiarity(path)
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(CheckpointError, match="not a readable familiarity file"):
        load_familiarities(tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="stage features of sizes"):
        fitted.score(x[:2] + [np.ones((1, 3))])


def test_fit_refuses_too_few_or_constant_statistics() -> None:
    with pytest.raises(DataError, match="calibration: 1 image"):
        fit_familiarity(_gaussian_stats(50, 0), _gaussian_stats(1, 1), _gaussian_stats(50, 2))
    flat = [np.zeros((20, d)) for d in DIMS]
    with pytest.raises(DataError, match="do not vary"):
        fit_familiarity(flat, _gaussian_stats(20, 1), _gaussian_stats(20, 2))


def test_stages_of_timm_fused_and_other_backbones() -> None:
    net = timm.create_model("test_efficientnet", pretrained=False, num_classes=7)
    assert feature_stages(net) == list(net.blocks[-3:])
    fused = MetadataFusion(timm.create_model("test_efficientnet", num_classes=7), torch.zeros(5))
    assert feature_stages(fused) == list(fused.backbone.blocks[-3:])
    with pytest.raises(CheckpointError, match="ResNet: familiarity needs a backbone"):
        feature_stages(timm.create_model("resnet10t", pretrained=False, num_classes=7))


# -- in prediction ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lesions(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return spread_images(tmp_path_factory.mktemp("lesions"), n=36)


@pytest.fixture(scope="module")
def familiar(tmp_path_factory: pytest.TempPathFactory, lesions: list[Path]) -> Path:
    """A tiny packaged model (two random test_efficientnet members, 48 px, TTA 2) with a
    familiarity fitted on synthetic lesions."""
    folder = make_tiny_packaged(tmp_path_factory.mktemp("familiar"), "familiar")
    return attach_tiny_familiarity(folder, lesions[::2], lesions[1::4])


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory, lesions: list[Path]) -> list[Path]:
    """Lesions like the training ones, then images that are not dermoscopy."""
    other = write_nondermoscopy(
        tmp_path_factory.mktemp("nonderm"), photos=False, screenshots=2, noise=2, flat=2
    )
    return [*lesions[3::8], *other]


def test_a_packaged_familiarity_is_listed_and_checked(familiar: Path) -> None:
    meta = json.loads((familiar / "model.json").read_text())
    assert meta["familiarity"]["file"] == FAMILIARITY_FILE
    card = json.loads((familiar / "card.json").read_text())
    assert [m["prefix"] for m in card["familiarity"]["members"]] == ["fold0.", "fold1."]
    model = load_packaged(familiar, resolve_runtime("cpu"))
    assert model.has_familiarity and all(m.familiarity for m in model.members)
    assert len(model.heldout_unfamiliarity()) == 2 * 9


def test_tampered_familiarity_file_is_refused(familiar: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(familiar, folder)
    with open(folder / FAMILIARITY_FILE, "r+b") as fh:
        fh.seek(-8, 2)
        fh.write(b"\x00" * 8)
    with pytest.raises(CheckpointError, match="familiarity file is corrupt"):
        load_packaged(folder, resolve_runtime("cpu"))


def _pointing_outside(familiar: Path, root: Path, how: str) -> tuple[Path, str]:
    """A copy of ``familiar`` whose model.json names a familiarity file outside the folder (an
    exact copy of its own, SHA-256 and all); the folder and the name given."""
    import shutil

    folder = root / "model"
    shutil.copytree(familiar, folder)
    outside = root / "elsewhere" / FAMILIARITY_FILE
    outside.parent.mkdir()
    shutil.move(folder / FAMILIARITY_FILE, outside)
    if how == "link":
        (folder / "linked.safetensors").symlink_to(outside)
    name = {"dotdot": f"../elsewhere/{FAMILIARITY_FILE}", "absolute": str(outside)}.get(
        how, "linked.safetensors"
    )
    meta = json.loads((folder / "model.json").read_text())
    meta["familiarity"]["file"] = name
    (folder / "model.json").write_text(json.dumps(meta))
    return folder, name


@pytest.mark.parametrize("how", ["dotdot", "absolute", "link"])
def test_a_familiarity_file_outside_the_model_folder_is_refused(
    familiar: Path, tmp_path: Path, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """model.json may name only files inside its folder: an outside file is neither opened,
    hashed nor loaded, even one whose SHA-256 matches."""
    from skinlesion.inference import packaged, packaged_meta

    folder, name = _pointing_outside(familiar, tmp_path, how)
    opened = []
    monkeypatch.setattr(packaged, "sha256_file", lambda p: opened.append(p) or "")
    with pytest.raises(CheckpointError) as info:
        packaged_meta.read_packaged_meta(folder)
    assert f"familiarity.file {name!r} is outside the model folder {folder}" in str(info.value)
    with pytest.raises(CheckpointError, match="familiarity.file .* is outside the model folder"):
        load_packaged(folder, resolve_runtime("cpu"))
    assert not any(FAMILIARITY_FILE in str(p) for p in opened)


def test_unfamiliarity_is_the_members_mean_of_the_identity_view(
    familiar: Path, mixed: list[Path]
) -> None:
    runtime = resolve_runtime("cpu")
    model = load_packaged(familiar, runtime)
    out = predict_images(mixed, model.members, runtime, progress=False)
    u = out.unfamiliarity
    # Informative: the training-like lesions are familiar, the others not.
    n_lesions = len(mixed) - 6
    assert np.mean(u[:n_lesions] < 1) >= 0.75 and (u[n_lesions:] > 1).all()
    # Each member alone: its own score over its threshold; the ensemble: their mean.
    alone = [
        predict_images(mixed, [m], runtime, progress=False).unfamiliarity for m in model.members
    ]
    assert not np.allclose(alone[0], alone[1])
    np.testing.assert_allclose(u, np.mean(alone, axis=0), rtol=1e-9)
    # The identity view only: the same for any number of TTA views.
    for tta in (1, 4, 8):
        again = predict_images(mixed, model.members, runtime, tta=tta, progress=False)
        np.testing.assert_allclose(again.unfamiliarity, u, rtol=1e-5)
    # A member without familiarity takes no part.
    model.members[1].familiarity = None
    np.testing.assert_allclose(
        predict_images(mixed, model.members, runtime, progress=False).unfamiliarity, alone[0]
    )


def test_members_sharing_a_backbone_score_as_each_alone(familiar: Path, mixed: list[Path]) -> None:
    """The linear probe's path: a shared backbone runs once, each member scores its stats."""
    runtime = resolve_runtime("cpu")
    model = load_packaged(familiar, runtime)
    a, b = model.members
    b.model.load_state_dict(
        {
            k: v if k.startswith("classifier") else a.model.state_dict()[k]
            for k, v in b.model.state_dict().items()
        }
    )
    b.backbone_id = a.backbone_id
    spec = a.spec
    arr = {spec: np.stack([prepare_with_spec(p, spec) for p in mixed])}
    shared, u = ensemble_outputs([a, b], arr, runtime, tta=2)
    alone = [ensemble_outputs([m], arr, runtime, tta=2) for m in (a, b)]
    np.testing.assert_allclose(u, (alone[0][1] + alone[1][1]) / 2, rtol=1e-5)
    np.testing.assert_allclose(shared, (alone[0][0] + alone[1][0]) / 2, atol=1e-6)
    assert ensemble_outputs([a, b], arr, runtime, tta=2, familiarity=False)[1] is None


@requires_ham
def test_the_shipped_model_refers_what_is_not_dermoscopy() -> None:
    """The packaged default (folds 0-2, images alone): images that are not dermoscopy (made now:
    photos, screenshots, textures, cropped or blurred HAM10000 images, noise, flat colours) are
    unlike its training images; fold 0's validation images (held out by its first member) are
    not."""
    import skinlesion
    from skinlesion.data.datasets import canonical_metadata
    from skinlesion.data.folds import make_folds
    from skinlesion.data.ham10000 import load_ham10000
    from skinlesion.data.nondermoscopy import nondermoscopy_images

    model = skinlesion.load_model(device="cpu")
    assert [m.fold for m in model.members][0] == 0 and model.has_familiarity
    df = canonical_metadata(load_ham10000(HAM_DIR, None))
    folds = make_folds(df, 5, 42)  # the model's folds (its card's recipe)
    held = df.merge(folds[["image_id", "fold"]], on="image_id").query("fold == 0")
    picks = held.sample(60, random_state=0)["path"].tolist()
    other = nondermoscopy_images(picks[:10], screenshots=4, noise=2, flat=2)
    images = [img for _, img in other] + picks[10:]
    # One view: the unfamiliarity reads the identity view whatever the TTA.
    table = model.predict(images, tta=1, batch_size=16)
    unlike = table["refer_reasons"].str.contains("unlike the training images").to_numpy()
    n = len(other)
    missed = [name for (name, _), hit in zip(other, unlike[:n], strict=True) if not hit]
    assert np.mean(unlike[:n]) >= 0.95, f"not referred: {missed}"
    assert table["refer"][:n].all()
    assert np.mean(unlike[n:]) <= 0.1  # 50 held-out images: about 1% expected

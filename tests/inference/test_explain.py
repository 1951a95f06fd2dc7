"""Grad-CAM: the map's peak lies on the patch that decides the class; the ensemble's map is the
mean of its members'; overlays and the explain command."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import BATCH_ATOL, lesion_images, make_spread_packaged, spread_images
from PIL import Image
from torch import nn

from skinlesion.cli import main
from skinlesion.core.runtime import resolve_runtime
from skinlesion.data.preprocess import PreprocessSpec
from skinlesion.inference.explain import explain_images, target_layer
from skinlesion.inference.predict import Member
from skinlesion.inference.resolve import resolve_model

SPEC = PreprocessSpec(64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), class_names=("red", "blue"))


class PatchNet(nn.Module):
    """A constructed classifier: class 0 is the amount of red, class 1 the amount of blue,
    read through a timm-like head (``conv_head`` -> activated ``bn2`` -> pool -> classifier)."""

    def __init__(self, gain: float) -> None:
        super().__init__()
        self.stem = nn.AvgPool2d(4)  # 64 px -> a 16 x 16 map, coarse like a real backbone's
        self.conv_head = nn.Conv2d(3, 2, 1)
        self.bn2 = nn.ReLU()
        self.classifier = nn.Linear(2, 2)
        with torch.no_grad():
            self.conv_head.weight.copy_(
                torch.tensor([[1.0, -1.0, 0.0], [0.0, -1.0, 1.0]]).view(2, 3, 1, 1) * gain
            )
            self.conv_head.bias.fill_(-0.5)
            self.classifier.weight.copy_(torch.eye(2) * 4)
            self.classifier.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.bn2(self.conv_head(self.stem(x)))
        return self.classifier(a.mean((2, 3)))


def _members() -> list[Member]:
    return [
        Member(PatchNet(g).eval(), SPEC, 1.0, k, Path("constructed"), 1, f"patchnet-{k}")
        for k, g in enumerate((1.0, 2.0))
    ]


def _patch_image(colour: tuple[int, int, int], box: tuple[int, int, int, int], seed: int):
    rng = np.random.default_rng(seed)
    arr = np.clip(rng.normal(128, 12, (120, 160, 1)), 0, 255).repeat(3, 2).astype(np.uint8)
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1] = colour
    return Image.fromarray(arr)


@pytest.mark.parametrize(
    ("colour", "box", "expected"),
    [
        ((220, 40, 40), (20, 70, 50, 100), "red"),
        ((40, 40, 220), (110, 10, 140, 40), "blue"),
        ((220, 40, 40), (100, 50, 130, 80), "red"),
    ],
)
def test_map_peak_lies_on_the_deciding_patch(colour, box, expected: str) -> None:
    img = _patch_image(colour, box, seed=box[0])
    (ex,) = explain_images([img], _members(), resolve_runtime("cpu"))
    assert ex.class_name == expected
    assert ex.cam.shape == (120, 160) and ex.overlay.size == img.size
    assert ex.cam.min() >= 0.0 and ex.cam.max() <= 1.0
    y, x = np.unravel_index(int(ex.cam.argmax()), ex.cam.shape)
    x0, y0, x1, y1 = box
    assert x0 <= x < x1 and y0 <= y < y1
    inside = ex.cam[y0:y1, x0:x1].mean()
    outside = np.delete(
        ex.cam.reshape(-1),
        np.ravel_multi_index(np.mgrid[y0:y1, x0:x1].reshape(2, -1), ex.cam.shape),
    ).mean()
    assert inside > 5 * outside


def test_ensemble_map_is_the_members_mean() -> None:
    img = _patch_image((220, 40, 40), (20, 20, 50, 50), seed=1)
    runtime = resolve_runtime("cpu")
    members = _members()
    (both,) = explain_images([img], members, runtime)
    singles = [explain_images([img], [m], runtime)[0].cam for m in members]
    np.testing.assert_allclose(both.cam, (singles[0] + singles[1]) / 2, atol=1e-5)


def test_timm_efficientnet_target_is_its_last_stage(tmp_path: Path) -> None:
    """On a model whose prediction moves with the image (a pale lesion: nv, a dark one: mel),
    each map explains its own image's predicted class."""
    spread = spread_images(tmp_path / "imgs")
    model = resolve_model(make_spread_packaged(tmp_path / "zoo", spread), resolve_runtime("cpu"))
    net = model.members[0].model
    assert target_layer(net) is net.bn2
    images = [spread[0], spread[-1]]
    probs, _ = model.predict_proba(images)
    explained = explain_images(images, model.members, resolve_runtime("cpu"))
    for ex, p, path in zip(explained, probs, images, strict=True):
        np.testing.assert_allclose(ex.probs, p, atol=BATCH_ATOL)
        assert ex.class_index == int(p.argmax())
        assert ex.cam.shape == Image.open(path).size[::-1]
    assert explained[0].class_index != explained[1].class_index


def test_explain_command_writes_overlays(tiny_packaged: Path, tmp_path: Path) -> None:
    images = lesion_images(tmp_path / "imgs", 2)
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    out = tmp_path / "cam"
    args = ["explain", "--model", str(tiny_packaged), "--device", "cpu", "--output", str(out)]
    assert main([*args, *map(str, images), str(bad)]) == 1  # the bad image is reported
    table = pd.read_csv(out / "explanations.csv")
    assert len(table) == 2 and set(table["class_explained"]) <= set(
        resolve_model(tiny_packaged).class_names
    )
    for name, path in zip(table["overlay"], images, strict=True):
        assert Image.open(out / name).size == Image.open(path).size


def _two_patches() -> Image.Image:
    """A large red patch (the prediction) and a small blue one."""
    img = np.asarray(_patch_image((220, 40, 40), (10, 10, 70, 70), seed=2)).copy()
    img[70:100, 110:140] = (40, 40, 220)
    return Image.fromarray(img)


def _peak(cam: np.ndarray) -> tuple[int, int]:
    y, x = np.unravel_index(int(cam.argmax()), cam.shape)
    return int(x), int(y)


def test_a_requested_class_is_the_one_whose_map_is_drawn() -> None:
    """Asking for a class that is not the predicted one explains that class: its map moves to
    the patch that decides it; the prediction itself stays."""
    img, runtime = _two_patches(), resolve_runtime("cpu")
    (predicted,) = explain_images([img], _members(), runtime)
    (asked,) = explain_images([img], _members(), runtime, class_index=1)
    assert predicted.class_name == "red" and (asked.class_index, asked.class_name) == (1, "blue")
    np.testing.assert_allclose(asked.probs, predicted.probs)
    x, y = _peak(predicted.cam)
    assert 10 <= x < 70 and 10 <= y < 70
    x, y = _peak(asked.cam)
    assert 110 <= x < 140 and 70 <= y < 100
    assert asked.cam[10:70, 10:70].mean() < 0.2 * predicted.cam[10:70, 10:70].mean()


def test_explain_command_predicts_with_the_tta_it_is_given(
    tiny_packaged: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--tta`` reaches the prediction whose class is explained: the views it asks for are
    computed (not the model's own 2), and the probabilities are that TTA's."""
    from skinlesion.inference import explain

    seen: list[int] = []
    real = explain.ensemble_probs

    def spy(members, images, runtime, tta=1, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(tta)
        return real(members, images, runtime, tta, *args, **kwargs)

    monkeypatch.setattr(explain, "ensemble_probs", spy)
    images = lesion_images(tmp_path / "imgs", 2)
    out = tmp_path / "cam"
    args = ["explain", "--model", str(tiny_packaged), "--device", "cpu", "--output", str(out)]
    assert main([*args, "--tta", "4", *map(str, images)]) == 0
    assert seen == [4, 4]  # one prediction per image
    table = pd.read_csv(out / "explanations.csv")
    model = resolve_model(tiny_packaged, resolve_runtime("cpu"), backend="torch")
    index = [model.class_names.index(c) for c in table["class_explained"]]
    four, _ = model.predict_proba(images, tta=4)
    np.testing.assert_allclose(table["probability"], four[[0, 1], index], atol=2e-6)
    own, _ = model.predict_proba(images)
    assert model.tta == 2 and np.abs(own[[0, 1], index] - four[[0, 1], index]).max() > 1e-4


def test_explain_command_class_reaches_every_map(tiny_packaged: Path, tmp_path: Path) -> None:
    """``--class`` explains that class for every image (its probability, not the top one's),
    and the overlays differ from those of the predicted class."""
    images = lesion_images(tmp_path / "imgs", 2)
    model = resolve_model(tiny_packaged, resolve_runtime("cpu"), backend="torch")
    probs, _ = model.predict_proba(images)
    other = next(c for i, c in enumerate(model.class_names) if i not in set(probs.argmax(1)))
    args = ["explain", "--model", str(tiny_packaged), "--device", "cpu"]
    assert main([*args, "--output", str(tmp_path / "top"), *map(str, images)]) == 0
    assert main([*args, "--class", other, "--output", str(tmp_path / "c"), *map(str, images)]) == 0
    table = pd.read_csv(tmp_path / "c" / "explanations.csv")
    assert table["class_explained"].tolist() == [other, other]
    k = model.class_names.index(other)
    np.testing.assert_allclose(table["probability"], probs[:, k], atol=2e-6)
    for name in table["overlay"]:
        top = np.asarray(Image.open(tmp_path / "top" / name), dtype=np.int16)
        asked = np.asarray(Image.open(tmp_path / "c" / name), dtype=np.int16)
        assert np.abs(top - asked).mean() > 1.0


def test_explain_command_refuses_a_class_the_model_lacks(
    tiny_packaged: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = lesion_images(tmp_path / "imgs", 1)[0]
    args = ["explain", "--model", str(tiny_packaged), "--output", str(tmp_path / "c")]
    assert main([*args, "--class", "melanoma", str(image)]) == 2
    err = capsys.readouterr().err
    assert "--class melanoma: not a class of this model" in err and "'mel'" in err
    assert not (tmp_path / "c").exists()

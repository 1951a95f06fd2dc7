"""The synthetic HAM10000 set: each option that makes it harder does what it says and nothing else
(its own random draws), so the default set stays what every other test was written against."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from skinlesion.data.colour import shades_of_gray
from skinlesion.data.synthetic import make_synthetic_ham10000

LESIONS = 4


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, pd.DataFrame]]:
    """The default set and one set per option, same seed."""
    options = {
        "default": {},
        "weak": {"weak_metadata": True},
        "cast": {"colour_cast": 0.25},
        "look": {"look_noise": 0.4},
    }
    out = {}
    for name, kw in options.items():
        root = tmp_path_factory.mktemp(f"syn_{name}")
        out[name] = (root, make_synthetic_ham10000(root, LESIONS, **kw))
    return out


def _image_bytes(root: Path) -> dict[str, bytes]:
    return {p.stem: p.read_bytes() for p in root.rglob("*.jpg")}


def _background_cast(root: Path, ids: list[str], correct: bool = False) -> float:
    """Spread across images of log(R/B) in the bottom-right corner (skin, no lesion)."""
    paths = {p.stem: p for p in root.rglob("*.jpg")}
    ratios = []
    for i in ids:
        img = np.asarray(Image.open(paths[i]).convert("RGB"))
        img = shades_of_gray(img) if correct else img
        r, _, b = img[-8:, -8:].reshape(-1, 3).astype(float).mean(0)
        ratios.append(np.log(r / b))
    return float(np.std(ratios))


def test_weak_metadata_leans_towards_the_class_without_fixing_it(sets) -> None:
    (root, default), (weak_root, weak) = sets["default"], sets["weak"]
    assert _image_bytes(weak_root) == _image_bytes(root)
    assert weak[["image_id", "lesion_id", "dx"]].equals(default[["image_id", "lesion_id", "dx"]])

    def sites_per_class(df: pd.DataFrame) -> pd.Series:
        return df[df["localization"] != "unknown"].groupby("dx")["localization"].nunique()

    assert (sites_per_class(default) == 1).all()
    assert (sites_per_class(weak) > 1).all()
    ages = pd.to_numeric(weak.drop_duplicates("lesion_id")["age"], errors="coerce")
    by_class = ages.groupby(weak.drop_duplicates("lesion_id")["dx"]).std()
    assert by_class.mean() > 10  # default: about 4 years around the class's mean


def test_colour_cast_differs_by_image_and_colour_constancy_removes_it(sets) -> None:
    (root, default), (cast_root, cast) = sets["default"], sets["cast"]
    assert cast.equals(default)
    ids = default["image_id"].tolist()
    assert _background_cast(root, ids) < 0.02
    assert _background_cast(cast_root, ids) > 0.1
    corrected = _background_cast(cast_root, ids, correct=True)
    assert corrected == pytest.approx(_background_cast(root, ids, correct=True), abs=0.01)


def test_look_noise_redraws_a_share_of_the_images(sets) -> None:
    (root, default), (look_root, look) = sets["default"], sets["look"]
    assert look.equals(default)
    plain, noisy = _image_bytes(root), _image_bytes(look_root)
    changed = np.mean([plain[i] != noisy[i] for i in plain])
    # 0.4 of the images draw a random class's look, their own in 1 case of 7: about 0.34.
    assert 0.15 < changed < 0.55

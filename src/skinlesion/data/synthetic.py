"""A small synthetic data set in the HAM10000 layout, for tests, demos and benchmarks.

Each class gets its own colour, size and orientation, so a model can learn it in a few steps;
the patient metadata is informative too (age and anatomical site depend on the class, sex does
not; a few values are missing as in the real data). Lesions have one to three photographs, so
lesion grouping matters as in the real data. The lesion shape has no symmetry (see
:func:`_lesion_mask`), so test-time views differ as they do on real images.

Three options make the set harder, for tests that must see a skew between training and
inference: ``look_noise`` draws some lesions with another class's look, so images do not fix the
class; ``weak_metadata`` makes age and site move the class without fixing it; ``colour_cast``
tints each photograph with its own illuminant, which colour constancy removes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from skinlesion.core.labels import CLASSES

_SITES = ("back", "face", "lower extremity", "trunk", "upper extremity", "scalp", "abdomen")
_COLOURS = [
    (200, 60, 60),
    (60, 200, 60),
    (60, 60, 200),
    (200, 200, 60),
    (40, 20, 20),
    (160, 110, 80),
    (200, 60, 200),
]


def _lesion_mask(xx: np.ndarray, yy: np.ndarray, c: int, rng: np.random.Generator) -> np.ndarray:
    """An oriented ellipse off the image centre with a satellite blob on one side.

    No flip or rotation maps it onto itself, so the 8 test-time views of an image differ and a
    view that is dropped, repeated or mis-ordered changes the prediction.
    """
    h, w = xx.shape
    cx = w * (0.40 + rng.uniform(-0.06, 0.06))
    cy = h * (0.42 + rng.uniform(-0.06, 0.06))
    r = min(w, h) * (0.2 + 0.03 * c)
    angle = np.deg2rad(25 + 10 * c + rng.normal(0, 8))
    u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    body = (u / (1.3 * r)) ** 2 + (v / (0.65 * r)) ** 2 < 1
    # The satellite sits beyond one end of the major axis and to one side of it.
    su, sv = 1.45 * r, 0.35 * r
    sx = cx + su * np.cos(angle) - sv * np.sin(angle)
    sy = cy + su * np.sin(angle) + sv * np.cos(angle)
    satellite = (xx - sx) ** 2 + (yy - sy) ** 2 < (0.35 * r) ** 2
    return body | satellite


def _patient(c: int, rng: np.random.Generator, weak: bool = False) -> dict[str, object]:
    """Age (5-year steps, 20 + 10 per class index), sex, site (one per class), some unknown.

    ``weak``: age spread 20 years around the class's mean instead of 4, and the class's own site
    on a third of the lesions only (a random site otherwise).
    """
    age = float(np.clip(5 * round((20 + 10 * c + rng.normal(0, 20 if weak else 4)) / 5), 0, 85))
    site = _SITES[c] if rng.random() > 0.1 else "unknown"
    if weak and site != "unknown" and rng.random() > 1 / 3:
        site = _SITES[int(rng.integers(0, len(_SITES)))]
    return {
        "age": age if rng.random() > 0.05 else "",
        "sex": ("male", "female")[int(rng.integers(0, 2))],
        "localization": site,
    }


def _draw(
    xx: np.ndarray,
    yy: np.ndarray,
    look: int,
    rng: np.random.Generator,
    cast_rng: np.random.Generator,
    colour_cast: float,
) -> np.ndarray:
    """One image (float pixels) of a lesion that looks like class ``look``, on skin."""
    mask = _lesion_mask(xx, yy, look, rng)
    img = np.full((*xx.shape, 3), (225, 190, 170), dtype=np.float64)
    img[mask] = _COLOURS[look]
    img += rng.normal(0, 8, img.shape)
    if colour_cast > 0:
        img *= cast_rng.uniform(1 - colour_cast, 1 + colour_cast, 3)
    return img


def make_synthetic_ham10000(
    root: str | Path,
    lesions_per_class: int = 6,
    size: tuple[int, int] = (64, 48),
    seed: int = 0,
    weak_metadata: bool = False,
    colour_cast: float = 0.0,
    look_noise: float = 0.0,
    sites: Sequence[str] = (),
) -> pd.DataFrame:
    """Write ``HAM10000_metadata.csv`` and JPEGs under ``root``; return the metadata.

    ``weak_metadata``: age and site correlate with the class without fixing it (see
    :func:`_patient`). ``colour_cast``: each image's channels are scaled by gains drawn from
    ``[1 - colour_cast, 1 + colour_cast]``, a cast that differs by image. ``look_noise``: the
    share of images drawn with the colour, size and orientation of a random class instead of
    their own. ``sites``: a ``dataset`` column (the acquisition site), lesion ``j`` of each class
    at ``sites[j % len(sites)]``. Each option draws from its own generator (``sites`` draws
    nothing): with the defaults the set is the same as before the options existed.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    # Metadata draws come from their own generator, so the images do not depend on them.
    meta_rng = np.random.default_rng(seed + 10_000)
    cast_rng = np.random.default_rng(seed + 20_000)
    look_rng = np.random.default_rng(seed + 30_000)
    parts = [root / "HAM10000_images_part_1", root / "HAM10000_images_part_2"]
    for p in parts:
        p.mkdir(parents=True, exist_ok=True)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    rows = []
    n = 0
    for c, dx in enumerate(CLASSES):
        for j in range(lesions_per_class):
            lesion = f"HAM_{c:02d}{j:04d}"
            patient = _patient(c, meta_rng, weak_metadata)
            for _ in range(int(rng.integers(1, 4))):
                image_id = f"ISIC_{9000000 + n:07d}"
                look = c
                if look_noise > 0 and look_rng.random() < look_noise:
                    look = int(look_rng.integers(0, len(CLASSES)))
                img = _draw(xx, yy, look, rng, cast_rng, colour_cast)
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(
                    parts[n % 2] / f"{image_id}.jpg", quality=92
                )
                rows.append(
                    {
                        "lesion_id": lesion,
                        "image_id": image_id,
                        "dx": dx,
                        "dx_type": "histo",
                        **patient,
                        **({"dataset": sites[j % len(sites)]} if sites else {}),
                    }
                )
                n += 1
    df = pd.DataFrame(rows)
    df.to_csv(root / "HAM10000_metadata.csv", index=False)
    return df

"""Images that are not dermoscopy, made at run time: what a model's familiarity check (refer reason
"unlike the training images") must refer. For its tests and its benchmark.

Kinds, each image named ``KIND_DETAIL``:

- ``photo``: scikit-image's bundled sample photographs and textures (astronaut, coffee, brick,
  grass, a retina, a microscope slide, ...; those that load offline; none where scikit-image is
  not installed);
- ``screenshot``: synthetic screen captures, text and boxes on a light background;
- ``crop``: the centre of a dermoscopy image (a few percent of its side) enlarged, so only
  featureless skin or lesion fills the frame;
- ``blur``: a dermoscopy image under a heavy Gaussian blur;
- ``noise``: uniform colour noise; ``flat``: one colour.

``crop`` and ``blur`` are derived from the dermoscopy images passed in (none without).

Example::

    images = nondermoscopy_images(ham_paths[:20])     # [(name, PIL image), ...]
    paths = write_nondermoscopy(tmp_dir, ham_paths[:20])
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

log = logging.getLogger(__name__)

# scikit-image's samples that ship in its wheel (the others are downloaded on first use).
SKIMAGE_SAMPLES = (
    "astronaut",
    "camera",
    "chelsea",
    "coffee",
    "coins",
    "brick",
    "grass",
    "gravel",
    "horse",
    "moon",
    "page",
    "text",
    "rocket",
    "clock",
    "logo",
    "colorwheel",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "cell",
    "binary_blobs",
    "checkerboard",
    "microaneurysms",
    "stereo_motorcycle",
)
CROP_FRACTION = 0.1
BLUR_RADIUS = 12


def _rgb8(a: np.ndarray) -> Image.Image:
    """Any sample array (bool, float, grey, RGBA) as an 8-bit RGB image."""
    a = np.asarray(a)
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        a = (255 * (a - a.min()) / (np.ptp(a) + 1e-9)).astype(np.uint8)
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(a[..., :3]))


def sample_photos(names: Sequence[str] = SKIMAGE_SAMPLES) -> list[tuple[str, Image.Image]]:
    """scikit-image's bundled samples that load offline; ``[]`` without scikit-image."""
    try:
        import skimage.data
    except ImportError:
        log.warning("scikit-image is not installed: no sample photographs")
        return []
    out = []
    for name in names:
        try:
            a = getattr(skimage.data, name)()
        except Exception as err:  # noqa: BLE001 - a sample that needs a download: skip it
            log.info("scikit-image sample %s not available offline (%s)", name, err)
            continue
        out.append((f"photo_{name}", _rgb8(a[0] if isinstance(a, tuple) else a)))
    return out


def screenshot(seed: int, size: tuple[int, int] = (800, 600)) -> Image.Image:
    """A synthetic screen capture: lines of text and coloured boxes on a light background."""
    rng = np.random.default_rng(seed)
    w, h = size
    background = tuple(int(v) for v in rng.integers(200, 256, 3))
    img = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(img)
    for j in range(25):
        x, y = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 20))
        ink = tuple(int(v) for v in rng.integers(0, 80, 3))
        draw.text((x, y), f"Lorem ipsum dolor sit amet {j}", fill=ink)
    for _ in range(6):
        x, y = int(rng.integers(0, w - 100)), int(rng.integers(0, h - 100))
        box = (x, y, x + int(rng.integers(20, 200)), y + int(rng.integers(10, 80)))
        draw.rectangle(box, outline=(0, 0, 0), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return img


def centre_crop(image: Image.Image, fraction: float = CROP_FRACTION) -> Image.Image:
    """The centre ``fraction`` of each side, enlarged back to the image's size (nearest)."""
    w, h = image.size
    cw, ch = max(2, round(w * fraction)), max(2, round(h * fraction))
    box = ((w - cw) // 2, (h - ch) // 2, (w + cw) // 2, (h + ch) // 2)
    return image.crop(box).resize((w, h), Image.Resampling.NEAREST)


def nondermoscopy_images(
    dermoscopy: Sequence[str | Path] = (),
    screenshots: int = 10,
    noise: int = 5,
    flat: int = 5,
    photos: bool = True,
    seed: int = 0,
) -> list[tuple[str, Image.Image]]:
    """``(name, image)`` of every kind (see the module's docstring); the dermoscopy images
    alternate between ``crop`` and ``blur``."""
    out = sample_photos() if photos else []
    out += [(f"screenshot_{k}", screenshot(seed + k)) for k in range(screenshots)]
    for k, path in enumerate(dermoscopy):
        img = Image.open(path).convert("RGB")
        if k % 2 == 0:
            out.append((f"crop_{Path(path).stem}", centre_crop(img)))
        else:
            blurred = img.filter(ImageFilter.GaussianBlur(BLUR_RADIUS))
            out.append((f"blur_{Path(path).stem}", blurred))
    rng = np.random.default_rng(seed + 100)
    for k in range(noise):
        out.append((f"noise_{k}", Image.fromarray(rng.integers(0, 256, (150, 200, 3), np.uint8))))
    for k in range(flat):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        out.append((f"flat_{k}", Image.new("RGB", (200, 150), colour)))
    return out


def write_nondermoscopy(
    folder: str | Path, dermoscopy: Sequence[str | Path] = (), **kw: Any
) -> list[Path]:
    """:func:`nondermoscopy_images` saved as PNG files (lossless) in ``folder``; their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, img in nondermoscopy_images(dermoscopy, **kw):
        paths.append(folder / f"{name}.png")
        img.save(paths[-1])
    return paths

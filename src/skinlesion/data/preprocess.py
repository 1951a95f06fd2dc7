"""The preprocessing spec that travels with the weights, and the one function that applies it.

The same :class:`PreprocessSpec` (stored in every checkpoint) drives the training cache,
evaluation, test-time augmentation, prediction, export and serving, so an image is prepared the
same way everywhere.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from skinlesion.core.labels import CLASSES

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


class ImageDecodeError(ValueError):
    """A file that cannot be decoded as an image; the message names the file."""


@dataclass(frozen=True)
class PreprocessSpec:
    """Input size, normalisation, interpolation, colour constancy and class names of a model."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    colour_constancy: bool = False
    class_names: tuple[str, ...] = field(default=CLASSES)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessSpec:
        return cls(
            size=int(d["size"]),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            interpolation=str(d.get("interpolation", "bicubic")),
            colour_constancy=bool(d.get("colour_constancy", False)),
            class_names=tuple(d.get("class_names", CLASSES)),
        )


def decode_image(source: str | Path | bytes | Image.Image) -> Image.Image:
    """Open a file (or bytes) as RGB, honouring EXIF orientation; raise naming the source."""
    if isinstance(source, Image.Image):
        img = source
        name = "<image>"
    else:
        name = "<bytes>" if isinstance(source, bytes) else str(source)
        try:
            img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            img.load()
        except FileNotFoundError as err:
            raise ImageDecodeError(f"{name}: file not found") from err
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise ImageDecodeError(f"{name}: not a decodable image ({err})") from err
    # A broken EXIF block must not lose the image.
    with contextlib.suppress(Exception):
        img = ImageOps.exif_transpose(img)
    if img.mode != "RGB":
        # Palette/LA/RGBA/16-bit/grayscale all become 8-bit RGB; alpha is composited on white.
        if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            bg = Image.new("RGB", rgba.size, (255, 255, 255))
            bg.paste(rgba, mask=rgba.getchannel("A"))
            img = bg
        elif img.mode.startswith("I"):
            arr = np.asarray(img, dtype=np.float64)
            peak = arr.max() if arr.max() > 0 else 1.0
            img = Image.fromarray((arr / peak * 255).astype(np.uint8)).convert("RGB")
        else:
            img = img.convert("RGB")
    return img


def prepare_image(
    source: str | Path | bytes | Image.Image,
    size: int,
    interpolation: str = "bicubic",
    colour_constancy: bool = False,
) -> np.ndarray:
    """Decode and resize to a square ``size`` x ``size`` uint8 (H, W, 3) array.

    The whole field of view is kept (no crop): a lesion near the border must not be cut off.
    """
    img = decode_image(source)
    if colour_constancy:
        from skinlesion.data.colour import shades_of_gray

        img = Image.fromarray(shades_of_gray(np.asarray(img)))
    if img.size != (size, size):
        img = img.resize((size, size), _RESAMPLE[interpolation], reducing_gap=3.0)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def prepare_with_spec(source: str | Path | bytes | Image.Image, spec: PreprocessSpec) -> np.ndarray:
    return prepare_image(source, spec.size, spec.interpolation, spec.colour_constancy)

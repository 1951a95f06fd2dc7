"""The preprocessing spec that travels with the weights, and the one function that applies it.

The same :class:`PreprocessSpec` (stored in every checkpoint) drives the training cache,
evaluation, test-time augmentation, prediction, export and serving, so an image is prepared the
same way everywhere.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from skinlesion.core.errors import ImageDecodeError
from skinlesion.core.labels import CLASSES

log = logging.getLogger(__name__)

Size = int | tuple[int, int]
"""An input size: ``S`` (square) or ``(H, W)``."""

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std (RGB, on [0, 1] pixels): one object, so they cannot be swapped."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(frozen=True)
class PreprocessSpec:
    """Input size, normalisation, interpolation, colour constancy and class names of a model."""

    size: Size
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    colour_constancy: bool = False
    class_names: tuple[str, ...] = field(default=CLASSES)

    @property
    def hw(self) -> tuple[int, int]:
        return size_hw(self.size)

    @property
    def normalization(self) -> Normalization:
        return Normalization(tuple(self.mean), tuple(self.std))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessSpec:
        return cls(
            size=size_from_plain(d["size"]),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            interpolation=str(d.get("interpolation", "bicubic")),
            colour_constancy=bool(d.get("colour_constancy", False)),
            class_names=tuple(d.get("class_names", CLASSES)),
        )


def size_hw(size: Size) -> tuple[int, int]:
    """``(H, W)`` of a size given as ``S`` or ``(H, W)``."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def size_label(size: Size) -> str:
    """``"192"`` for a square size, ``"150x200"`` (H x W) otherwise."""
    h, w = size_hw(size)
    return str(h) if h == w and isinstance(size, int) else f"{h}x{w}"


def size_from_plain(value: Any) -> Size:
    if isinstance(value, list | tuple):
        h, w = (int(v) for v in value)
        return (h, w)
    return int(value)


def _log_large(img: Image.Image, name: str) -> None:
    """One line for an image over PIL's pixel limit but under twice it (PIL decodes it and
    warns; twice the limit is refused above)."""
    limit = Image.MAX_IMAGE_PIXELS
    pixels = img.size[0] * img.size[1]
    if limit is not None and pixels > limit:
        log.warning(
            "%s: %d x %d = %d pixels, over PIL's decompression-bomb limit of %d; decoded",
            name,
            img.size[0],
            img.size[1],
            pixels,
            limit,
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
        except Image.DecompressionBombError as err:
            # Not an OSError: a file that claims more pixels than PIL's limit allows.
            raise ImageDecodeError(f"{name}: refused, too many pixels ({err})") from err
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise ImageDecodeError(f"{name}: not a decodable image ({err})") from err
        _log_large(img, name)
    # A broken EXIF block must not lose the image.
    with contextlib.suppress(Exception):
        img = ImageOps.exif_transpose(img)
    return to_rgb8(img)


def integer_range(img: Image.Image) -> float:
    """The top of the value range of an integer-mode image: its bit depth, not its content.

    ``I;16*`` modes hold 16 bits. Mode ``I`` (32-bit) is what 16-bit PNG and TIFF files decode to
    in older Pillow versions, so values that fit in 16 bits are read as 16-bit; others as 32-bit.
    """
    if img.mode.startswith("I;16"):
        return 65535.0
    arr = np.asarray(img)
    if arr.size and (arr.min() < 0 or arr.max() > 65535):
        return float(2**31 - 1)
    return 65535.0


def to_rgb8(img: Image.Image) -> Image.Image:
    """Palette/LA/RGBA/16-bit/grayscale as 8-bit RGB; alpha is composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    if img.mode.startswith("I"):
        top = integer_range(img)
        arr = np.clip(np.asarray(img, dtype=np.float64), 0.0, top)
        return Image.fromarray(np.round(arr / top * 255).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def prepare_image(
    source: str | Path | bytes | Image.Image,
    size: Size,
    interpolation: str = "bicubic",
    colour_constancy: bool = False,
) -> np.ndarray:
    """Decode and resize to a ``size`` (``S`` or ``(H, W)``) uint8 (H, W, 3) array.

    The whole field of view is kept (no crop): a lesion near the border must not be cut off.
    """
    img = decode_image(source)
    if colour_constancy:
        from skinlesion.data.colour import shades_of_gray

        img = Image.fromarray(shades_of_gray(np.asarray(img)))
    h, w = size_hw(size)
    if img.size != (w, h):
        img = img.resize((w, h), _RESAMPLE[interpolation], reducing_gap=3.0)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def prepare_with_spec(source: str | Path | bytes | Image.Image, spec: PreprocessSpec) -> np.ndarray:
    return prepare_image(source, spec.size, spec.interpolation, spec.colour_constancy)

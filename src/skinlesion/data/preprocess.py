"""The preprocessing spec that travels with the weights, and the one function that applies it.

The same :class:`PreprocessSpec` (stored in every checkpoint) drives the training cache,
evaluation, test-time augmentation, prediction, export and serving, so an image is prepared the
same way everywhere.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from skinlesion.core.errors import DataError, ImageDecodeError
from skinlesion.core.labels import CLASSES

log = logging.getLogger(__name__)

Size = int | tuple[int, int]
"""An input size: ``S`` (square) or ``(H, W)``."""

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
"""The suffixes (in any case) of the files taken as images where a folder is given."""


def image_files(paths: Sequence[str | Path]) -> list[str]:
    """``paths`` with each folder replaced by the image files in it (:data:`IMAGE_SUFFIXES`, not
    hidden, not in its sub-folders), in name order; other paths stay as given. A folder without
    one is a :class:`DataError` naming it.

    >>> image_files(["lesion.jpg"])
    ['lesion.jpg']
    """
    out: list[str] = []
    for given in paths:
        path = Path(given)
        if not path.is_dir():
            out.append(str(given))  # as given: it names the image's row
            continue
        found = sorted(
            f
            for f in path.iterdir()
            if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".") and f.is_file()
        )
        if not found:
            raise DataError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in the folder")
        out += [str(f) for f in found]
    return out


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std (RGB, on [0, 1] pixels): one object, so they cannot be swapped."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# ImageNet's per-channel statistics: timm's default for a backbone without its own.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET = Normalization(IMAGENET_MEAN, IMAGENET_STD)


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


EXACT_MAX_PIXELS = 1 << 21
"""Images of at most this many pixels (2.1 Mpx: HAM10000's 600x450, ISIC 2017, full HD) are prepared
with full-resolution maths, as every cache and model so far was. Larger ones are decoded at a
reduced scale where the format allows and colour-corrected from float32 bands, so that preparing
one costs memory bounded by its decoded size and the output, not three float64 copies of it."""

_REDUCING_GAP = 3.0
# A JPEG over the cap is decoded at 1/2, 1/4 or 1/8 scale only while it stays this many times the
# output in each direction: the same margin as ``resize(reducing_gap=3.0)`` keeps from its box
# filter, which Pillow documents as indistinguishable from a full resample.
_BAND_PIXELS = 1 << 18
# Pixels per band of rows when colour constancy streams over a large image (3 MB of float32).
_SWAPS_AXES = (
    Image.Transpose.TRANSPOSE,
    Image.Transpose.ROTATE_90,
    Image.Transpose.ROTATE_270,
    Image.Transpose.TRANSVERSE,
)
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}  # as in ImageOps.exif_transpose


@contextlib.contextmanager
def _decode_errors(name: str) -> Iterator[None]:
    """PIL's failures to open or decode ``name`` as one :class:`ImageDecodeError` naming it."""
    try:
        yield
    except FileNotFoundError as err:
        raise ImageDecodeError(f"{name}: file not found") from err
    except Image.DecompressionBombError as err:
        # Not an OSError: a file that claims more pixels than PIL's limit allows.
        raise ImageDecodeError(f"{name}: refused, too many pixels ({err})") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageDecodeError(f"{name}: not a decodable image ({err})") from err


def _open(source: str | Path | bytes | Image.Image) -> tuple[Image.Image, str]:
    """The image and its name for messages; a file or bytes are opened lazily (header only), which
    is where PIL refuses more pixels than ``Image.MAX_IMAGE_PIXELS`` allows."""
    if isinstance(source, Image.Image):
        return source, "<image>"
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    with _decode_errors(name):
        img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    _log_large(img, name)
    return img, name


def _log_large(img: Image.Image, name: str) -> None:
    """One line for an image over PIL's pixel limit but under twice it (PIL decodes it and
    warns; twice the limit is refused when it is opened)."""
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


def _load(img: Image.Image, name: str) -> None:
    with _decode_errors(name):
        img.load()


def _orientation(img: Image.Image) -> Image.Transpose | None:
    """The transposition that shows ``img`` upright by its EXIF orientation; None for none."""
    # A broken EXIF block must not lose the image.
    with contextlib.suppress(Exception):
        return _ORIENTATION.get(img.getexif().get(0x0112, 1))
    return None


def _upright(img: Image.Image) -> Image.Image:
    if _orientation(img) is None:
        return img  # no copy: exif_transpose would return one of the whole image
    with contextlib.suppress(Exception):
        img = ImageOps.exif_transpose(img)  # also drops the tag, so a second decode keeps it
    return img


def decode_image(source: str | Path | bytes | Image.Image) -> Image.Image:
    """Open a file (or bytes) as RGB, honouring EXIF orientation; raise naming the source."""
    img, name = _open(source)
    _load(img, name)
    return to_rgb8(_upright(img))


def integer_range(img: Image.Image) -> float:
    """The top of the value range of an integer-mode image: its bit depth, not its content.

    ``I;16*`` modes hold 16 bits. Mode ``I`` (32-bit) is what 16-bit PNG and TIFF files decode to
    in older Pillow versions, so values that fit in 16 bits are read as 16-bit; others as 32-bit.
    """
    if img.mode.startswith("I;16"):
        return 65535.0
    if img.width * img.height:
        low, high = img.getextrema()
        if low < 0 or high > 65535:
            return float(2**31 - 1)
    return 65535.0


def _row_boxes(img: Image.Image) -> Iterator[tuple[int, int, int, int]]:
    """Crop boxes of bands of whole rows of ``img``, each of about ``_BAND_PIXELS`` pixels."""
    rows = max(1, _BAND_PIXELS // max(1, img.width))
    for top in range(0, img.height, rows):
        yield (0, top, img.width, min(top + rows, img.height))


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
        gray = np.empty((img.height, img.width), dtype=np.uint8)
        # Band by band: float64 of the whole image would be four times a 16-bit one.
        for box in _row_boxes(img):
            arr = np.clip(np.asarray(img.crop(box), dtype=np.float64), 0.0, top)
            gray[box[1] : box[3]] = np.round(arr / top * 255)
        return Image.fromarray(gray).convert("RGB")
    return img.convert("RGB")


def _with_gains(img: Image.Image, gains: np.ndarray, in_place: bool = False) -> Image.Image:
    """``img`` with its channels scaled by ``gains``; ``in_place`` band by band, for a large image
    that the caller does not hold, instead of a second copy of it."""
    from skinlesion.data.colour import gains_lut

    lut = gains_lut(gains).ravel().tolist()
    if not in_place:
        return img.point(lut)
    for box in _row_boxes(img):
        img.paste(img.crop(box).point(lut), box)
    return img


def prepare_image(
    source: str | Path | bytes | Image.Image,
    size: Size,
    interpolation: str = "bicubic",
    colour_constancy: bool = False,
) -> np.ndarray:
    """Decode and resize to a ``size`` (``S`` or ``(H, W)``) uint8 (H, W, 3) array.

    The whole field of view is kept (no crop): a lesion near the border must not be cut off.
    Images over `EXACT_MAX_PIXELS` are prepared with bounded memory (`_prepare_large`).
    """
    img, name = _open(source)
    h, w = size_hw(size)
    if img.width * img.height > EXACT_MAX_PIXELS:
        owned = not isinstance(source, Image.Image)
        return _prepare_large(img, name, owned, (w, h), interpolation, colour_constancy)
    _load(img, name)
    img = to_rgb8(_upright(img))
    if colour_constancy:
        from skinlesion.data.colour import shades_of_gray_gains

        img = _with_gains(img, shades_of_gray_gains(np.asarray(img)))
    if img.size != (w, h):
        img = img.resize((w, h), _RESAMPLE[interpolation], reducing_gap=_REDUCING_GAP)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def _prepare_large(
    img: Image.Image,
    name: str,
    owned: bool,
    wh: tuple[int, int],
    interpolation: str,
    colour_constancy: bool,
) -> np.ndarray:
    """`prepare_image` of an image over the cap, in its stored orientation, turned at the end.

    A JPEG is decoded by libjpeg at 1/8, 1/4 or 1/2 scale, the smallest that keeps
    ``_REDUCING_GAP`` times the output; the colour-constancy gains come from float32 bands of the
    decoded image and are applied by a table; the resize reads the exact region that the reduced
    decode covers; the EXIF turn is applied to the output, not to the large image.
    """
    w, h = wh
    full = img.size
    # Asked square, so the margin holds whichever way the EXIF turn (read after loading: a PNG may
    # keep it after the pixels) puts the output. A no-op unless a JPEG not decoded yet; never
    # applied to the caller's own image object.
    side = math.ceil(max(w, h) * _REDUCING_GAP)
    drafted = img.draft(None, (side, side)) if owned else None
    _load(img, name)
    turn = _orientation(img)
    stored = (h, w) if turn in _SWAPS_AXES else (w, h)
    box = drafted[1] if drafted is not None and img.size != full else None
    rgb = to_rgb8(img)
    if colour_constancy:
        from skinlesion.data.colour import streamed_gains

        gains = streamed_gains(np.asarray(rgb.crop(b)) for b in _row_boxes(rgb))
        rgb = _with_gains(rgb, gains, in_place=owned or rgb is not img)
    img = rgb
    if img.size != stored or box is not None:
        img = img.resize(stored, _RESAMPLE[interpolation], box=box, reducing_gap=_REDUCING_GAP)
    if turn is not None:
        img = img.transpose(turn)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def prepare_with_spec(source: str | Path | bytes | Image.Image, spec: PreprocessSpec) -> np.ndarray:
    return prepare_image(source, spec.size, spec.interpolation, spec.colour_constancy)

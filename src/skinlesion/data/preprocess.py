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
class Detail:
    """The detail of a model's training images: their longer side in pixels and, where they are
    JPEGs, their JPEG quality. A larger input is reduced to it before the model's own resize
    (:func:`reduce_detail`), so the model sees the detail it learned from."""

    side: int
    jpeg_quality: int | None = None

    def __post_init__(self) -> None:
        if self.side < 16:
            raise ValueError(f"detail side must be at least 16 pixels, got {self.side}")
        if self.jpeg_quality is not None and not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"detail JPEG quality must be in 1..100, got {self.jpeg_quality}")

    @classmethod
    def parse(cls, text: str) -> Detail:
        """``"200"`` or ``"200:75"`` (longer side, JPEG quality)."""
        side, _, quality = text.partition(":")
        try:
            return cls(int(side), int(quality) if quality else None)
        except ValueError as err:
            raise ValueError(f"detail '{text}': expected SIDE or SIDE:QUALITY ({err})") from None

    def label(self) -> str:
        q = f", JPEG quality {self.jpeg_quality}" if self.jpeg_quality is not None else ""
        return f"longer side {self.side} px{q}"


@dataclass(frozen=True)
class PreprocessSpec:
    """Input size, normalisation, interpolation, colour constancy, class names and the training
    images' detail of a model."""

    size: Size
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    colour_constancy: bool = False
    class_names: tuple[str, ...] = field(default=CLASSES)
    detail: Detail | None = None
    """Reduce a larger input to this detail first; ``None``: take it as it comes (a model made
    before the detail was measured, or ``data.match_detail=false``)."""

    @property
    def hw(self) -> tuple[int, int]:
        return size_hw(self.size)

    @property
    def normalization(self) -> Normalization:
        return Normalization(tuple(self.mean), tuple(self.std))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.detail is None:
            del d["detail"]  # a spec without one reads as it did before the field existed
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
            detail=Detail(**d["detail"]) if d.get("detail") else None,
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


def _open(image: str | Path | bytes | Image.Image) -> tuple[Image.Image, str]:
    """The image and its name for messages; a file or bytes are opened lazily (header only), which
    is where PIL refuses more pixels than ``Image.MAX_IMAGE_PIXELS`` allows."""
    if isinstance(image, Image.Image):
        return image, "<image>"
    name = "<bytes>" if isinstance(image, bytes) else str(image)
    with _decode_errors(name):
        img = Image.open(io.BytesIO(image) if isinstance(image, bytes) else image)
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


def decode_image(image: str | Path | bytes | Image.Image) -> Image.Image:
    """Open a file (or bytes) as RGB, honouring EXIF orientation; raise naming the image."""
    img, name = _open(image)
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


DETAIL_MARGIN = 1.5
"""An input is reduced only when its longer side is over this many times the training images':
one within it differs in detail by less than the zoom augmentation (0.8-1.3) already trains the
model for, and reducing it costs more than it gives (ISIC 2017 test, 256 px against 200 px
thumbnails: melanoma AUROC -0.005 reduced to 200 px, -0.014 with the JPEG round trip;
docs/results.md)."""


def _detail_size(wh: tuple[int, int], detail: Detail) -> tuple[int, int] | None:
    """The (W, H) that gives ``wh`` the longer side of ``detail``; ``None`` unless it is over
    :data:`DETAIL_MARGIN` times larger."""
    return None if max(wh) <= detail.side * DETAIL_MARGIN else _scaled(wh, detail.side)


def _scaled(wh: tuple[int, int], side: int) -> tuple[int, int]:
    scale = min(1.0, side / max(wh))
    return max(1, round(wh[0] * scale)), max(1, round(wh[1] * scale))


def _jpeg_round_trip(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    out = Image.open(buf)
    out.load()
    return out.convert("RGB")


def reduce_detail(
    img: Image.Image, detail: Detail | None, box: tuple[float, float, float, float] | None = None
) -> Image.Image:
    """An RGB image over :data:`DETAIL_MARGIN` times larger than ``detail`` shrunk (bicubic) to
    its longer side and, if it has a JPEG quality, saved and read back as such a JPEG; others
    unchanged. ``box``: the region of ``img`` that stands for the whole image (a reduced JPEG
    decode), which the caller has already found large enough."""
    if detail is None:
        return img
    full = img.size if box is None else (round(box[2] - box[0]), round(box[3] - box[1]))
    if box is None and _detail_size(full, detail) is None:
        return img
    img = img.resize(
        _scaled(full, detail.side), Image.Resampling.BICUBIC, box=box, reducing_gap=_REDUCING_GAP
    )
    if detail.jpeg_quality is not None:
        img = _jpeg_round_trip(img, detail.jpeg_quality)
    return img


def jpeg_quality(img: Image.Image) -> int | None:
    """The IJG quality (1-100) a JPEG's luminance table was scaled from; ``None`` for another
    format. Estimated from the table's sum against the standard table, as ImageMagick does."""
    tables = getattr(img, "quantization", None)
    if not tables or 0 not in tables:
        return None
    scale = 100.0 * sum(tables[0]) / sum(_IJG_LUMINANCE)
    quality = (200.0 - scale) / 2.0 if scale <= 100.0 else 5000.0 / scale
    return int(min(100, max(1, round(quality))))


# The IJG standard luminance quantisation table (JPEG Annex K), which quality scales.
_IJG_LUMINANCE = (
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
)  # fmt: skip


def measure_detail(paths: Sequence[str | Path], sample: int = 500, seed: int = 0) -> Detail:
    """The detail of a set of training images from a seeded sample of their headers: the median
    longer side and the median JPEG quality of those that are JPEGs (``None`` if under half)."""
    paths = list(paths)
    if not paths:
        raise ValueError("measure_detail needs at least one image")
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(paths), min(sample, len(paths)), replace=False)
    sides, qualities = [], []
    for i in sorted(picked.tolist()):
        with Image.open(paths[i]) as img:
            sides.append(max(img.size))
            q = jpeg_quality(img)
        if q is not None:
            qualities.append(q)
    quality = int(np.median(qualities)) if len(qualities) * 2 >= len(sides) else None
    return Detail(int(np.median(sides)), quality)


def _finish(
    img: Image.Image, wh: tuple[int, int], interpolation: str, colour_constancy: bool
) -> np.ndarray:
    """Colour constancy, then the model's own resize: the last steps of every path."""
    if colour_constancy:
        from skinlesion.data.colour import shades_of_gray_gains

        img = _with_gains(img, shades_of_gray_gains(np.asarray(img)))
    if img.size != wh:
        img = img.resize(wh, _RESAMPLE[interpolation], reducing_gap=_REDUCING_GAP)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def prepare_image(
    image: str | Path | bytes | Image.Image,
    size: Size,
    interpolation: str = "bicubic",
    colour_constancy: bool = False,
    detail: Detail | None = None,
) -> np.ndarray:
    """Decode and resize to a ``size`` (``S`` or ``(H, W)``) uint8 (H, W, 3) array; an image
    larger than ``detail`` is first reduced to it (:func:`reduce_detail`).

    The whole field of view is kept (no crop): a lesion near the border must not be cut off.
    Images over `EXACT_MAX_PIXELS` are prepared with bounded memory (`_prepare_large`).
    """
    img, name = _open(image)
    h, w = size_hw(size)
    if img.width * img.height > EXACT_MAX_PIXELS:
        owned = not isinstance(image, Image.Image)
        return _prepare_large(img, name, owned, (w, h), interpolation, colour_constancy, detail)
    _load(img, name)
    img = reduce_detail(to_rgb8(_upright(img)), detail)
    return _finish(img, (w, h), interpolation, colour_constancy)


def _prepare_large(
    img: Image.Image,
    name: str,
    owned: bool,
    wh: tuple[int, int],
    interpolation: str,
    colour_constancy: bool,
    detail: Detail | None = None,
) -> np.ndarray:
    """`prepare_image` of an image over the cap, in its stored orientation, turned at the end.
    With a ``detail`` the image is first reduced to it (from the region the reduced decode
    covers), turned, and finished as a small image.

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
    if detail is not None and _detail_size(full, detail) is not None:
        small = reduce_detail(rgb, detail, box or (0, 0, *rgb.size))
        small = small.transpose(turn) if turn is not None else small
        return _finish(small, (w, h), interpolation, colour_constancy)
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


def prepare_with_spec(image: str | Path | bytes | Image.Image, spec: PreprocessSpec) -> np.ndarray:
    return prepare_image(image, spec.size, spec.interpolation, spec.colour_constancy, spec.detail)

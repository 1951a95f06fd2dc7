"""Checks on an uploaded image before any decoding work: not empty, not over the byte limit, a
format PIL recognises from the content (never the file name), and not over the pixel limit
(a small file that decodes to a huge image is a decompression bomb)."""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

# Raster formats a dermoscopic image arrives in; anything else PIL could open (PDF, EPS, ...)
# has no business here.
ALLOWED_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP", "GIF", "MPO")


class UploadError(ValueError):
    """An upload the service refuses; ``status`` is the HTTP code to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class UploadLimits:
    """Largest upload in bytes and largest image in pixels (width x height) the service takes."""

    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.max_pixels <= 0:
            raise ValueError(f"upload limits must be positive, got {self}")


def _bomb_message(err: Image.DecompressionBombError, limits: UploadLimits) -> str:
    """The refusal of an image PIL will not open at all (over twice ``Image.MAX_IMAGE_PIXELS``),
    in the service's terms: the limit named is the service's ``max_pixels`` (PIL's own limit
    only where ``max_pixels`` is set above it, as that is then the limit in force)."""
    limit = limits.max_pixels
    if Image.MAX_IMAGE_PIXELS is not None:
        limit = min(limit, 2 * Image.MAX_IMAGE_PIXELS)
    # PIL: "Image size (N pixels) exceeds limit of M pixels, could be decompression bomb ...".
    found = re.search(r"\((\d+) pixels\)", str(err))
    image = f"image of {found.group(1)} pixels" if found else "image"
    return f"{image} is over the limit of {limit} pixels (decompression bomb)"


def check_upload(data: bytes, limits: UploadLimits) -> tuple[str, tuple[int, int]]:
    """The image format and (width, height) of an acceptable upload; raise :class:`UploadError`
    saying what is wrong otherwise. Reads the header only: no pixel is decoded here."""
    if not data:
        raise UploadError(400, "empty upload: the request carried no image bytes")
    if len(data) > limits.max_bytes:
        raise UploadError(
            413, f"upload of {len(data)} bytes is over the limit of {limits.max_bytes} bytes"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt, size = img.format or "", img.size
    except Image.DecompressionBombError as err:
        raise UploadError(413, _bomb_message(err, limits)) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise UploadError(
            415,
            "not an image: the content is not in a format the service reads "
            f"({', '.join(ALLOWED_FORMATS)})",
        ) from err
    if fmt not in ALLOWED_FORMATS:
        raise UploadError(
            415, f"unsupported image format {fmt}: send one of {', '.join(ALLOWED_FORMATS)}"
        )
    w, h = size
    if w * h > limits.max_pixels:
        raise UploadError(
            413,
            f"image of {w}x{h} = {w * h} pixels is over the limit of {limits.max_pixels} pixels",
        )
    return fmt, size

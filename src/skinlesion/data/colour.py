"""Shades-of-Gray colour constancy (Finlayson & Trezzi 2004).

Dermoscopes differ in illuminant and white balance; normalising each image's illuminant, as
Barata et al. (2015) and the ISIC 2019 winners do with the Minkowski power p = 6, removes that
device-dependent cast. The illuminant of channel c is e_c = mean(I_c ** p) ** (1 / p) and each
channel is scaled by mean(e) / e_c: corrected illuminants are equal and a gray image is unchanged.
(The common ISIC reference code scales by the RMS of e instead of its mean; that differs only by a
global brightness factor, which leaves the casts removed the same.)

Example::

    img = shades_of_gray(np.asarray(Image.open(path).convert("RGB")))
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

# Below this an illuminant estimate is treated as zero, so black channels get gain 1, not inf.
_EPS = 1e-12


def _check_power(power: float) -> None:
    if not (np.isfinite(power) and power > 0):
        raise ValueError(f"power must be a finite positive number, got {power}")


def _check_image(img: np.ndarray, name: str) -> None:
    if img.dtype != np.uint8:
        raise TypeError(f"{name} expects a uint8 image, got {img.dtype}")
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"{name} expects (H, W, 3), got shape {img.shape}")


def _gains(illum: np.ndarray) -> np.ndarray:
    safe = np.maximum(illum, _EPS)
    return np.where(illum > _EPS, illum.mean() / safe, 1.0)


def shades_of_gray_gains(img: np.ndarray, power: float = 6.0) -> np.ndarray:
    """The (3,) float64 channel gains of one uint8 (H, W, 3) RGB image, from every pixel in float64.

    Costs 8 bytes a value: meant for images of a bounded size (see `streamed_gains` otherwise).
    """
    _check_image(img, "shades_of_gray")
    _check_power(power)
    # Scale to [0, 1] before the power so that 255 ** p cannot lose precision or overflow. In place:
    # the same values as ``(img / 255.0) ** power`` with one float64 copy instead of three.
    x = img.astype(np.float64)
    x /= 255.0
    np.power(x, power, out=x)
    return _gains(np.mean(x, axis=(0, 1)) ** (1.0 / power))


def streamed_gains(bands: Iterable[np.ndarray], power: float = 6.0) -> np.ndarray:
    """The (3,) float64 channel gains of an image given as uint8 (h, W, 3) bands of rows.

    Each band is raised to the power in float32 and summed in float64, so memory is bounded by one
    band whatever the image size. Agrees with `shades_of_gray_gains` to about 1e-6 relative: x ** 6
    of a value in [0, 1] keeps float32's 24-bit relative precision, and the sums are in float64.
    """
    _check_power(power)
    total = np.zeros(3, dtype=np.float64)
    count = 0
    for band in bands:
        _check_image(band, "streamed_gains")
        x = band.astype(np.float32)
        x /= np.float32(255.0)
        np.power(x, np.float32(power), out=x)
        total += x.sum(axis=(0, 1), dtype=np.float64)
        count += band.shape[0] * band.shape[1]
    if count == 0:
        return np.ones(3, dtype=np.float64)
    return _gains((total / count) ** (1.0 / power))


def gains_lut(gains: np.ndarray) -> np.ndarray:
    """The (3, 256) uint8 table that applies channel gains to 8-bit values.

    Entry [c, v] is ``rint(clip(v / 255 * gains[c] * 255, 0, 255))``: the same float64 operations as
    scaling every pixel, so applying the table is byte-identical to doing so, for 768 values of work
    instead of one float64 copy of the image.
    """
    v = np.arange(256, dtype=np.float64) / 255.0
    out = np.clip(v[:, None] * np.asarray(gains, dtype=np.float64) * 255.0, 0.0, 255.0)
    return np.ascontiguousarray(np.rint(out).astype(np.uint8).T)


def apply_gains(img: np.ndarray, gains: np.ndarray) -> np.ndarray:
    """Scale the channels of a uint8 (H, W, 3) image by ``gains`` (rounded, clipped to [0, 255])."""
    _check_image(img, "apply_gains")
    lut = gains_lut(gains)
    out = np.empty_like(img)
    for c in range(3):
        out[..., c] = lut[c][img[..., c]]
    return out


def shades_of_gray(img: np.ndarray, power: float = 6.0) -> np.ndarray:
    """Colour-correct one uint8 (H, W, 3) RGB image; returns uint8 (H, W, 3)."""
    return apply_gains(img, shades_of_gray_gains(img, power))

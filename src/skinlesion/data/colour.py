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

import numpy as np
import torch

# Below this an illuminant estimate is treated as zero, so black channels get gain 1, not inf.
_EPS = 1e-12


def _check_power(power: float) -> None:
    if not (np.isfinite(power) and power > 0):
        raise ValueError(f"power must be a finite positive number, got {power}")


def shades_of_gray(img: np.ndarray, power: float = 6.0) -> np.ndarray:
    """Colour-correct one uint8 (H, W, 3) RGB image; returns uint8 (H, W, 3)."""
    if img.dtype != np.uint8:
        raise TypeError(f"shades_of_gray expects a uint8 image, got {img.dtype}")
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"shades_of_gray expects (H, W, 3), got shape {img.shape}")
    _check_power(power)
    # Scale to [0, 1] before the power so that 255 ** p cannot lose precision or overflow.
    x = img.astype(np.float64) / 255.0
    illum = np.mean(x**power, axis=(0, 1)) ** (1.0 / power)
    safe = np.maximum(illum, _EPS)
    gains = np.where(illum > _EPS, illum.mean() / safe, 1.0)
    out = np.clip(x * gains * 255.0, 0.0, 255.0)
    return np.rint(out).astype(np.uint8)


def shades_of_gray_batch(x: torch.Tensor, power: float = 6.0) -> torch.Tensor:
    """Colour-correct a float (B, 3, H, W) batch in [0, 1], each image on its own illuminant.

    Same maths as `shades_of_gray`; computed in at least float32 and returned in the input dtype.
    """
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"shades_of_gray_batch expects (B, 3, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"shades_of_gray_batch expects a float tensor in [0, 1], got {x.dtype}")
    _check_power(power)
    work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    xw = x.to(work)
    # clamp: a negative value to a fractional power is NaN.
    illum = xw.clamp(min=0.0).pow(power).mean(dim=(2, 3), keepdim=True).pow(1.0 / power)
    safe = illum.clamp(min=_EPS)
    gains = torch.where(illum > _EPS, illum.mean(dim=1, keepdim=True) / safe, 1.0)
    return (xw * gains).clamp(0.0, 1.0).to(x.dtype)

"""Batched on-device augmentation: geometry, camera (blur, tone, cast), detail (shrink and
enlarge, JPEG), colour jitter, normalisation and TTA views.

Images come from a uint8 cache already resized to the model's input size, so a batch is moved to
the device once and every random transform below runs there, batched, with per-sample parameters.
The same code is the CPU path. 16-bit float inputs are augmented in float32 internally (grid
coordinates in half precision are off by ~0.1 px at 224 px) and returned in their own dtype.

Example::

    x = to_float(batch_u8.to(device))
    x = augment_batch(x, AugmentConfig(), generator=gen)
    x = normalize(x, mean=IMAGENET_MEAN, std=IMAGENET_STD)  # from skinlesion.data.preprocess
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from skinlesion.core.config import AugmentConfig  # the one definition, also the config section

# ITU-R BT.601 luma weights, as torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)
# RGB -> YIQ (NTSC); a hue shift is a rotation of the (I, Q) chroma plane at constant luma Y.
_RGB_TO_YIQ = (
    (0.299, 0.587, 0.114),
    (0.596, -0.274, -0.322),
    (0.211, -0.523, 0.312),
)
# Order of the uniform draws per sample. All are drawn whatever the config, so the random stream,
# and thus every other parameter, does not change when one magnitude is switched off.
_N_DRAWS = 9
_HFLIP, _VFLIP, _ANGLE, _SCALE, _P_COLOUR, _BRIGHT, _CONTRAST, _SAT, _HUE = range(_N_DRAWS)
# Draws of the field-of-view transforms, taken after the 9 above and only when one is switched on,
# so configs without them keep their random stream.
_N_EXTRA = 5
_X_ASPECT, _X_P_VIGNETTE, _X_RADIUS, _X_SOFT, _X_DARK = range(_N_EXTRA)
# Draws of the camera transforms (blur, tone curve, colour cast), taken after those above and only
# when one of them is switched on, for the same reason.
_N_CAMERA = 6
_C_P_BLUR, _C_SIGMA, _C_GAMMA, _C_GAIN_R, _C_GAIN_G, _C_GAIN_B = range(_N_CAMERA)
# Draws of the detail transforms (shrink and enlarge back, JPEG round trip), taken last and only
# when one of them is switched on.
_N_DETAIL = 4
_D_P_DOWN, _D_FACTOR, _D_P_JPEG, _D_QUALITY = range(_N_DETAIL)


def to_float(
    batch_u8: torch.Tensor, channels_last_input: bool = True, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Convert a uint8 batch (B, H, W, 3), or (B, 3, H, W) if not channels-last, to (B, 3, H, W)
    floats in [0, 1]. Move the uint8 batch to the device first: it is 4x smaller than floats."""
    if batch_u8.dtype != torch.uint8:
        raise TypeError(f"to_float expects a uint8 tensor, got {batch_u8.dtype}")
    if batch_u8.ndim != 4:
        raise ValueError(f"to_float expects a 4-D batch, got shape {tuple(batch_u8.shape)}")
    x = batch_u8.permute(0, 3, 1, 2) if channels_last_input else batch_u8
    if x.shape[1] != 3:
        layout = "(B, H, W, 3)" if channels_last_input else "(B, 3, H, W)"
        raise ValueError(f"to_float expects {layout}, got shape {tuple(batch_u8.shape)}")
    # contiguous() so later convolutions see the usual NCHW layout rather than a permuted view.
    return (x.to(dtype) / 255.0).contiguous()


def affine_theta(
    angle_deg: torch.Tensor,
    scale: torch.Tensor,
    flip_x: torch.Tensor,
    flip_y: torch.Tensor,
    height: int,
    width: int,
    stretch: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample (B, 2, 3) matrices for `F.affine_grid`: a counter-clockwise rotation by
    `angle_deg` (as displayed, y down), zoom by `scale` (>1 zooms in) and flips (`flip_*` True
    mirrors that axis), all about the image centre. `stretch` (B,) widens the content by
    sqrt(stretch) and narrows its height by the same factor (area kept), after the rotation.

    The matrix maps output to input coordinates, so it is the inverse of the image transform.
    Rotation is done in pixel units, so non-square images are not sheared.
    """
    rad = angle_deg * (math.pi / 180.0)
    cos, sin = torch.cos(rad), torch.sin(rad)
    one = torch.ones_like(cos)
    fx = torch.where(flip_x, -one, one)
    fy = torch.where(flip_y, -one, one)
    aspect = height / width  # normalised coords are per-axis, so rescale the off-diagonal terms
    # Input = R(-angle) @ diag(fx, fy) @ output / scale; a flip folded in as the sign of a column.
    theta = torch.zeros(angle_deg.shape[0], 2, 3, dtype=cos.dtype, device=cos.device)
    theta[:, 0, 0] = cos * fx / scale
    theta[:, 0, 1] = -sin * aspect * fy / scale
    theta[:, 1, 0] = sin / aspect * fx / scale
    theta[:, 1, 1] = cos * fy / scale
    if stretch is not None:
        # Output x is divided by sqrt(stretch) before the inverse rotation: content widens.
        root = torch.sqrt(stretch)
        theta[:, :, 0] = theta[:, :, 0] / root.unsqueeze(1)
        theta[:, :, 1] = theta[:, :, 1] * root.unsqueeze(1)
    return theta


def _geometry(
    x: torch.Tensor, u: torch.Tensor, cfg: AugmentConfig, extra: torch.Tensor | None
) -> torch.Tensor:
    """Flips, rotation, zoom and stretch as one resampling pass; `u` and `extra` hold the
    per-sample uniform draws."""
    no_stretch = cfg.aspect == (1.0, 1.0)
    if (
        cfg.hflip == 0
        and cfg.vflip == 0
        and cfg.rotation == 0
        and cfg.scale == (1.0, 1.0)
        and no_stretch
    ):
        return x
    lo, hi = cfg.scale
    angle = (2.0 * u[:, _ANGLE] - 1.0) * cfg.rotation
    scale = lo + (hi - lo) * u[:, _SCALE]
    stretch = None
    if not no_stretch and extra is not None:
        a_lo, a_hi = (math.log(v) for v in cfg.aspect)
        stretch = torch.exp(a_lo + (a_hi - a_lo) * extra[:, _X_ASPECT])
    theta = affine_theta(
        angle,
        scale,
        u[:, _HFLIP] < cfg.hflip,
        u[:, _VFLIP] < cfg.vflip,
        x.shape[-2],
        x.shape[-1],
        stretch,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(
        x, grid, mode="bilinear", padding_mode="reflection", align_corners=False
    ).clamp_(0.0, 1.0)


def vignette_mask(
    height: int, width: int, radius: torch.Tensor, softness: torch.Tensor
) -> torch.Tensor:
    """(B, 1, H, W) weights, 1 inside a centred circle and falling to 0 outside it.

    `radius` and `softness` (B,) are in units of half the shorter side, so a radius of 1 touches
    the shorter edges and ``hypot(1, long / short)`` (the half-diagonal) reaches the corners.
    """
    dev, dt = radius.device, radius.dtype
    half = min(height, width) / 2.0
    ys = (torch.arange(height, device=dev, dtype=dt) + 0.5 - height / 2.0) / half
    xs = (torch.arange(width, device=dev, dtype=dt) + 0.5 - width / 2.0) / half
    dist = torch.sqrt(ys.view(-1, 1) ** 2 + xs.view(1, -1) ** 2).unsqueeze(0)
    edge = (radius.view(-1, 1, 1) - dist) / softness.view(-1, 1, 1)
    return torch.sigmoid(edge).unsqueeze(1)


def _vignette(x: torch.Tensor, cfg: AugmentConfig, extra: torch.Tensor | None) -> torch.Tensor:
    """Darken the outside of a random circle on the samples chosen by `cfg.vignette`."""
    if cfg.vignette == 0 or extra is None:
        return x
    h, w = x.shape[-2], x.shape[-1]
    corner = math.hypot(1.0, max(h, w) / min(h, w))
    radius = 1.0 + (corner - 1.0) * extra[:, _X_RADIUS]
    softness = 0.01 + 0.07 * extra[:, _X_SOFT]
    mask = vignette_mask(h, w, radius, softness)
    dark = _per_sample(0.12 * extra[:, _X_DARK])  # black to a dim gray outside the field
    out = x * mask + dark * (1.0 - mask)
    return torch.where(_per_sample(extra[:, _X_P_VIGNETTE] < cfg.vignette), out, x)


def _per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of a (B, 3, H, W) batch, shape (B, 1, H, W)."""
    r, g, b = x.unbind(dim=1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Multiply each sample by its (B,) factor, clamped to [0, 1]."""
    return (x * _per_sample(factor)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend each sample with the mean of its grayscale by its (B,) factor, clamped to [0, 1]."""
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return torch.lerp(mean, x, _per_sample(factor)).clamp_(0.0, 1.0)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend each sample with its grayscale by its (B,) factor (0 gives gray), clamped."""
    return torch.lerp(grayscale(x), x, _per_sample(factor)).clamp_(0.0, 1.0)


def hue_matrices(shift: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) RGB matrices rotating hue by `shift` turns in YIQ space, at constant luma."""
    # Build in float64 so that a zero shift gives the identity to ~1e-16, then cast.
    yiq = torch.tensor(_RGB_TO_YIQ, dtype=torch.float64, device=shift.device)
    # Minus sign: R, G, B sit clockwise in the I-Q plane, and a positive shift should move
    # red towards green as an HSV hue shift does.
    rad = -2.0 * math.pi * shift.to(torch.float64)
    cos, sin = torch.cos(rad), torch.sin(rad)
    rot = torch.zeros(shift.shape[0], 3, 3, dtype=torch.float64, device=shift.device)
    rot[:, 0, 0] = 1.0
    rot[:, 1, 1], rot[:, 1, 2] = cos, -sin
    rot[:, 2, 1], rot[:, 2, 2] = sin, cos
    return (torch.linalg.inv(yiq) @ rot @ yiq).to(shift.dtype)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each sample's hue by its (B,) shift in turns, clamped to [0, 1]."""
    m = hue_matrices(shift).to(x.dtype)
    return torch.einsum("bij,bjhw->bihw", m, x).clamp_(0.0, 1.0)


def _colour(x: torch.Tensor, u: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """Brightness, contrast, saturation, hue (fixed order) on the samples chosen by p_colour."""
    if cfg.p_colour == 0 or not (cfg.brightness or cfg.contrast or cfg.saturation or cfg.hue):
        return x
    out = x
    # Factors clamp at 0, as torchvision's ColorJitter does for magnitudes above 1.
    if cfg.brightness:
        out = adjust_brightness(out, (1.0 + (2.0 * u[:, _BRIGHT] - 1.0) * cfg.brightness).clamp(0))
    if cfg.contrast:
        out = adjust_contrast(out, (1.0 + (2.0 * u[:, _CONTRAST] - 1.0) * cfg.contrast).clamp(0))
    if cfg.saturation:
        out = adjust_saturation(out, (1.0 + (2.0 * u[:, _SAT] - 1.0) * cfg.saturation).clamp(0))
    if cfg.hue:
        out = adjust_hue(out, (2.0 * u[:, _HUE] - 1.0) * cfg.hue)
    if cfg.p_colour >= 1.0:
        return out
    # A select rather than identity parameters: untouched samples stay bit-exact.
    return torch.where(_per_sample(u[:, _P_COLOUR] < cfg.p_colour), out, x)


def _camera_on(cfg: AugmentConfig) -> bool:
    return cfg.blur > 0 or cfg.gamma != (1.0, 1.0) or cfg.channel_gain > 0


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each sample of a (B, C, H, W) batch with its own (B,) standard deviation in pixels,
    a separable Gaussian with reflected borders; a sigma of 0 leaves the sample as it is."""
    b, c, h, w = x.shape
    radius = max(1, math.ceil(3.0 * float(sigma.max())))
    if radius >= min(h, w):
        raise ValueError(f"gaussian_blur: sigma {float(sigma.max()):.2f} is too large for {h}x{w}")
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    s = sigma.to(x.dtype).clamp(min=1e-6).view(-1, 1)
    kernel = torch.exp(-0.5 * (taps.view(1, -1) / s) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (B, K); sigma ~0 gives a unit impulse
    kernel = kernel.repeat_interleave(c, dim=0)  # one kernel per (sample, channel) group
    flat = x.reshape(1, b * c, h, w)
    flat = F.pad(flat, (radius, radius, 0, 0), mode="reflect")
    flat = F.conv2d(flat, kernel.view(b * c, 1, 1, -1), groups=b * c)
    flat = F.pad(flat, (0, 0, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel.view(b * c, 1, -1, 1), groups=b * c)
    return flat.view(b, c, h, w)


def _camera(x: torch.Tensor, cfg: AugmentConfig, cam: torch.Tensor | None) -> torch.Tensor:
    """Colour cast, tone curve and blur: what another camera or illuminant changes."""
    if cam is None:
        return x
    out = x
    if cfg.channel_gain > 0:
        gains = 1.0 + (2.0 * cam[:, _C_GAIN_R : _C_GAIN_B + 1] - 1.0) * cfg.channel_gain
        gains = gains / gains.mean(dim=1, keepdim=True)  # a cast, not a brightness change
        out = (out * gains.view(-1, 3, 1, 1)).clamp_(0.0, 1.0)
    if cfg.gamma != (1.0, 1.0):
        g_lo, g_hi = (math.log(v) for v in cfg.gamma)
        gamma = torch.exp(g_lo + (g_hi - g_lo) * cam[:, _C_GAMMA])
        out = out.clamp(min=1e-6) ** _per_sample(gamma)
    if cfg.blur > 0:
        lo, hi = cfg.blur_sigma
        sigma = lo + (hi - lo) * cam[:, _C_SIGMA]
        sigma = torch.where(cam[:, _C_P_BLUR] < cfg.blur, sigma, torch.zeros_like(sigma))
        if bool((sigma > 0).any()):
            out = torch.where(_per_sample(sigma > 0), gaussian_blur(out, sigma), out)
    return out


def _detail_on(cfg: AugmentConfig) -> bool:
    return cfg.downscale > 0 or cfg.jpeg > 0


def shrink_and_enlarge(x: torch.Tensor, factor: float) -> torch.Tensor:
    """A (1, 3, H, W) sample shrunk by ``factor`` (antialiased) and enlarged back (bicubic): the
    same size with the detail of a ``factor`` times smaller image."""
    h, w = x.shape[-2:]
    small = (max(1, round(h * factor)), max(1, round(w * factor)))
    down = F.interpolate(x, size=small, mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(down, size=(h, w), mode="bicubic", align_corners=False).clamp(0.0, 1.0)


def jpeg_round_trip(x: torch.Tensor, quality: int) -> torch.Tensor:
    """A (1, 3, H, W) sample in [0, 1] encoded as a JPEG of ``quality`` and decoded again."""
    from torchvision.io import decode_jpeg, encode_jpeg

    u8 = (x[0].detach().float().cpu() * 255.0).round().clamp(0, 255).to(torch.uint8)
    back = decode_jpeg(encode_jpeg(u8, quality=int(quality)))
    return (back.to(device=x.device, dtype=x.dtype) / 255.0).unsqueeze(0)


def _detail(x: torch.Tensor, cfg: AugmentConfig, det: torch.Tensor | None) -> torch.Tensor:
    """Detail lost by a smaller or compressed copy, per sample (each its own factor, quality)."""
    if det is None:
        return x
    lo, hi = (math.log(v) for v in cfg.downscale_range)
    q_lo, q_hi = cfg.jpeg_quality
    rows = []
    for i in range(x.shape[0]):
        sample = x[i : i + 1]
        if float(det[i, _D_P_DOWN]) < cfg.downscale:
            sample = shrink_and_enlarge(sample, math.exp(lo + (hi - lo) * float(det[i, _D_FACTOR])))
        if float(det[i, _D_P_JPEG]) < cfg.jpeg:
            quality = min(q_hi, q_lo + math.floor((q_hi - q_lo + 1) * float(det[i, _D_QUALITY])))
            sample = jpeg_round_trip(sample, quality)
        rows.append(sample)
    return torch.cat(rows)


def augment_batch(
    x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Randomly flip, rotate, zoom, blur, cast, coarsen, compress and colour-jitter a float
    (B, 3, H, W) batch in [0, 1].

    Every sample gets its own parameters, drawn on the generator's device (the input's device if
    no generator) and moved to the input's, so a seeded generator reproduces the batch. Returns a
    new tensor of the same shape and dtype, clamped to [0, 1].
    """
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"augment_batch expects (B, 3, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(
            f"augment_batch expects a float tensor in [0, 1], got {x.dtype}; use to_float first"
        )
    work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    draw_device = generator.device if generator is not None else x.device
    u = torch.rand(x.shape[0], _N_DRAWS, generator=generator, device=draw_device)
    u = u.to(device=x.device, dtype=work)
    extra = None
    if cfg.aspect != (1.0, 1.0) or cfg.vignette > 0:
        extra = torch.rand(x.shape[0], _N_EXTRA, generator=generator, device=draw_device)
        extra = extra.to(device=x.device, dtype=work)
    cam = None
    if _camera_on(cfg):
        cam = torch.rand(x.shape[0], _N_CAMERA, generator=generator, device=draw_device)
        cam = cam.to(device=x.device, dtype=work)
    det = None
    if _detail_on(cfg):
        det = torch.rand(x.shape[0], _N_DETAIL, generator=generator, device=draw_device)
        det = det.to(device=x.device, dtype=work)
    out = x.to(work)
    out = _geometry(out, u, cfg, extra)
    out = _camera(out, cfg, cam)
    out = _detail(out, cfg, det)
    out = _colour(out, u, cfg)
    out = _vignette(out, cfg, extra)
    # clamp also covers the identity config, where inputs slightly outside [0, 1] pass through.
    return out.clamp(0.0, 1.0).to(x.dtype)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Per-channel `(x - mean) / std` for a (B, C, H, W) batch."""
    if len(mean) != x.shape[1] or len(std) != x.shape[1]:
        raise ValueError(
            f"normalize got {len(mean)} means and {len(std)} stds for {x.shape[1]} channels"
        )
    if any(s <= 0 for s in std):
        raise ValueError(f"normalize needs positive stds, got {tuple(std)}")
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def tta_views(x: torch.Tensor, n: int) -> list[torch.Tensor]:
    """The first `n` of the 8 dihedral views of a (..., H, W) batch, in the order identity,
    hflip, vflip, rot90, rot180, rot270, transpose, anti-transpose (rot90 as `torch.rot90`,
    counter-clockwise).

    A non-square batch gets the 4 views that keep its shape instead: identity, hflip, vflip,
    rot180, so the model sees the aspect it was trained on."""
    if not 1 <= n <= 8:
        raise ValueError(f"tta_views needs n in 1..8 (the 8 dihedral transforms), got {n}")
    h, w = -2, -1
    if x.shape[h] != x.shape[w]:
        if n > 4:
            raise ValueError(
                f"tta_views: a non-square batch {tuple(x.shape[-2:])} has 4 shape-keeping views, "
                f"asked for {n}"
            )
        keep = (
            lambda t: t,
            lambda t: t.flip(w),
            lambda t: t.flip(h),
            lambda t: t.rot90(2, (h, w)),
        )
        return [view(x) for view in keep[:n]]
    views = (
        lambda t: t,
        lambda t: t.flip(w),
        lambda t: t.flip(h),
        lambda t: t.rot90(1, (h, w)),
        lambda t: t.rot90(2, (h, w)),
        lambda t: t.rot90(3, (h, w)),
        lambda t: t.transpose(h, w),
        lambda t: t.rot90(2, (h, w)).transpose(h, w),
    )
    return [view(x) for view in views[:n]]

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from skinlesion.data.augment import (
    AugmentConfig,
    adjust_hue,
    adjust_saturation,
    affine_theta,
    augment_batch,
    gaussian_blur,
    grayscale,
    jpeg_round_trip,
    normalize,
    shrink_and_enlarge,
    to_float,
    tta_views,
)

IDENTITY = AugmentConfig(
    hflip=0.0,
    vflip=0.0,
    rotation=0.0,
    scale=(1.0, 1.0),
    brightness=0.0,
    contrast=0.0,
    saturation=0.0,
    hue=0.0,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(b: int = 4, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=_gen(seed))


def _smooth_image(h: int = 32, w: int = 32) -> torch.Tensor:
    """A non-symmetric, colourful (1, 3, H, W) image with no clipped values."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    img = torch.stack([0.2 + 0.6 * xx, 0.2 + 0.6 * yy * yy, 0.5 + 0.3 * torch.sin(5 * xx * yy)])
    return img.unsqueeze(0)


def test_to_float_layouts() -> None:
    u8 = torch.randint(0, 256, (2, 8, 6, 3), dtype=torch.uint8, generator=_gen(0))
    x = to_float(u8)
    assert x.shape == (2, 3, 8, 6) and x.dtype == torch.float32
    assert torch.equal(x, u8.permute(0, 3, 1, 2).float() / 255)
    assert torch.equal(to_float(u8.permute(0, 3, 1, 2), channels_last_input=False), x)
    assert to_float(u8, dtype=torch.float64).dtype == torch.float64
    with pytest.raises(TypeError):
        to_float(u8.float())
    with pytest.raises(ValueError):
        to_float(u8, channels_last_input=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_shape_dtype_range(dtype: torch.dtype) -> None:
    x = _batch(4, 24, 40).to(dtype)
    y = augment_batch(x, AugmentConfig(brightness=0.8, contrast=0.8), generator=_gen(1))
    assert y.shape == x.shape and y.dtype == dtype
    assert not torch.isnan(y).any()
    assert y.min() >= 0 and y.max() <= 1
    assert not torch.equal(y, x)


def test_per_sample_parameters_differ() -> None:
    x = _smooth_image().expand(16, -1, -1, -1).contiguous()
    y = augment_batch(x, AugmentConfig(), generator=_gen(2))
    for i, j in itertools.combinations(range(16), 2):
        assert (y[i] - y[j]).abs().max() > 1e-3, (i, j)


def test_reproducible_with_generator() -> None:
    x = _batch()
    cfg = AugmentConfig(p_colour=0.5)
    a = augment_batch(x, cfg, generator=_gen(7))
    b = augment_batch(x, cfg, generator=_gen(7))
    c = augment_batch(x, cfg, generator=_gen(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_identity_config_is_identity() -> None:
    x = _batch()
    y = augment_batch(x, IDENTITY, generator=_gen(0))
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)
    # Also through the resampling path: zero rotation with a trivial zoom range still resamples.
    y = augment_batch(x, AugmentConfig(**{**vars(IDENTITY), "rotation": 1e-9}), generator=_gen(0))
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("field", "dims"), [("hflip", (-1,)), ("vflip", (-2,))])
def test_flip_is_exact(field: str, dims: tuple[int, ...]) -> None:
    x = _batch(3, 20, 28)
    y = augment_batch(x, AugmentConfig(**{**vars(IDENTITY), field: 1.0}), generator=_gen(0))
    # Sampling points land on pixel centres (align_corners=False), so only rounding remains.
    torch.testing.assert_close(y, x.flip(dims), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("angle", "k"), [(90.0, 1), (-90.0, 3), (180.0, 2)])
def test_rotation_matches_rot90(angle: float, k: int) -> None:
    x = _batch(2, 16, 16)
    theta = affine_theta(
        torch.full((2,), angle),
        torch.ones(2),
        torch.zeros(2, dtype=torch.bool),
        torch.zeros(2, dtype=torch.bool),
        16,
        16,
    )
    grid = F.affine_grid(theta, [2, 3, 16, 16], align_corners=False)
    y = F.grid_sample(x, grid, padding_mode="reflection", align_corners=False)
    torch.testing.assert_close(y, x.rot90(k, (-2, -1)), atol=1e-5, rtol=0)


def test_rotation_of_non_square_is_not_sheared() -> None:
    x = _batch(1, 12, 20)
    theta = affine_theta(
        torch.tensor([90.0]), torch.ones(1), torch.tensor([False]), torch.tensor([False]), 12, 20
    )
    y = F.grid_sample(
        x, F.affine_grid(theta, [1, 3, 12, 20], align_corners=False), align_corners=False
    )
    # The central 12x12 square rotates onto itself.
    torch.testing.assert_close(y[..., 4:16], x[..., 4:16].rot90(1, (-2, -1)), atol=1e-5, rtol=0)


def test_augment_rotation_keeps_centre() -> None:
    # Any rotation and flip is about the image centre, so the central pixels stay put.
    x = _smooth_image()
    cfg = AugmentConfig(**{**vars(IDENTITY), "rotation": 180.0, "hflip": 0.5, "vflip": 0.5})
    y = augment_batch(x.expand(8, -1, -1, -1), cfg, generator=_gen(3))
    centre = (slice(None), slice(None), slice(15, 17), slice(15, 17))
    torch.testing.assert_close(
        y[centre].mean((2, 3)), x[centre].mean((2, 3)).expand(8, -1), atol=2e-2, rtol=0
    )


def test_zoom_in_magnifies() -> None:
    x = _smooth_image()
    cfg = AugmentConfig(**{**vars(IDENTITY), "scale": (2.0, 2.0)})
    y = augment_batch(x, cfg, generator=_gen(0))
    # Zoom 2 about the centre shows the central 16x16 at twice the size. Border pixels differ:
    # interpolate clamps at the crop edge where grid_sample still sees the pixels beyond it.
    ref = F.interpolate(x[..., 8:24, 8:24], size=(32, 32), mode="bilinear", align_corners=False)
    inner = (..., slice(1, -1), slice(1, -1))
    torch.testing.assert_close(y[inner], ref[inner], atol=1e-5, rtol=0)


def test_hue_zero_and_saturation_one_are_identity() -> None:
    x = _batch()
    torch.testing.assert_close(adjust_hue(x, torch.zeros(4)), x, atol=1e-6, rtol=0)
    torch.testing.assert_close(adjust_saturation(x, torch.ones(4)), x, atol=1e-7, rtol=0)


def test_saturation_zero_is_gray() -> None:
    y = adjust_saturation(_batch(), torch.zeros(4))
    torch.testing.assert_close(y[:, 0], y[:, 1], atol=1e-7, rtol=0)
    torch.testing.assert_close(y[:, 1], y[:, 2], atol=1e-7, rtol=0)


def test_hue_keeps_luma_and_turns_red_towards_green() -> None:
    # Mid-range colours so that nothing clips.
    x = 0.35 + 0.3 * _batch(2, 8, 8)
    y = adjust_hue(x, torch.tensor([0.1, -0.3]))
    torch.testing.assert_close(grayscale(y), grayscale(x), atol=1e-5, rtol=0)
    assert not torch.allclose(y, x, atol=1e-2)
    red = torch.tensor([0.6, 0.3, 0.3]).view(1, 3, 1, 1)
    shifted = adjust_hue(red, torch.tensor([0.05]))[0, :, 0, 0]
    assert shifted[1] > shifted[2]
    # A full turn is the identity.
    torch.testing.assert_close(adjust_hue(x, torch.ones(2)), x, atol=1e-5, rtol=0)


def test_p_colour_zero_leaves_colour_untouched() -> None:
    x = _batch()
    cfg = AugmentConfig(**{**vars(IDENTITY), "brightness": 0.5, "hue": 0.2, "p_colour": 0.0})
    assert torch.equal(augment_batch(x, cfg, generator=_gen(0)), x)
    # With p=0.5 some samples are jittered and the rest are bit-exact.
    cfg = AugmentConfig(**{**vars(IDENTITY), "brightness": 0.5, "hue": 0.2, "p_colour": 0.5})
    y = augment_batch(_batch(32), cfg, generator=_gen(0))
    same = (y == _batch(32)).flatten(1).all(1)
    assert 0 < same.sum() < 32


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="hflip"):
        AugmentConfig(hflip=1.5)
    with pytest.raises(ValueError, match="scale"):
        AugmentConfig(scale=(1.2, 0.9))
    with pytest.raises(ValueError, match="brightness"):
        AugmentConfig(brightness=-0.1)
    with pytest.raises(TypeError):
        augment_batch(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), AugmentConfig())


def test_normalize() -> None:
    x = _batch()
    y = normalize(x, (0.5, 0.4, 0.3), (0.2, 0.25, 0.5))
    torch.testing.assert_close(y[:, 1], (x[:, 1] - 0.4) / 0.25)
    with pytest.raises(ValueError):
        normalize(x, (0.5,), (0.2,))


def test_tta_views() -> None:
    x = _batch(2, 8, 8)
    views = tta_views(x, 8)
    assert len(views) == 8
    for a, b in itertools.combinations(views, 2):
        assert not torch.equal(a, b)
    r = (-2, -1)
    expected = [
        x,
        x.flip(-1),
        x.flip(-2),
        x.rot90(1, r),
        x.rot90(2, r),
        x.rot90(3, r),
        x.transpose(-2, -1),
        x.flip(-2).rot90(1, r),
    ]
    for view, ref in zip(views, expected, strict=True):
        assert torch.equal(view, ref)
    # The anti-transpose maps pixel (i, j) to (W-1-j, H-1-i).
    assert torch.equal(views[7][..., 0, 0], x[..., 7, 7])
    assert torch.equal(views[7][..., 0, 7], x[..., 0, 7])
    assert len(tta_views(x, 3)) == 3
    for n in (0, 9):
        with pytest.raises(ValueError, match="1..8"):
            tta_views(x, n)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    x = _batch(8, 64, 64)
    gen_cpu = _gen(5)
    y_cpu = augment_batch(x, AugmentConfig(), generator=gen_cpu)
    # A CPU generator draws the same parameters whatever device the batch is on.
    y_gpu = augment_batch(x.cuda(), AugmentConfig(), generator=_gen(5))
    assert y_gpu.device.type == "cuda"
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, atol=1e-4, rtol=0)
    gen_cuda = torch.Generator(device="cuda").manual_seed(5)
    a = augment_batch(x.cuda(), AugmentConfig(), generator=gen_cuda)
    b = augment_batch(x.cuda(), AugmentConfig(), generator=torch.Generator("cuda").manual_seed(5))
    assert torch.equal(a, b)
    for dtype in (torch.float16, torch.bfloat16):
        assert augment_batch(x.cuda().to(dtype), AugmentConfig()).dtype == dtype


def test_camera_draws_keep_the_random_stream() -> None:
    # The camera transforms draw after the others: switched on with a vanishing blur, every
    # geometry and colour parameter of a seed stays the same.
    x = _batch(6, 32, 32)
    plain = augment_batch(x, AugmentConfig(), generator=_gen(3))
    near_identity = AugmentConfig(blur=1.0, blur_sigma=(1e-4, 1e-4))
    torch.testing.assert_close(
        augment_batch(x, near_identity, generator=_gen(3)), plain, atol=1e-5, rtol=0
    )


def test_gaussian_blur_matches_torchvision() -> None:
    from torchvision.transforms.functional import gaussian_blur as tv_blur

    x = _batch(2, 24, 30)
    ours = gaussian_blur(x, torch.tensor([0.8, 1.6]))
    for i, sigma in enumerate((0.8, 1.6)):
        # Same reflected borders; torchvision's kernel of 2 * ceil(3 * sigma) + 1 taps.
        k = 2 * math.ceil(3 * 1.6) + 1
        ref = tv_blur(x[i : i + 1], kernel_size=[k, k], sigma=[sigma, sigma])
        torch.testing.assert_close(ours[i : i + 1], ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="too large"):
        gaussian_blur(x, torch.tensor([9.0, 1.0]))


def test_blur_probability_blurs_some_samples_only() -> None:
    x = _batch(32, 32, 32)
    cfg = AugmentConfig(**{**vars(IDENTITY), "blur": 0.5, "blur_sigma": (1.0, 2.0)})
    y = augment_batch(x, cfg, generator=_gen(4))
    same = [(y[i] - x[i]).abs().max() < 1e-6 for i in range(32)]
    assert 4 < sum(same) < 28
    # A blurred sample of white noise loses most of its high-frequency energy.
    diffs = [
        float(y[i].diff(dim=-1).abs().mean() / x[i].diff(dim=-1).abs().mean()) for i in range(32)
    ]
    assert all(d < 0.6 for d, s in zip(diffs, same, strict=True) if not s)


def test_gamma_is_a_power_curve() -> None:
    x = _batch(3, 16, 16)
    y = augment_batch(
        x, AugmentConfig(**{**vars(IDENTITY), "gamma": (2.0, 2.0)}), generator=_gen(0)
    )
    torch.testing.assert_close(y, x.clamp(min=1e-6) ** 2, atol=1e-6, rtol=0)


def test_channel_gain_is_a_cast_not_a_brightness_change() -> None:
    x = torch.full((64, 3, 8, 8), 0.5)
    y = augment_batch(
        x, AugmentConfig(**{**vars(IDENTITY), "channel_gain": 0.2}), generator=_gen(5)
    )
    gains = y.mean(dim=(2, 3)) / 0.5  # (B, 3)
    torch.testing.assert_close(gains.mean(dim=1), torch.ones(64), atol=1e-5, rtol=0)
    assert gains.std(dim=1).min() > 1e-3  # every sample gets a cast
    assert gains.max() <= 1.2 / 0.8 + 1e-5 and gains.min() >= 0.8 / 1.2 - 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_camera_transforms_keep_dtype_and_range(dtype: torch.dtype) -> None:
    cfg = AugmentConfig(blur=0.5, gamma=(0.7, 1.4), channel_gain=0.15)
    y = augment_batch(_batch(8, 24, 40).to(dtype), cfg, generator=_gen(6))
    assert y.dtype == dtype and not torch.isnan(y).any()
    assert y.min() >= 0 and y.max() <= 1


def test_camera_config_validation() -> None:
    for bad in (
        {"blur_sigma": (1.5, 0.3)},
        {"gamma": (0.0, 1.0)},
        {"channel_gain": 1.0},
        {"blur": 1.5},
    ):
        with pytest.raises(ValueError):
            AugmentConfig(**bad)
    assert AugmentConfig.model_validate({"gamma": [0.8, 1.2]}).gamma == (0.8, 1.2)


def test_downscale_is_a_shrunk_and_enlarged_copy_at_its_rate() -> None:
    """``downscale`` is the probability, ``downscale_range`` the factor (log-uniform)."""
    x = _batch(16, 32, 32)
    cfg = AugmentConfig(**{**vars(IDENTITY), "downscale": 1.0, "downscale_range": (0.5, 0.5)})
    y = augment_batch(x, cfg, generator=_gen(8))
    for i in range(len(x)):
        torch.testing.assert_close(y[i : i + 1], shrink_and_enlarge(x[i : i + 1], 0.5))
    half = AugmentConfig(**{**vars(IDENTITY), "downscale": 0.5, "downscale_range": (0.5, 0.5)})
    y = augment_batch(x, half, generator=_gen(8))
    kept = sum(bool(torch.equal(y[i], x[i])) for i in range(len(x)))
    assert 2 < kept < 14


def test_jpeg_is_a_round_trip_at_a_quality_of_its_range() -> None:
    """``jpeg`` is the probability, ``jpeg_quality`` the range of qualities."""
    x = _batch(6, 32, 32)
    cfg = AugmentConfig(**{**vars(IDENTITY), "jpeg": 1.0, "jpeg_quality": (40, 40)})
    y = augment_batch(x, cfg, generator=_gen(9))
    for i in range(len(x)):
        torch.testing.assert_close(y[i : i + 1], jpeg_round_trip(x[i : i + 1], 40))
    assert not torch.equal(jpeg_round_trip(x[:1], 40), jpeg_round_trip(x[:1], 90))
    off = AugmentConfig(**{**vars(IDENTITY), "jpeg": 0.0, "jpeg_quality": (40, 40)})
    assert torch.equal(augment_batch(x, off, generator=_gen(9)), x)

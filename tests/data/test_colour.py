import numpy as np
import pytest

from skinlesion.data.colour import (
    shades_of_gray,
    shades_of_gray_gains,
    streamed_gains,
)


def _illuminant(img: np.ndarray, power: float = 6.0) -> np.ndarray:
    x = img.astype(np.float64)
    return np.mean(x**power, axis=(0, 1)) ** (1.0 / power)


def _textured(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """A colourful uint8 image kept within [40, 200], so a +-20% cast does not clip."""
    rng = np.random.default_rng(seed)
    return rng.integers(40, 200, size=(h, w, 3), dtype=np.uint8)


def test_gray_image_unchanged() -> None:
    rng = np.random.default_rng(1)
    gray = np.repeat(rng.integers(0, 256, size=(32, 40, 1), dtype=np.uint8), 3, axis=2)
    assert np.array_equal(shades_of_gray(gray), gray)


def test_colour_cast_is_removed() -> None:
    base = _textured()
    cast = np.clip(np.rint(base * np.array([1.2, 1.0, 0.8])), 0, 255).astype(np.uint8)
    est_before = _illuminant(cast)
    assert est_before.max() / est_before.min() > 1.3
    out = shades_of_gray(cast)
    est = _illuminant(out)
    assert est.max() / est.min() < 1.01


def test_numpy_dtype_and_shape() -> None:
    img = _textured(17, 23)
    out = shades_of_gray(img)
    assert out.shape == img.shape and out.dtype == np.uint8


def test_black_image_and_black_channel() -> None:
    black = np.zeros((8, 8, 3), dtype=np.uint8)
    assert np.array_equal(shades_of_gray(black), black)
    # One empty channel keeps its zeros; the others stay finite.
    img = _textured(8, 8)
    img[..., 2] = 0
    out = shades_of_gray(img)
    assert (out[..., 2] == 0).all()
    est = _illuminant(out)
    assert abs(est[0] / est[1] - 1) < 0.01


def test_invalid_inputs() -> None:
    with pytest.raises(TypeError):
        shades_of_gray(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError):
        shades_of_gray(np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(ValueError):
        shades_of_gray(np.zeros((4, 4, 3), dtype=np.uint8), power=0)


def _old_shades_of_gray(img: np.ndarray, power: float) -> np.ndarray:
    """The per-pixel float64 maths that the gains table replaced."""
    x = img.astype(np.float64) / 255.0
    illum = np.mean(x**power, axis=(0, 1)) ** (1.0 / power)
    gains = np.where(illum > 1e-12, illum.mean() / np.maximum(illum, 1e-12), 1.0)
    return np.rint(np.clip(x * gains * 255.0, 0.0, 255.0)).astype(np.uint8)


@pytest.mark.parametrize("power", [6.0, 2.5, 1.0])
def test_gains_table_byte_identical_to_per_pixel_maths(power: float) -> None:
    rng = np.random.default_rng(3)
    for seed in range(4):
        img = _textured(37, 53, seed)
        # Strong casts: some gains > 1 push values past 255, so the clip is exercised.
        cast = np.clip(img * rng.uniform(0.5, 1.6, 3), 0, 255).astype(np.uint8)
        cast[0, 0] = [255, 0, 128]
        assert np.array_equal(shades_of_gray(cast, power), _old_shades_of_gray(cast, power))
    black_channel = _textured(9, 11)
    black_channel[..., 2] = 0
    assert np.array_equal(shades_of_gray(black_channel), _old_shades_of_gray(black_channel, 6.0))


def test_streamed_float32_gains_agree_with_float64_gains() -> None:
    img = np.clip(_textured(90, 70, 5) * np.array([1.3, 1.0, 0.6]), 0, 255).astype(np.uint8)
    exact = shades_of_gray_gains(img)
    assert np.ptp(exact) > 0.3  # a cast to remove, not gains near 1
    for rows in (1, 7, 90):
        bands = (img[r : r + rows] for r in range(0, img.shape[0], rows))
        np.testing.assert_allclose(streamed_gains(bands), exact, rtol=1e-6, atol=0)
    assert np.array_equal(streamed_gains([np.zeros((4, 5, 3), np.uint8)]), np.ones(3))
    assert np.array_equal(streamed_gains([]), np.ones(3))
    with pytest.raises(ValueError, match="power"):
        streamed_gains([img], power=-1)

"""Decoding any image to the model's RGB square, and the spec that travels with the weights."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skinlesion.core.labels import CLASSES
from skinlesion.data.preprocess import (
    ImageDecodeError,
    PreprocessSpec,
    decode_image,
    prepare_image,
    prepare_with_spec,
)

S = 24


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _check(arr: np.ndarray, size: int = S) -> None:
    assert arr.shape == (size, size, 3)
    assert arr.dtype == np.uint8
    assert arr.flags["C_CONTIGUOUS"]


def test_rgb_resized_to_square() -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(150, 200, 3), dtype=np.uint8)
    out = prepare_image(Image.fromarray(arr), S)
    _check(out)
    # The whole field of view is kept: a coarse left/right split survives the squash.
    split = np.zeros((150, 200, 3), dtype=np.uint8)
    split[:, 100:] = 255
    out = prepare_image(Image.fromarray(split), S)
    assert (out[:, : S // 2 - 2] == 0).all()
    assert (out[:, S // 2 + 2 :] == 255).all()


def test_same_size_is_untouched() -> None:
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, size=(S, S, 3), dtype=np.uint8)
    assert np.array_equal(prepare_image(Image.fromarray(arr), S), arr)


def test_rgba_alpha_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((20, 30, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red everywhere
    rgba[:, :15, 3] = 255  # left half opaque, right half fully transparent
    path = tmp_path / "a.png"
    Image.fromarray(rgba, "RGBA").save(path)
    out = prepare_image(path, 30)
    _check(out, 30)
    assert out[10, 2].tolist() == [200, 0, 0]
    assert out[10, 27].tolist() == [255, 255, 255]


def test_grayscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    gray = np.tile(np.linspace(0, 255, 40).astype(np.uint8), (30, 1))
    path = tmp_path / "g.png"
    Image.fromarray(gray, "L").save(path)
    out = prepare_image(path, S)
    _check(out)
    assert np.array_equal(out[..., 0], out[..., 1])
    assert np.array_equal(out[..., 0], out[..., 2])
    assert out[0, 0, 0] < 30 and out[0, -1, 0] > 225


def test_palette_image(tmp_path: Path) -> None:
    img = Image.new("P", (20, 20), 1)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    img.paste(0, (0, 0, 10, 20))  # left half palette 0 (red), right half 1 (blue)
    path = tmp_path / "p.png"
    img.save(path)
    with Image.open(path) as stored:
        assert stored.mode == "P"
    out = prepare_image(path, 20)
    _check(out, 20)
    assert out[5, 2].tolist() == [255, 0, 0]
    assert out[5, 17].tolist() == [0, 0, 255]


def test_palette_transparency_composited_on_white() -> None:
    img = Image.new("P", (10, 10), 0)
    img.putpalette([0, 255, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    img.info["transparency"] = 0
    out = prepare_image(_png_bytes(img), 10)
    assert (out == 255).all()


def test_sixteen_bit_image(tmp_path: Path) -> None:
    ramp = np.tile(np.linspace(0, 65535, 40).astype(np.uint16), (30, 1))
    path = tmp_path / "i16.png"
    Image.fromarray(ramp).save(path)
    with Image.open(path) as stored:
        assert stored.mode == "I;16"
    out = prepare_image(path, S)
    _check(out)
    assert np.array_equal(out[..., 0], out[..., 2])
    # A full-range 16-bit ramp fills the 8-bit range (scaled by bit depth), monotone left to right.
    assert out[0, 0, 0] < 20 and out[0, -1, 0] > 235
    assert (np.diff(out[S // 2, :, 0].astype(int)) >= 0).all()


@pytest.mark.parametrize("mode", ["1", "LA", "CMYK", "I", "F"])
def test_other_modes_become_rgb(mode: str) -> None:
    _check(prepare_image(Image.new(mode, (30, 20)), S))


def test_text_file_named_jpg(tmp_path: Path) -> None:
    path = tmp_path / "ISIC_0000001.jpg"
    path.write_text("lesion_id,image_id,dx\n")
    with pytest.raises(ImageDecodeError, match="ISIC_0000001.jpg") as info:
        prepare_image(path, S)
    assert "not a decodable image" in str(info.value)


def test_truncated_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "cut.jpg"
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (60, 60, 3), dtype=np.uint8)).save(path, "JPEG")
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ImageDecodeError, match="cut.jpg"):
        prepare_image(path, S)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.jpg"
    with pytest.raises(ImageDecodeError, match="nope.jpg: file not found"):
        prepare_image(path, S)
    with pytest.raises(ImageDecodeError, match="nope.jpg"):
        prepare_image(str(path), S)


def test_bytes_input_equals_file_input(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    path = tmp_path / "x.jpg"
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(path, "JPEG")
    from_bytes = prepare_image(path.read_bytes(), S)
    _check(from_bytes)
    assert np.array_equal(from_bytes, prepare_image(path, S))
    with pytest.raises(ImageDecodeError, match="<bytes>"):
        prepare_image(b"garbage", S)


def test_exif_orientation_is_applied() -> None:
    # Stored 40 wide x 20 high, a red marker at the stored top-left, blue elsewhere.
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif, quality=95)
    data = buf.getvalue()

    assert decode_image(data).size == (20, 40)  # displayed upright: 20 wide x 40 high
    out = prepare_image(data, 20)
    # Rotating 90 degrees clockwise moves the stored top-left corner to the top-right.
    top_right, top_left = out[2, 17], out[2, 2]
    assert top_right[0] > 200 and top_right[2] < 60
    assert top_left[2] > 200 and top_left[0] < 60


def test_broken_exif_keeps_the_image() -> None:
    img = Image.new("RGB", (30, 20), (10, 200, 30))
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=b"Exif\x00\x00garbage-not-tiff")
    out = prepare_image(buf.getvalue(), 20)
    _check(out, 20)
    assert abs(int(out[10, 10, 1]) - 200) < 10


def test_colour_constancy_equalises_channel_illuminants() -> None:
    rng = np.random.default_rng(4)
    base = rng.integers(60, 180, size=(S, S, 3)).astype(np.float64)
    cast = np.clip(base * [1.3, 1.0, 0.7], 0, 255).astype(np.uint8)
    out = prepare_image(Image.fromarray(cast), S, colour_constancy=True).astype(np.float64)
    illum = np.mean((out / 255) ** 6, axis=(0, 1)) ** (1 / 6)
    assert illum.max() - illum.min() < 0.02
    assert np.array_equal(prepare_image(Image.fromarray(cast), S), cast)


def test_interpolation_choice_matters() -> None:
    rng = np.random.default_rng(5)
    img = Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8))
    assert not np.array_equal(prepare_image(img, S, "bilinear"), prepare_image(img, S, "bicubic"))
    with pytest.raises(KeyError):
        prepare_image(img, S, "lanczos-ish")


def test_spec_round_trip_and_hashable() -> None:
    spec = PreprocessSpec(
        size=260,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        interpolation="bilinear",
        colour_constancy=True,
    )
    d = spec.to_dict()
    assert d["mean"] == [0.485, 0.456, 0.406]
    assert d["class_names"] == list(CLASSES)
    # Plain types only: survives JSON (and so a weights_only checkpoint).
    again = PreprocessSpec.from_dict(json.loads(json.dumps(d)))
    assert again == spec
    assert hash(again) == hash(spec)
    assert {spec: 1}[again] == 1
    assert hash(spec) != hash(PreprocessSpec(size=300, mean=spec.mean, std=spec.std))
    with pytest.raises(AttributeError):
        spec.size = 1  # type: ignore[misc]


def test_spec_from_minimal_dict_uses_defaults() -> None:
    spec = PreprocessSpec.from_dict({"size": "96", "mean": [0.5] * 3, "std": [0.25] * 3})
    assert spec.size == 96
    assert spec.interpolation == "bicubic"
    assert spec.colour_constancy is False
    assert spec.class_names == CLASSES
    hash(spec)


def test_prepare_with_spec_follows_the_spec() -> None:
    rng = np.random.default_rng(6)
    img = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    spec = PreprocessSpec(size=32, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear")
    assert np.array_equal(prepare_with_spec(img, spec), prepare_image(img, 32, "bilinear"))

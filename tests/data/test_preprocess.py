"""Decoding any image to the model's RGB square, and the spec that travels with the weights."""

from __future__ import annotations

import functools
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import HAM_DIR, ISIC_DIR, requires_ham, requires_isic
from PIL import Image, ImageOps

from skinlesion.core.labels import CLASSES
from skinlesion.data.preprocess import (
    EXACT_MAX_PIXELS,
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


# -- bounded memory: the old maths under the pixel cap, a reduced decode over it ------------------

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def _old_prepare(
    source: Path | bytes | Image.Image, size: int | tuple[int, int], interpolation: str, cc: bool
) -> np.ndarray:
    """``prepare_image`` as it was before large images got their own path: full-size float64."""
    if isinstance(source, Image.Image):
        img = source
    else:
        img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        img.load()
    img = ImageOps.exif_transpose(img).convert("RGB")
    if cc:
        x = np.asarray(img).astype(np.float64) / 255.0
        illum = np.mean(x**6.0, axis=(0, 1)) ** (1.0 / 6.0)
        gains = np.where(illum > 1e-12, illum.mean() / np.maximum(illum, 1e-12), 1.0)
        img = Image.fromarray(np.rint(np.clip(x * gains * 255.0, 0.0, 255.0)).astype(np.uint8))
    h, w = (size, size) if isinstance(size, int) else size
    if img.size != (w, h):
        img = img.resize((w, h), _RESAMPLE[interpolation], reducing_gap=3.0)
    return np.asarray(img)


def _jpeg(arr: np.ndarray, orientation: int = 1, quality: int = 92) -> bytes:
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality, exif=exif)
    return buf.getvalue()


def _lesion_like(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth colour-cast skin, a darker blob, sensor noise and the dermoscope's black vignette
    (sharp edges and saturated highlights: where a reduced decode or clipping would show)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 1, (6, 8, 3)).astype(np.float32)
    smooth = np.asarray(
        Image.fromarray((coarse * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC),
        dtype=np.float32,
    )
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = np.hypot((yy - h / 2) / (h / 2), (xx - w / 2) / (w / 2))
    skin = np.array([235.0, 170.0, 140.0]) * 0.75 + 0.35 * smooth
    skin *= np.where(r < 0.35, 0.55, 1.0)[..., None]  # the lesion
    skin += rng.normal(0, 4, skin.shape)
    skin *= (r < 0.97)[..., None]  # the vignette
    return np.clip(skin, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("cc", [False, True])
@pytest.mark.parametrize(
    ("hw", "orientation", "size", "interpolation"),
    [
        ((150, 200), 1, (150, 200), "bicubic"),  # the HAM10000 copy at its own training size
        ((450, 600), 1, 224, "bicubic"),  # HAM10000 as released
        ((450, 600), 6, (96, 64), "bilinear"),  # turned by EXIF
        ((1024, 2048), 1, 160, "bicubic"),  # exactly at the cap
    ],
)
def test_images_up_to_the_cap_are_prepared_byte_for_byte_as_before(
    hw: tuple[int, int], orientation: int, size: int | tuple[int, int], interpolation: str, cc: bool
) -> None:
    h, w = hw
    assert h * w <= EXACT_MAX_PIXELS
    # A strong cast: the gains push the red channel past 255, so clipping is exercised too.
    arr = np.clip(_lesion_like(h, w, seed=h) * np.array([1.15, 0.9, 0.6]), 0, 255).astype(np.uint8)
    data = _jpeg(arr, orientation)
    out = prepare_image(data, size, interpolation, cc)
    assert np.array_equal(out, _old_prepare(data, size, interpolation, cc))


def _real_images(folder: Path, pattern: str, n: int) -> list[Path]:
    paths = sorted(folder.glob(pattern))
    assert paths, f"no images under {folder}"
    return paths[:: max(1, len(paths) // n)][:n]


@requires_ham
@pytest.mark.parametrize("size", [(150, 200), 224, 32])
def test_real_ham10000_prepared_as_before(size: int | tuple[int, int]) -> None:
    for path in _real_images(HAM_DIR, "HAM10000_images_part_*/*.jpg", 12):
        for cc in (False, True):
            assert np.array_equal(
                prepare_image(path, size, "bicubic", cc), _old_prepare(path, size, "bicubic", cc)
            ), path


@requires_isic
@pytest.mark.parametrize("size", [256, 224, 32])
def test_real_isic2017_prepared_as_before(size: int) -> None:
    for path in _real_images(ISIC_DIR / "images", "*.jpg", 12):
        for cc in (False, True):
            assert np.array_equal(
                prepare_image(path, size, "bicubic", cc), _old_prepare(path, size, "bicubic", cc)
            ), path


# Over the cap, the reduced JPEG decode (libjpeg's DCT scaling, where the old path used a box
# filter) moves sharp edges (the vignette, a lesion border) by a few grey levels; float32 gains from
# the reduced image differ from float64 full-size ones by under 1e-3. Measured: mean 0.17, at most
# 1% of values more than 1 level apart, max 5. Sizes here are divided evenly by the old path's box
# filter: where they are not, its partial last block is off by up to 9 levels at the bottom and
# right edges, and the new path is the closer one to a full resample (next test).
_MEAN_LEVELS = 0.25
_FRACTION_OVER_1 = 0.02
_MAX_LEVELS = 6


def _assert_close(new: np.ndarray, ref: np.ndarray) -> None:
    assert new.shape == ref.shape
    diff = np.abs(new.astype(int) - ref.astype(int))
    stats = (diff.mean(), (diff > 1).mean(), diff.max())
    assert diff.mean() <= _MEAN_LEVELS, stats
    assert (diff > 1).mean() <= _FRACTION_OVER_1, stats
    assert diff.max() <= _MAX_LEVELS, stats


@functools.cache
def _large_jpeg(h: int, w: int, orientation: int) -> bytes:
    data = _jpeg(_lesion_like(h, w, seed=7), orientation)
    assert h * w > EXACT_MAX_PIXELS
    return data


@pytest.mark.parametrize(
    ("orientation", "size", "cc"),
    [(1, 96, False), (1, 96, True), (1, 224, True), (6, 96, True), (3, (144, 96), False)],
)
def test_large_jpeg_close_to_the_old_maths(
    orientation: int, size: int | tuple[int, int], cc: bool
) -> None:
    data = _large_jpeg(2016, 2016, orientation)
    _assert_close(prepare_image(data, size, "bicubic", cc), _old_prepare(data, size, "bicubic", cc))


@pytest.mark.parametrize(("orientation", "size"), [(1, 64), (6, (64, 48))])
def test_large_jpeg_keeps_the_geometry_of_a_full_resample(
    orientation: int, size: int | tuple[int, int]
) -> None:
    # 2043 / 8 is not whole: the reduced decode's last column is partial, and resizing without
    # the exact region it covers stretches the image (a vignette edge moves by up to 39 levels).
    data = _large_jpeg(2047, 2043, orientation)
    h, w = (size, size) if isinstance(size, int) else size
    full = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    _assert_close(
        prepare_image(data, size), np.asarray(full.resize((w, h), Image.Resampling.BICUBIC))
    )


def test_large_image_object_of_the_caller_is_left_alone() -> None:
    # Over the cap the gains are applied in place, which must never reach the caller's image.
    arr = np.clip(_lesion_like(1500, 1500, seed=2) * np.array([1.2, 1.0, 0.7]), 0, 255)
    img = Image.fromarray(arr.astype(np.uint8))
    before = np.asarray(img).copy()
    out = prepare_image(img, 64, colour_constancy=True)
    assert np.array_equal(np.asarray(img), before)
    _assert_close(out, _old_prepare(img, 64, "bicubic", True))


def test_large_jpeg_over_pils_pixel_limit_is_still_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _large_jpeg(2016, 2016, 1)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", EXACT_MAX_PIXELS // 2)  # 4 Mpx > 2 x limit
    with pytest.raises(ImageDecodeError, match="<bytes>: refused, too many pixels"):
        prepare_image(data, 64)


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_integer_image_converted_band_by_band_as_whole(mode: str) -> None:
    # 800 x 700 is three bands of rows; mode I holds values over 16 bits, so it scales by 2**31 - 1.
    rng = np.random.default_rng(8)
    top = 65535 if mode == "I;16" else 2**31 - 1
    arr = rng.integers(0, top, size=(800, 700), dtype=np.int64)
    img = Image.fromarray(arr.astype(np.uint16 if mode == "I;16" else np.int32))
    assert img.mode == mode
    whole = np.round(np.clip(arr.astype(np.float64), 0, top) / top * 255).astype(np.uint8)
    out = np.asarray(decode_image(img))
    assert np.array_equal(out[..., 0], whole) and np.array_equal(out[..., 2], whole)


_MEMORY_CHILD = """
import resource, sys
from skinlesion.data import colour  # before the baseline
from skinlesion.data.preprocess import prepare_image


def peak_bytes():
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent through fork and exec.
    try:
        with open("/proc/self/status") as fh:
            return next(int(x.split()[1]) * 1024 for x in fh if x.startswith("VmHWM:"))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS


# torch's 700 MB of mapped libraries could be paged out under pressure, hiding the growth.
assert "torch" not in sys.modules
before = peak_bytes()
out = prepare_image(sys.argv[1], 224, "bicubic", sys.argv[2] == "1")
after = peak_bytes()
assert out.shape == (224, 224, 3) and out.std() > 10, out.std()
print(after - before)
"""

_HUGE = (7300, 5500)  # (W, H): 40 Mpx, the service's pixel limit
_HUGE_DECODED = _HUGE[0] * _HUGE[1] * 3  # 120 MB as 8-bit RGB


@pytest.fixture(scope="module")
def huge_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 40-Mpx JPEG (baseline, about 0.8 MB) and PNG of smooth gradients with a colour cast."""
    ramp = Image.linear_gradient("L")
    bands = [ramp.resize(_HUGE), ramp.rotate(90).resize(_HUGE), ramp.rotate(45).resize(_HUGE)]
    img = Image.merge(
        "RGB", [b.point(lambda v, k=k: 40 + v * (6 - k) // 8) for k, b in enumerate(bands)]
    )
    folder = tmp_path_factory.mktemp("huge")
    paths = {"JPEG": folder / "huge.jpg", "PNG": folder / "huge.png"}
    img.save(paths["JPEG"], quality=90)
    img.save(paths["PNG"], compress_level=1)
    return paths


def _peak_bytes(path: Path, colour_constancy: bool) -> int:
    """The growth of the peak resident memory of a fresh process preparing ``path`` at 224 px: the
    C buffers of PIL and numpy count, which tracemalloc would not see."""
    done = subprocess.run(
        [sys.executable, "-c", _MEMORY_CHILD, str(path), str(int(colour_constancy))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


@pytest.mark.parametrize("cc", [False, True])
def test_a_40_megapixel_jpeg_costs_a_small_fraction_of_its_decoded_size(
    huge_images: dict[str, Path], cc: bool
) -> None:
    # Before: 2.9 GB with colour constancy (float64 copies of the full image), 308 MB without.
    # Now the JPEG is decoded at 1/8 scale (913x688): measured 5 MB without, 14 MB with. Decoded
    # whole, it costs 165 MB with streamed gains: far over this bound of half its decoded size.
    assert _peak_bytes(huge_images["JPEG"], cc) < _HUGE_DECODED // 2


def test_a_40_megapixel_png_costs_under_two_decoded_copies(huge_images: dict[str, Path]) -> None:
    # No reduced decode for PNG: the gains come from float32 bands and are applied band by band in
    # place. Measured 165 MB (the decode itself is 155; 328 with a second copy); before: 2.9 GB.
    assert _peak_bytes(huge_images["PNG"], colour_constancy=True) < 2 * _HUGE_DECODED

"""The training images' detail: measured from their headers, stored in the spec, and a larger
input reduced to it before the model's resize (the large-image path too)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skinlesion.data.preprocess import (
    DETAIL_MARGIN,
    EXACT_MAX_PIXELS,
    Detail,
    PreprocessSpec,
    jpeg_quality,
    measure_detail,
    prepare_image,
    prepare_with_spec,
    reduce_detail,
)


def _texture(w: int, h: int, seed: int = 0) -> Image.Image:
    """Fine detail: stripes a few pixels wide under a smooth colour field."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    base = np.stack([120 + 60 * np.sin(xx / w * 3 + c) for c in range(3)], -1)
    stripes = 40 * np.sin(xx * 0.9 + yy * 0.4)[..., None]
    img = base + stripes + rng.normal(0, 5, (h, w, 3))
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf)


@pytest.mark.parametrize("quality", [30, 75, 90, 95])
def test_jpeg_quality_reads_the_quality_a_file_was_saved_at(quality: int) -> None:
    assert jpeg_quality(_jpeg(_texture(64, 48), quality)) == quality


def test_jpeg_quality_of_another_format_is_none() -> None:
    buf = io.BytesIO()
    _texture(32, 24).save(buf, format="PNG")
    assert jpeg_quality(Image.open(buf)) is None


def test_measure_detail_gives_the_median_side_and_quality(tmp_path: Path) -> None:
    paths = []
    for i, (w, h, q) in enumerate([(200, 150, 75), (200, 150, 75), (256, 256, 90), (150, 200, 75)]):
        p = tmp_path / f"{i}.jpg"
        _texture(w, h, i).save(p, quality=q)
        paths.append(p)
    assert measure_detail(paths) == Detail(200, 75)
    png = tmp_path / "x.png"
    _texture(300, 200).save(png)
    assert measure_detail([png, png, paths[0]]).jpeg_quality is None  # under half are JPEGs


def test_reduce_detail_shrinks_only_larger_images_and_compresses_them() -> None:
    detail = Detail(200, 75)
    small = _texture(180, 120)
    assert reduce_detail(small, detail) is small
    near = _texture(300, 256)  # within DETAIL_MARGIN: detail the zoom augmentation covers
    assert max(near.size) <= 200 * DETAIL_MARGIN and reduce_detail(near, detail) is near
    assert reduce_detail(_texture(301, 200), detail).size == (200, 133)
    large = _texture(800, 600)
    out = reduce_detail(large, detail)
    assert out.size == (200, 150) and out.mode == "RGB"
    plain = large.resize((200, 150), Image.Resampling.BICUBIC, reducing_gap=3.0)
    assert np.asarray(out).tolist() != np.asarray(plain).tolist()  # the JPEG round trip
    assert reduce_detail(large, Detail(200)).size == (200, 150)


def test_a_large_input_is_prepared_as_its_thumbnail_would_be() -> None:
    """What detail matching is for: another clinic's large image seen with the detail of the
    training thumbnails, not with its own finer one."""
    detail = Detail(200, 75)
    large = _texture(800, 600, seed=3)
    thumbnail = _jpeg(large.resize((200, 150), Image.Resampling.BICUBIC, reducing_gap=3.0), 75)
    want = prepare_image(thumbnail, 96, colour_constancy=True)
    got = prepare_image(large, 96, colour_constancy=True, detail=detail)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    unmatched = prepare_image(large, 96, colour_constancy=True)
    assert np.abs(unmatched.astype(int) - want.astype(int)).mean() > 1.0


def test_the_large_image_path_reduces_as_the_small_one(tmp_path: Path) -> None:
    w, h = 2400, 1800
    assert w * h > EXACT_MAX_PIXELS
    path = tmp_path / "big.jpg"
    _texture(w, h, seed=5).save(path, quality=95)
    detail = Detail(200, 75)
    big = prepare_image(path, 96, detail=detail)
    with Image.open(path) as img:
        img.load()
        reference = prepare_image(reduce_detail(img.convert("RGB"), detail), 96)
    # The large path decodes at a reduced JPEG scale first: close, not identical.
    assert np.abs(big.astype(int) - reference.astype(int)).mean() < 3.0


def test_spec_keeps_its_detail_and_applies_it() -> None:
    spec = PreprocessSpec(96, (0.5,) * 3, (0.25,) * 3, detail=Detail(200, 75))
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    plain = PreprocessSpec(96, (0.5,) * 3, (0.25,) * 3)
    assert "detail" not in plain.to_dict() and PreprocessSpec.from_dict(plain.to_dict()) == plain
    large = _texture(800, 600, seed=7)
    assert np.array_equal(
        prepare_with_spec(large, spec), prepare_image(large, 96, detail=spec.detail)
    )


@pytest.mark.parametrize("text", ["abc", "200:0", "8", "200:x"])
def test_detail_parse_refuses_nonsense(text: str) -> None:
    with pytest.raises(ValueError, match="detail"):
        Detail.parse(text)

"""Upload checks: empty, not an image, over the byte limit, over the pixel limit."""

from __future__ import annotations

import pytest
from conftest import png_bytes, png_header
from PIL import Image

from skinlesion.serving.uploads import UploadError, UploadLimits, check_upload


def test_accepts_an_image_whatever_its_name() -> None:
    assert check_upload(png_bytes(), UploadLimits()) == ("PNG", (40, 30))


@pytest.mark.parametrize(
    ("data", "status", "words"),
    [
        (b"", 400, "empty upload"),
        (b"just some text, not an image\n" * 10, 415, "not an image"),
        (b"%PDF-1.4\n%...", 415, "not an image"),
        (png_header(8000, 8000), 413, "64000000 pixels is over the limit of 40000000"),
        (png_header(30000, 30000), 413, "decompression bomb"),
    ],
)
def test_refusals_say_what_is_wrong(data: bytes, status: int, words: str) -> None:
    with pytest.raises(UploadError, match=words) as err:
        check_upload(data, UploadLimits())
    assert err.value.status == status


def test_byte_limit() -> None:
    data = png_bytes(200, 200)
    with pytest.raises(UploadError, match=f"upload of {len(data)} bytes is over") as err:
        check_upload(data, UploadLimits(max_bytes=len(data) - 1))
    assert err.value.status == 413
    assert check_upload(data, UploadLimits(max_bytes=len(data)))[0] == "PNG"


def test_pixel_limit() -> None:
    w, h = 300, 200
    data = png_header(w, h)
    words = f"{w}x{h} = {w * h} pixels is over the limit of {w * h - 1} pixels"
    with pytest.raises(UploadError, match=words) as err:
        check_upload(data, UploadLimits(max_pixels=w * h - 1))
    assert err.value.status == 413
    assert check_upload(data, UploadLimits(max_pixels=w * h)) == ("PNG", (w, h))


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        UploadLimits(max_bytes=0)


def test_a_decompression_bomb_names_the_services_limit() -> None:
    # 30000 x 30000 is over PIL's own refusal (twice Image.MAX_IMAGE_PIXELS): the answer still
    # names the limit the service was started with, not PIL's.
    with pytest.raises(UploadError) as err:
        check_upload(png_header(30000, 30000), UploadLimits(max_pixels=1_234_567))
    assert err.value.status == 413
    message = str(err.value)
    assert "900000000 pixels is over the limit of 1234567 pixels" in message
    assert "decompression bomb" in message and "178956970" not in message


def test_a_limit_above_pils_names_the_limit_that_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A --max-pixels above what PIL opens at all: the decoder's limit is the one in force.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    with pytest.raises(UploadError) as err:
        check_upload(png_header(2000, 1500), UploadLimits(max_pixels=5_000_000))
    assert "3000000 pixels is over the limit of 2000000 pixels" in str(err.value)

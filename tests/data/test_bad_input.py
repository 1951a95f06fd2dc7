"""Bad input, as a new user would give it: each case fails by name, or is read correctly."""

from __future__ import annotations

import io
import logging
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skinlesion.core.errors import DataError, DownloadError, ImageDecodeError, OutputError
from skinlesion.core.paths import check_writable_dir, check_writable_file
from skinlesion.data import download
from skinlesion.data.ham10000 import read_labels
from skinlesion.data.labelled_table import check_image
from skinlesion.data.preprocess import decode_image, prepare_image


@pytest.fixture
def bomb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A PNG over PIL's pixel limit: the limit is lowered so that the file stays tiny."""
    path = tmp_path / "bomb.png"
    Image.new("L", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10 000 pixels > 2 x limit
    return path


def test_decompression_bomb_is_a_named_decode_error(bomb: Path) -> None:
    with pytest.raises(ImageDecodeError, match="bomb.png: refused, too many pixels"):
        decode_image(bomb)
    problem = check_image(bomb)
    assert problem is not None and "bomb.png" in problem and "too many pixels" in problem


def test_truncated_jpeg_fails_check_image(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with Image.open(path) as img:
        img.verify()  # the header check that used to pass it
    problem = check_image(path)
    assert problem is not None and "cut.jpg" in problem and "not a readable image" in problem
    good = tmp_path / "good.jpg"
    good.write_bytes(buf.getvalue())
    assert check_image(good) is None


@pytest.mark.parametrize("peak", [1000, 65535])
def test_sixteen_bit_scaled_by_bit_depth(tmp_path: Path, peak: int) -> None:
    # Half of full scale reads as mid-gray whatever the brightest pixel of the image is.
    arr = np.full((8, 8), 32768, dtype=np.uint16)
    arr[0, 0] = peak
    path = tmp_path / "i16.png"
    Image.fromarray(arr).save(path)
    out = prepare_image(path, 8, "bilinear")
    assert out[4, 4, 0] == round(32768 / 65535 * 255)
    assert out[0, 0, 0] == round(peak / 65535 * 255)


def test_mode_i_scaled_by_range() -> None:
    img16 = Image.fromarray(np.full((4, 4), 65535 // 4, dtype=np.int32), mode="I")
    assert np.asarray(decode_image(img16))[0, 0, 0] == round(65535 // 4 / 65535 * 255)
    img32 = Image.fromarray(np.full((4, 4), 2**30, dtype=np.int32), mode="I")
    assert np.asarray(decode_image(img32))[0, 0, 0] == round(2**30 / (2**31 - 1) * 255)


@pytest.mark.parametrize("text", ["", "lesion_id,image_id,dx\n"])
def test_empty_or_header_only_metadata_names_the_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "meta.csv"
    path.write_text(text)
    with pytest.raises(DataError, match="meta.csv"):
        read_labels(path)
    with pytest.raises(DataError, match="missing.csv: file not found"):
        read_labels(tmp_path / "missing.csv")


def test_outputs_checked_writable(tmp_path: Path) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="--output: cannot create"):
        check_writable_dir(blocker / "out", "--output")
    with pytest.raises(OutputError, match="output_dir: .* is not a folder"):
        check_writable_dir(blocker, "output_dir")
    with pytest.raises(OutputError, match="is a folder"):
        check_writable_file(tmp_path, "--out")
    with pytest.raises(OutputError, match="disk .* is full"):
        check_writable_dir(tmp_path / "new", "data.cache_dir", min_free=1 << 62)
    check_writable_dir(tmp_path / "a" / "b", "output_dir")  # creatable: fine
    check_writable_file(tmp_path / "a" / "p.csv", "--output")
    assert not (tmp_path / "a").exists()  # a check creates nothing


@pytest.mark.parametrize("name", ["..", ".", "../x.zip", ""])
def test_download_refuses_names_outside_dest(tmp_path: Path, name: str) -> None:
    remote = download.RemoteFile(1, name, 3, "MD5", "0" * 32, "http://127.0.0.1:9/x")
    with pytest.raises(DownloadError, match="expected a plain file name"):
        download.download_file(remote, tmp_path, retries=0, progress=False)


def test_no_checksum_nor_size_is_not_verified(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "meta.csv").write_text("a,b\n")
    remote = download.RemoteFile(1, "meta.csv", None, "", "", "http://127.0.0.1:9/x")
    with caplog.at_level(logging.WARNING, logger="skinlesion.data.download"):
        assert download.download_file(remote, tmp_path, retries=0, progress=False)
    assert "UNVERIFIED" in caplog.text and "verified, skipping" not in caplog.text
    part = tmp_path / "x.part"
    part.write_text("data")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="skinlesion.data.download"):
        download._verify(part, remote, None)
    assert "UNVERIFIED" in caplog.text and part.exists()


def test_zip_bomb_refused_before_extraction(tmp_path: Path) -> None:
    archive = tmp_path / "HAM10000_images_part_1.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.bin", b"\0" * 1_000_000)  # ~1 kB compressed
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(DownloadError, match="declares 1000000; refusing to extract"):
        download._extract_zip(archive, dest, max_bytes=100_000)
    assert not any(dest.iterdir())
    download._extract_zip(archive, dest, max_bytes=10_000_000)
    assert (dest / "HAM10000_images_part_1" / "zeros.bin").stat().st_size == 1_000_000

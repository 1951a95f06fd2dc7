"""The decoded-image cache: correct rows, reused when unchanged, rebuilt on change, resumable."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pytest
from PIL import Image

from skinlesion.core.errors import DataError
from skinlesion.data import cache as cache_mod
from skinlesion.data.cache import ImageCache, build_cache, cache_key, load_cache
from skinlesion.data.preprocess import prepare_image

SIZE = 16
Images = tuple[list[str], list[Path]]


def _write_image(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(20, 40)), int(rng.integers(20, 50))
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, "PNG" if path.suffix == ".png" else "JPEG")
    return path


@pytest.fixture
def images(tmp_path: Path) -> Images:
    src = tmp_path / "src"
    src.mkdir()
    ids = [f"ISIC_{i:07d}" for i in range(10)]
    paths = [
        _write_image(src / f"{i}.{'png' if n % 3 == 0 else 'jpg'}", n) for n, i in enumerate(ids)
    ]
    return ids, paths


def _build(
    ids: list[str], paths: list[Path], cache_dir: Path, size: int = SIZE, **kw: Any
) -> ImageCache:
    return build_cache(ids, paths, size, cache_dir=cache_dir, progress=False, workers=2, **kw)


class _Counter:
    """A stand-in for ``prepare_image`` that records which files it decodes."""

    def __init__(self, fail_on: Path | None = None, exc: type[BaseException] = KeyboardInterrupt):
        self.calls: list[Path] = []
        self.fail_on = fail_on
        self.exc = exc
        self._lock = threading.Lock()

    def __call__(
        self,
        path: str | Path,
        size: int,
        interpolation: str = "bicubic",
        colour_constancy: bool = False,
    ) -> np.ndarray:
        if self.fail_on is not None and Path(path) == self.fail_on:
            raise self.exc()
        with self._lock:
            self.calls.append(Path(path))
        return prepare_image(path, size, interpolation, colour_constancy)


def test_build_shape_and_content(images: Images, tmp_path: Path) -> None:
    ids, paths = images
    c = _build(ids, paths, tmp_path / "cache")
    assert c.images.shape == (len(ids), SIZE, SIZE, 3)
    assert c.images.dtype == np.uint8
    assert c.ids == ids
    assert c.size == SIZE
    for row, path in enumerate(paths):
        assert np.array_equal(c.images[row], prepare_image(path, SIZE))
    # Rows differ: the images are random, so no two cached rows may be equal.
    assert len({c.images[i].tobytes() for i in range(len(ids))}) == len(ids)
    assert c.rows([ids[3], ids[0]]).tolist() == [3, 0]
    with pytest.raises(KeyError, match="not in cache"):
        c.rows(["ISIC_missing"])


def test_entry_layout(images: Images, tmp_path: Path) -> None:
    ids, paths = images
    cache_dir = tmp_path / "cache"
    c = _build(ids, paths, cache_dir)
    key = cache_key(ids, paths, SIZE, "bicubic", False)
    assert c.root == cache_dir / key
    assert sorted(p.name for p in cache_dir.iterdir()) == [key]  # no .partial left behind
    assert sorted(p.name for p in c.root.iterdir()) == ["images.u8", "index.json"]
    meta = json.loads((c.root / "index.json").read_text())
    assert meta["ids"] == ids
    assert meta["size"] == SIZE
    assert (c.root / "images.u8").stat().st_size == len(ids) * SIZE * SIZE * 3
    again = load_cache(c.root)
    assert np.array_equal(np.asarray(again.images), np.asarray(c.images))


def test_second_call_reuses(
    images: Images, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids, paths = images
    first = _build(ids, paths, tmp_path / "cache")
    expected = np.array(first.images)

    def boom(*args: object, **kwargs: object) -> NoReturn:
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr(cache_mod, "prepare_image", boom)
    second = _build(ids, paths, tmp_path / "cache")
    assert second.root == first.root
    assert np.array_equal(np.asarray(second.images), expected)


def test_changed_source_file_rebuilds(images: Images, tmp_path: Path) -> None:
    ids, paths = images
    first = _build(ids, paths, tmp_path / "cache")
    old_row = np.array(first.images[2])
    _write_image(paths[2], seed=1234)
    st = paths[2].stat()
    os.utime(paths[2], ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    second = _build(ids, paths, tmp_path / "cache")
    assert second.root != first.root
    assert np.array_equal(second.images[2], prepare_image(paths[2], SIZE))
    assert not np.array_equal(second.images[2], old_row)
    assert np.array_equal(second.images[0], first.images[0])


def test_touch_alone_changes_the_key(images: Images) -> None:
    ids, paths = images
    before = cache_key(ids, paths, SIZE, "bicubic", False)
    st = paths[0].stat()
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert cache_key(ids, paths, SIZE, "bicubic", False) != before


def test_settings_change_the_entry(images: Images, tmp_path: Path) -> None:
    ids, paths = images
    base = _build(ids, paths, tmp_path / "cache")
    bigger = _build(ids, paths, tmp_path / "cache", size=24)
    assert bigger.root != base.root
    assert bigger.images.shape == (len(ids), 24, 24, 3)
    assert np.array_equal(bigger.images[5], prepare_image(paths[5], 24))
    assert base.root.is_dir() and bigger.root.is_dir()  # both kept

    bilinear = _build(ids, paths, tmp_path / "cache", interpolation="bilinear")
    assert bilinear.root not in (base.root, bigger.root)
    assert np.array_equal(bilinear.images[1], prepare_image(paths[1], SIZE, "bilinear"))


def test_colour_constancy_changes_the_key(images: Images, tmp_path: Path) -> None:
    ids, paths = images
    assert cache_key(ids, paths, SIZE, "bicubic", True) != cache_key(
        ids, paths, SIZE, "bicubic", False
    )
    plain = _build(ids, paths, tmp_path / "cache")
    cc = _build(ids, paths, tmp_path / "cache", colour_constancy=True)
    assert cc.root != plain.root
    assert np.array_equal(cc.images[4], prepare_image(paths[4], SIZE, colour_constancy=True))
    assert not np.array_equal(cc.images[4], plain.images[4])


def test_key_depends_on_ids_and_order(images: Images) -> None:
    ids, paths = images
    key = cache_key(ids, paths, SIZE, "bicubic", False)
    assert cache_key(ids[::-1], paths[::-1], SIZE, "bicubic", False) != key
    renamed = ["X" + i for i in ids]
    assert cache_key(renamed, paths, SIZE, "bicubic", False) != key


def test_corrupt_images_all_listed_and_nothing_final(images: Images, tmp_path: Path) -> None:
    ids, paths = images
    paths[1].write_text("not an image at all\n")
    paths[7].write_bytes(paths[7].read_bytes()[:40])  # truncated
    cache_dir = tmp_path / "cache"
    with pytest.raises(DataError, match="cannot be decoded") as info:
        _build(ids, paths, cache_dir)
    problems = info.value.problems
    assert len(problems) == 2
    assert ids[1] in problems[0] and paths[1].name in problems[0]
    assert ids[7] in problems[1] and paths[7].name in problems[1]
    key = cache_key(ids, paths, SIZE, "bicubic", False)
    assert not (cache_dir / key).exists()
    assert not list(cache_dir.glob("*/index.json"))


def test_length_mismatch(images: Images, tmp_path: Path) -> None:
    ids, paths = images
    with pytest.raises(ValueError, match="differ in length"):
        _build(ids[:-1], paths, tmp_path / "cache")


def test_resume_after_crash(
    images: Images, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids, paths = images
    cache_dir = tmp_path / "cache"
    monkeypatch.setattr(cache_mod, "_FLUSH_EVERY", 2)
    # Rows 0-3 are decoded and flushed (at counts 2 and 4); row 4 crashes the build.
    crash = _Counter(fail_on=paths[4])
    monkeypatch.setattr(cache_mod, "prepare_image", crash)
    with pytest.raises(KeyboardInterrupt):
        _build(ids, paths, cache_dir)
    key = cache_key(ids, paths, SIZE, "bicubic", False)
    partial = cache_dir / f"{key}.partial"
    assert partial.is_dir()
    assert not (cache_dir / key).exists()
    assert np.load(partial / "done.npy").tolist() == [True] * 4 + [False] * 6

    resume = _Counter()
    monkeypatch.setattr(cache_mod, "prepare_image", resume)
    c = _build(ids, paths, cache_dir)
    assert sorted(resume.calls) == sorted(paths[4:])
    assert c.root == cache_dir / key
    assert not partial.exists()
    for row, path in enumerate(paths):
        assert np.array_equal(c.images[row], prepare_image(path, SIZE))


def test_crash_before_first_flush_rebuilds_all(
    images: Images, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids, paths = images
    monkeypatch.setattr(cache_mod, "prepare_image", _Counter(fail_on=paths[1]))
    with pytest.raises(KeyboardInterrupt):
        _build(ids, paths, tmp_path / "cache")
    again = _Counter()
    monkeypatch.setattr(cache_mod, "prepare_image", again)
    c = _build(ids, paths, tmp_path / "cache")
    assert sorted(again.calls) == sorted(paths)
    for row, path in enumerate(paths):
        assert np.array_equal(c.images[row], prepare_image(path, SIZE))


def test_failed_build_retries_only_the_bad_images(
    images: Images, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids, paths = images
    bad = paths[6]
    bad.write_text("broken")
    with pytest.raises(DataError):
        _build(ids, paths, tmp_path / "cache")
    again = _Counter()
    monkeypatch.setattr(cache_mod, "prepare_image", again)
    with pytest.raises(DataError):
        _build(ids, paths, tmp_path / "cache")
    assert again.calls == [bad]

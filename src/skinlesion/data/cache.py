"""Decode once: every image resized to the run's input size, stored as a uint8 memmap.

Layout of one cache entry ``<cache_dir>/<key>/``: ``images.u8`` (raw N x S x S x 3 uint8, C
order) and ``index.json`` (image ids, shape, how it was made). The key hashes the source files
(path, size, mtime), the size, the interpolation and colour constancy, so a changed file or
setting makes a new entry and an unchanged one is reused. A build that crashes resumes from its
``.partial`` folder; the finished folder appears atomically by rename.

Training reads rows of this array (or the whole array moved to the GPU once); it never decodes a
JPEG per epoch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from skinlesion.core.errors import DataError
from skinlesion.core.paths import user_cache_dir
from skinlesion.data.preprocess import ImageDecodeError, Size, prepare_image, size_hw, size_label

log = logging.getLogger(__name__)

CACHE_VERSION = 1
_FLUSH_EVERY = 256


@dataclass
class ImageCache:
    """A built cache: ``images[i]`` is the uint8 (S, S, 3) image of ``ids[i]``."""

    root: Path
    ids: list[str]
    images: np.ndarray  # np.memmap, read-only

    @property
    def size(self) -> Size:
        h, w = int(self.images.shape[1]), int(self.images.shape[2])
        return h if h == w else (h, w)

    def rows(self, image_ids: Sequence[str]) -> np.ndarray:
        """Row numbers of the given image ids."""
        pos = {i: n for n, i in enumerate(self.ids)}
        missing = [i for i in image_ids if i not in pos]
        if missing:
            raise KeyError(f"{len(missing)} image(s) not in cache {self.root}: {missing[:5]}")
        return np.array([pos[i] for i in image_ids], dtype=np.int64)


def default_cache_dir() -> Path:
    return user_cache_dir()


def cache_key(
    ids: Sequence[str],
    paths: Sequence[str | Path],
    size: Size,
    interpolation: str,
    colour_constancy: bool,
) -> str:
    h = hashlib.sha256()
    h.update(f"v{CACHE_VERSION}|{size_label(size)}|{interpolation}|{colour_constancy}".encode())
    for image_id, path in zip(ids, paths, strict=True):
        st = os.stat(path)
        h.update(f"|{image_id}|{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def _open(root: Path, n: int, size: Size, mode: str) -> np.memmap:
    h, w = size_hw(size)
    return np.memmap(root / "images.u8", dtype=np.uint8, mode=mode, shape=(n, h, w, 3))


def load_cache(root: Path) -> ImageCache:
    meta = json.loads((root / "index.json").read_text())
    size = meta["size"]
    images = _open(root, len(meta["ids"]), tuple(size) if isinstance(size, list) else size, "r")
    return ImageCache(root=root, ids=list(meta["ids"]), images=images)


def build_cache(
    ids: Sequence[str],
    paths: Sequence[str | Path],
    size: Size,
    cache_dir: Path | None = None,
    interpolation: str = "bicubic",
    colour_constancy: bool = False,
    workers: int | None = None,
    progress: bool = True,
) -> ImageCache:
    """Return the cache for these images, building (or finishing) it if needed.

    Every image that fails to decode is reported at once in a :class:`DataError`; no partial
    cache is ever used for training.
    """
    if len(ids) != len(paths):
        raise ValueError("ids and paths differ in length")
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    key = cache_key(ids, paths, size, interpolation, colour_constancy)
    final = cache_dir / key
    if (final / "index.json").is_file():
        return load_cache(final)
    partial = cache_dir / f"{key}.partial"
    partial.mkdir(parents=True, exist_ok=True)
    n = len(ids)
    done_path = partial / "done.npy"
    mode = "r+" if (partial / "images.u8").is_file() and done_path.is_file() else "w+"
    images = _open(partial, n, size, mode)
    done = np.load(done_path) if mode == "r+" else np.zeros(n, dtype=bool)
    if mode == "r+":
        log.info("resuming cache build %s: %d of %d images left", key, int((~done).sum()), n)

    def work(i: int) -> tuple[int, np.ndarray | None, str | None]:
        try:
            return i, prepare_image(paths[i], size, interpolation, colour_constancy), None
        except ImageDecodeError as err:
            return i, None, f"row {i} (image {ids[i]}): {err}"

    workers = workers or min(8, os.cpu_count() or 1)
    problems = _fill(
        images, done, done_path, work, workers, f"caching {size_label(size)}px", progress
    )
    del images
    if problems:
        raise DataError("images that cannot be decoded", problems)
    meta = {
        "version": CACHE_VERSION,
        "size": size,
        "interpolation": interpolation,
        "colour_constancy": colour_constancy,
        "ids": list(ids),
        "sources": [str(p) for p in paths],
    }
    (partial / "index.json").write_text(json.dumps(meta))
    done_path.unlink()
    if final.exists():  # another process finished first
        shutil.rmtree(partial)
    else:
        partial.rename(final)
    return load_cache(final)


def _fill(
    images: np.memmap,
    done: np.ndarray,
    done_path: Path,
    work: Callable[[int], tuple[int, np.ndarray | None, str | None]],
    workers: int,
    desc: str,
    progress: bool,
) -> list[str]:
    """Decode every row not ``done`` into ``images``, saving progress as it goes; the problems."""
    todo = np.flatnonzero(~done)
    n = len(done)
    problems: list[str] = []
    with (
        ThreadPoolExecutor(workers) as pool,
        tqdm(total=n, initial=n - len(todo), desc=desc, disable=not progress) as bar,
    ):
        for count, (i, arr, err) in enumerate(pool.map(work, todo), 1):
            if err:
                problems.append(err)
            else:
                images[i] = arr
                done[i] = True
            bar.update()
            if count % _FLUSH_EVERY == 0:
                images.flush()
                _save_atomic_npy(done_path, done)
    images.flush()
    _save_atomic_npy(done_path, done)
    return problems


def _save_atomic_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)

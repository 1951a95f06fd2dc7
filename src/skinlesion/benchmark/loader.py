"""Data loading throughput: the uint8 cache pipeline against decoding every JPEG per batch."""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from skinlesion.benchmark.workload import N_CLASSES, hardware_info
from skinlesion.core.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch

    from skinlesion.core.runtime import Runtime


def _loader_images(
    data_root: str | Path | None,
    tmp: Path,
    max_images: int,
    synthetic_size: tuple[int, int],
    synthetic_images: int,
    seed: int,
) -> tuple[list[str], list[str], str]:
    """(image ids, paths, description) of the images to benchmark, sorted by image id."""
    from skinlesion.data.ham10000 import load_ham10000
    from skinlesion.data.synthetic import make_synthetic_ham10000

    if data_root is None:
        root = tmp / "synthetic"
        # Lesions have 1-3 images (2 on average), 7 classes.
        per_class = max(1, math.ceil(synthetic_images / (2 * N_CLASSES)))
        make_synthetic_ham10000(root, lesions_per_class=per_class, size=synthetic_size, seed=seed)
        what = f"synthetic {synthetic_size[0]}x{synthetic_size[1]} JPEGs"
    else:
        root = Path(data_root)
        what = str(root)
    # The cache build below decodes every image, so a broken file is still reported.
    df = load_ham10000(root, verify=False).sort_values("image_id").head(max_images)
    return df["image_id"].tolist(), df["path"].tolist(), what


def bench_loader(
    data_root: str | Path | None,
    image_size: int,
    batch_size: int = 64,
    batches: int = 20,
    cache_dir: Path | None = None,
    seed: int = 0,
    synthetic_size: tuple[int, int] = (600, 450),
    synthetic_images: int = 500,
    max_images: int = 2000,
    decode_workers: int | None = None,
    interpolation: str = "bicubic",
) -> dict[str, Any]:
    """Images/s of the uint8-cache pipeline against decoding the JPEGs for every batch, on CPU.

    Both pipelines prepare the same randomly drawn rows the same way (``forward.prepare`` with the
    default augmentation); they differ only in where the uint8 pixels come from: rows of the cache
    (``forward.gather``) or ``preprocess.prepare_image`` on each file (``decode_workers`` threads,
    default one per torch thread, as ``build_cache`` decodes). ``data_root=None`` writes a
    synthetic set of about ``synthetic_images`` JPEGs of ``synthetic_size`` (w, h) pixels, the
    official HAM10000 release's 600x450 by default; else the first ``max_images`` images (by
    image id) of a HAM10000 folder are used. The cache goes to ``cache_dir`` (default: a
    temporary folder); the time to build it is reported apart and not in the ratio.
    """
    import torch

    from skinlesion.core.runtime import resolve_runtime

    if batch_size < 1 or batches < 1:
        raise ConfigError(f"need batch_size >= 1 and batches >= 1, got {batch_size}, {batches}")
    runtime = resolve_runtime("cpu", amp=False, channels_last=False)
    hw = hardware_info()
    with tempfile.TemporaryDirectory(prefix="skinlesion-bench-") as tmp:
        ids, paths, what = _loader_images(
            data_root, Path(tmp), max_images, synthetic_size, synthetic_images, seed
        )
        if not ids:
            raise DataError(f"no images found in {what}")
        cdir = Path(cache_dir or Path(tmp) / "cache")
        cache, build_s, reused = _timed_cache(ids, paths, image_size, cdir, interpolation)
        source_size = _pixel_size(paths[0])
        workers = decode_workers or torch.get_num_threads()
        spec = _LoaderSpec(image_size, interpolation, batch_size, batches, workers, seed)
        cache_t, decode_t = _time_loaders(cache.images, paths, spec, runtime)
    result: dict[str, Any] = {
        "benchmark": "loader",
        "source": what,
        "source_image_size": source_size,
        "n_images": len(ids),
        "interpolation": interpolation,
        **_loader_figures(spec, torch.get_num_threads(), cache_t, decode_t),
        "cache_build_s": build_s,
        "cache_build_images_per_s": len(ids) / build_s if not reused else None,
        "cache_reused": reused,
        "hardware": hw,
    }
    result["ratio"] = result["cache"]["images_per_s"] / result["decode"]["images_per_s"]
    # Where the pixels come from alone (augmentation left out): what the cache itself saves.
    result["read_ratio"] = decode_t[0] / cache_t[0] if cache_t[0] > 0 else None
    return result


def _timed_cache(
    ids: list[str], paths: list[str], image_size: int, cdir: Path, interpolation: str
) -> tuple[Any, float, bool]:
    """(the cache, seconds to build it, whether it was there already)."""
    from skinlesion.data.cache import build_cache, cache_key

    reused = (
        cdir / cache_key(ids, paths, image_size, interpolation, False) / "index.json"
    ).is_file()
    t0 = time.perf_counter()
    cache = build_cache(ids, paths, image_size, cdir, interpolation, progress=False)
    return cache, time.perf_counter() - t0, reused


def _pixel_size(path: str) -> list[int]:
    from PIL import Image

    with Image.open(path) as im:
        return list(im.size)


def _loader_figures(
    spec: _LoaderSpec,
    threads: int,
    cache_t: tuple[float, float],
    decode_t: tuple[float, float],
) -> dict[str, Any]:
    n = spec.batches * spec.batch_size
    return {
        "image_size": spec.image_size,
        "batch_size": spec.batch_size,
        "batches": spec.batches,
        "augment": "AugmentConfig() defaults, on CPU",
        "decode_workers": spec.workers,
        "torch_threads": threads,
        "cache": _loader_rate(n, spec.batches, *cache_t),
        "decode": _loader_rate(n, spec.batches, *decode_t),
    }


@dataclass(frozen=True)
class _LoaderSpec:
    image_size: int
    interpolation: str
    batch_size: int
    batches: int
    workers: int
    seed: int


def _time_loaders(
    cache_images: np.ndarray, paths: Sequence[str], spec: _LoaderSpec, runtime: Runtime
) -> tuple[tuple[float, float], tuple[float, float]]:
    """(read, prepare) seconds of the cache rows and of decoding each JPEG, on the same rows."""
    import torch

    from skinlesion.data.preprocess import prepare_image
    from skinlesion.inference.forward import gather

    gen = torch.Generator().manual_seed(spec.seed)
    # The same rows for both pipelines; the first draw is a warm-up, not timed.
    draws = [
        torch.randint(len(paths), (spec.batch_size,), generator=gen)
        for _ in range(spec.batches + 1)
    ]

    def read_cache(rows: torch.Tensor) -> torch.Tensor:
        return gather(cache_images, rows, runtime.device)

    with ThreadPoolExecutor(spec.workers) as pool:

        def read_jpeg(rows: torch.Tensor) -> torch.Tensor:
            work = [(paths[i], spec.image_size, spec.interpolation) for i in rows.tolist()]
            return torch.from_numpy(np.stack(list(pool.map(lambda a: prepare_image(*a), work))))

        times = _time_pipelines(
            {"cache": read_cache, "decode": read_jpeg}, draws, runtime, spec.seed
        )
    return times["cache"], times["decode"]


def _time_pipelines(
    readers: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    draws: Sequence[torch.Tensor],
    runtime: Runtime,
    seed: int,
) -> dict[str, tuple[float, float]]:
    """(read seconds, prepare seconds) of each reader over ``draws[1:]``; ``draws[0]`` warms up.

    The readers take turns batch by batch, in alternating order, so that a change of machine
    load touches all alike; each has its own augmentation generator, seeded alike, so all prepare
    the very same batches.
    """
    import torch

    from skinlesion.data.augment import AugmentConfig
    from skinlesion.data.preprocess import IMAGENET
    from skinlesion.inference.forward import prepare

    aug = AugmentConfig()
    gens = {name: torch.Generator().manual_seed(seed + 1) for name in readers}
    totals = {name: [0.0, 0.0] for name in readers}
    for b, rows in enumerate(draws):
        order = list(readers.items())
        for name, read in order if b % 2 else order[::-1]:
            t0 = time.perf_counter()
            u8 = read(rows)
            t1 = time.perf_counter()
            prepare(u8, IMAGENET, runtime, aug, gens[name])
            t2 = time.perf_counter()
            if b > 0:
                totals[name][0] += t1 - t0
                totals[name][1] += t2 - t1
    return {name: (t[0], t[1]) for name, t in totals.items()}


def _loader_rate(n: int, batches: int, read_s: float, prep_s: float) -> dict[str, float]:
    total = read_s + prep_s
    return {
        "images_per_s": n / total,
        "ms_per_batch": 1000.0 * total / batches,
        "read_ms_per_batch": 1000.0 * read_s / batches,
        "augment_ms_per_batch": 1000.0 * prep_s / batches,
        "seconds": total,
    }

"""``skinlesion predict`` end to end per backend: model load (from a warm graph cache), JPEG
decoding, preparation and the forward pass, on HAM10000 images upscaled to the official
release's 600x450 (written to a temporary folder, deleted afterwards)."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from skinlesion.core.errors import ConfigError, SkinlesionError


def write_upscaled(
    files: Sequence[Path], n: int, folder: Path, size: tuple[int, int]
) -> list[Path]:
    """``n`` JPEGs of ``size`` made from ``files`` (cycled), or random pixels without files."""
    from PIL import Image

    out = []
    rng = np.random.default_rng(0)
    for i in range(n):
        if files:
            img = Image.open(files[i % len(files)]).convert("RGB").resize(size, Image.BICUBIC)
        else:
            img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        out.append(folder / f"e2e_{i:04d}.jpg")
        img.save(out[-1], quality=95)
    return out


def _time_backend(
    model: str | None, images: list[Path], backend: str, batch_size: int, workers: int | None
) -> dict[str, Any]:
    from skinlesion.core.runtime import resolve_runtime
    from skinlesion.inference.predict import decode_workers
    from skinlesion.inference.resolve import resolve_model

    threads = workers or decode_workers()
    start = time.perf_counter()
    loaded = resolve_model(model, resolve_runtime("cpu"), backend)
    loaded.decode_workers = threads
    loaded_s = time.perf_counter() - start
    table = loaded.predict(images, batch_size=batch_size)
    total = time.perf_counter() - start
    probs = table[loaded.class_names].to_numpy(dtype=float)
    return {
        "backend": backend,
        "decode_threads": threads,
        "load_s": round(loaded_s, 2),
        "total_s": round(total, 2),
        "images_per_s": round(len(images) / total, 2),
        "probs": probs,
    }


def bench_predict_e2e(
    model: str | None,
    data: str | Path | None,
    n_images: int = 300,
    size: tuple[int, int] = (600, 450),
    backends: Sequence[str] = ("torch", "onnx", "onnx-int8"),
    batch_size: int = 32,
) -> dict[str, Any]:
    """images/s of ``predict`` per backend and the ratios to torch, with the largest probability
    difference from torch. The ONNX graph is exported (untimed) before the timing; a backend
    that cannot run (no int8 graph yet) is reported with its reason."""
    from skinlesion.benchmark.serving import _ham10000_files
    from skinlesion.benchmark.workload import hardware_info
    from skinlesion.core.runtime import resolve_runtime
    from skinlesion.inference.resolve import resolve_model

    if n_images < 1:
        raise ConfigError(f"--images must be at least 1, got {n_images}")
    files = _ham10000_files(data, min(n_images, 300))
    resolve_model(model, resolve_runtime("cpu"), "onnx")  # warm the graph cache, untimed
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as tmp:
        images = write_upscaled(files, n_images, Path(tmp), size)
        # The default backend once more with decoding in one thread: what the thread pool buys.
        runs = [(b, None) for b in backends] + ([("onnx", 1)] if "onnx" in backends else [])
        for backend, workers in runs:
            try:
                row = _time_backend(model, images, backend, batch_size, workers)
            except SkinlesionError as err:
                rows.append({"backend": backend, "skipped": str(err)})
                continue
            probs = row.pop("probs")
            reference = probs if backend == "torch" else reference
            if reference is not None:
                row["max_abs_diff_vs_torch"] = float(np.abs(probs - reference).max())
            rows.append(row)
    timed = {r["backend"]: r["images_per_s"] for r in rows if "images_per_s" in r}
    base = timed.get("torch")
    for r in rows:
        if base and "images_per_s" in r:
            r["speedup_vs_torch"] = round(r["images_per_s"] / base, 2)
    return {
        "benchmark": "predict-e2e",
        "model": model or "default",
        "n_images": n_images,
        "image_size": f"{size[0]}x{size[1]}",
        "images": "HAM10000 upscaled" if files else "synthetic",
        "batch_size": batch_size,
        "results": rows,
        "hardware": hardware_info(),
    }

"""Prediction throughput of a trained model as users run it: every member, its temperature and
the TTA views it was calibrated on, at batch 1 (latency) and a batched size.

Inputs are prepared uint8 images (decoded, colour-corrected and resized), as
:func:`~skinlesion.inference.predict.predict_images` hands them to the ensemble, so JPEG decoding
is not included.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from skinlesion.benchmark.timing import latency_row
from skinlesion.core.errors import ConfigError


def _time_batch(
    loaded: Any, spec: Any, batch: np.ndarray, runtime: Any, views: int, steps: int, warmup: int
) -> dict[str, float]:
    """Median / p95 / mean latency and images/s of one batch size."""
    from skinlesion.inference.predict import ensemble_probs

    b = len(batch)

    def call() -> None:
        ensemble_probs(loaded.members, {spec: batch}, runtime, views, b)

    return latency_row(call, b, steps, warmup, runtime.device)


def bench_model_predict(
    model: str | None,
    batch_sizes: Sequence[int] = (1, 32),
    steps: int = 10,
    warmup: int = 2,
    device: str = "auto",
    tta: int | None = None,
    seed: int = 0,
    hardware: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Latency and images/s of a packaged model (``None`` or ``"default"``: the default one), a
    run folder or a checkpoint; the result has the layout of ``bench_predict``'s."""
    import torch

    from skinlesion.core.runtime import resolve_runtime
    from skinlesion.data.preprocess import size_label
    from skinlesion.inference.resolve import resolve_torch_model

    if not batch_sizes or min(batch_sizes) < 1 or steps < 1 or warmup < 0:
        raise ConfigError(
            f"need batch sizes >= 1, steps >= 1, warmup >= 0; got {batch_sizes}, {steps}, {warmup}"
        )
    runtime = resolve_runtime(device)
    loaded = resolve_torch_model(
        None if model in (None, "default") else model, runtime, "benchmark predict"
    )
    views = loaded.tta if tta is None else tta
    spec = loaded.members[0].spec
    h, w = spec.hw
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (max(batch_sizes), h, w, 3), dtype=np.uint8)
    results = [
        _time_batch(loaded, spec, pixels[:b], runtime, views, steps, warmup) for b in batch_sizes
    ]
    hw = hardware or {}
    single = next((r for r in results if r["batch_size"] == 1), None)
    backbone = loaded.members[0].model.__class__.__name__
    return {
        "benchmark": "predict",
        "backbone": f"{loaded.name} ({len(loaded.members)} member(s), {backbone}, TTA {views})",
        "image_size": size_label(spec.size),
        "steps": steps,
        "warmup": warmup,
        "device": str(runtime.device),
        "device_name": str(hw.get("cpu") or runtime.device),
        "torch": torch.__version__,
        "amp_dtype": None,
        "channels_last": runtime.channels_last,
        "tta": views,
        "threads": torch.get_num_threads(),
        "weights": "the model's trained weights, calibrated, TTA views averaged",
        "results": results,
        "latency_median_ms": single["median_ms"] if single else None,
        "latency_p95_ms": single["p95_ms"] if single else None,
        "max_images_per_s": max(r["images_per_s"] for r in results),
        "hardware": hw,
    }

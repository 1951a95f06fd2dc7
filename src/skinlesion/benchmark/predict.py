"""Prediction throughput of a backbone with random weights: single-image latency and batched
images/s of :func:`~skinlesion.inference.forward.predict_logits` (a trained model as users run
it: :mod:`skinlesion.benchmark.model_predict`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from skinlesion.benchmark.timing import latency_row
from skinlesion.benchmark.workload import WEIGHTS_NOTE, build_model, device_fields, hardware_info
from skinlesion.core.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from skinlesion.core.runtime import Runtime
    from skinlesion.data.preprocess import PreprocessSpec


def bench_predict(
    backbone: str,
    image_size: int,
    batch_sizes: Sequence[int] = (1, 32),
    steps: int = 20,
    warmup: int = 3,
    device: str = "auto",
    amp: bool = True,
    channels_last: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Latency (median, p95) and images/s of
    :func:`~skinlesion.inference.forward.predict_logits` per batch size; batch 1 is the
    single-image latency.

    Inputs are prepared uint8 images in a NumPy array, as ``inference.predict_images`` hands
    them over, so each call includes the host-to-device copy; JPEG decoding is not included.
    """

    from skinlesion.core.runtime import resolve_runtime, seed_everything
    from skinlesion.models.factory import default_spec

    if not batch_sizes or min(batch_sizes) < 1 or steps < 1 or warmup < 0:
        raise ConfigError(
            f"need batch sizes >= 1, steps >= 1, warmup >= 0; got {batch_sizes}, {steps}, {warmup}"
        )
    runtime = resolve_runtime(device, amp, channels_last)
    hw = hardware_info()
    seed_everything(seed)
    spec = default_spec(backbone, image_size)
    model, _ = build_model(backbone, runtime)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (max(batch_sizes), image_size, image_size, 3), dtype=np.uint8)

    rows_out = [_time_predict(model, pixels, b, steps, warmup, runtime, spec) for b in batch_sizes]
    single = next((r for r in rows_out if r["batch_size"] == 1), None)
    return {
        "benchmark": "predict",
        "backbone": backbone,
        "image_size": image_size,
        "steps": steps,
        "warmup": warmup,
        **device_fields(runtime, hw),
        "tta": 1,
        "weights": WEIGHTS_NOTE,
        "results": rows_out,
        "latency_median_ms": single["median_ms"] if single else None,
        "latency_p95_ms": single["p95_ms"] if single else None,
        "max_images_per_s": max(r["images_per_s"] for r in rows_out),
        "hardware": hw,
    }


def _time_predict(
    model: nn.Module,
    pixels: np.ndarray,
    b: int,
    steps: int,
    warmup: int,
    runtime: Runtime,
    spec: PreprocessSpec,
) -> dict[str, float]:
    from skinlesion.inference.forward import predict_logits

    rows = np.arange(b)

    def call() -> None:
        predict_logits(model, pixels, rows, batch_size=b, runtime=runtime, norm=spec.normalization)

    return latency_row(call, b, steps, warmup, runtime.device)

"""Timing shared by the benchmarks: device-synchronised seconds and one latency row."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def sync(device: Any) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on a CPU."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: Any) -> float:
    """Seconds ``fn`` takes, device work included."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def latency_row(
    call: Callable[[], Any], batch_size: int, steps: int, warmup: int, device: Any
) -> dict[str, float]:
    """``warmup`` untimed calls, then ``steps`` timed ones: median / p95 / mean ms, images/s."""
    for _ in range(warmup):
        call()
    times = [timed(call, device) for _ in range(steps)]
    return {
        "batch_size": batch_size,
        "median_ms": 1000.0 * statistics.median(times),
        "p95_ms": 1000.0 * float(np.percentile(times, 95)),
        "mean_ms": 1000.0 * statistics.fmean(times),
        "images_per_s": batch_size * steps / sum(times),
    }

"""Serving benchmarks: a bounded load test of the HTTP service, and onnxruntime against eager
PyTorch for the same model and batch.

:func:`load_test` runs ``clients`` threads that each POST images to ``/predict`` until
``duration_s`` has passed or ``max_requests`` were sent in all (whichever comes first), and
samples the server's resident memory (``/proc/PID/status``) as it goes. Every result is a dict
of plain values.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process in MiB (Linux), or None where it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _client(
    url: str, payloads: Sequence[bytes], stop: threading.Event, budget: list[int], out: dict
) -> None:
    import httpx

    lock = out["lock"]
    with httpx.Client(timeout=60) as http:
        i = 0
        while not stop.is_set():
            with lock:
                if budget[0] <= 0:
                    return
                budget[0] -= 1
            data = payloads[i % len(payloads)]
            i += 1
            t0 = time.perf_counter()
            try:
                r = http.post(url, files={"file": ("image.jpg", data, "image/jpeg")})
                ok = r.status_code == 200
                detail = "" if ok else f"HTTP {r.status_code}: {r.text[:200]}"
            except httpx.HTTPError as err:
                ok, detail = False, f"{type(err).__name__}: {err}"
            dt = time.perf_counter() - t0
            with lock:
                out["latencies"].append(dt)
                if not ok:
                    out["errors"].append(detail)


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def load_test(
    base_url: str,
    payloads: Sequence[bytes],
    clients: int = 50,
    duration_s: float = 60.0,
    max_requests: int = 100_000,
    server_pid: int | None = None,
    rss_every_s: float = 5.0,
) -> dict[str, Any]:
    """Requests/s, p50/p99 latency (ms), errors and the server's RSS over the run."""
    out: dict[str, Any] = {"lock": threading.Lock(), "latencies": [], "errors": []}
    stop, budget = threading.Event(), [max_requests]
    url = base_url.rstrip("/") + "/predict"
    threads = [
        threading.Thread(target=_client, args=(url, payloads, stop, budget, out), daemon=True)
        for _ in range(clients)
    ]
    rss = [] if server_pid is None else [(0.0, rss_mb(server_pid))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads) and time.perf_counter() - t0 < duration_s:
        time.sleep(min(rss_every_s, max(0.0, duration_s - (time.perf_counter() - t0))))
        if server_pid is not None:
            rss.append((round(time.perf_counter() - t0, 1), rss_mb(server_pid)))
    stop.set()
    for t in threads:
        t.join(120)
    elapsed = time.perf_counter() - t0
    lat = out["latencies"]
    return {
        "clients": clients,
        "duration_s": round(elapsed, 1),
        "requests": len(lat),
        "requests_per_s": round(len(lat) / elapsed, 2) if elapsed else None,
        "latency_ms": {
            "p50": _ms(_percentile(lat, 50)),
            "p99": _ms(_percentile(lat, 99)),
            "mean": _ms(statistics.fmean(lat) if lat else None),
        },
        "errors": len(out["errors"]),
        "error_examples": sorted(set(out["errors"]))[:5],
        "server_rss_mb": {
            "start": rss[0][1] if rss else None,
            "end": rss[-1][1] if rss else None,
            "samples": rss,
        },
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def onnx_vs_torch(
    model: Any,
    onnx_dir: str | Path,
    images_u8: np.ndarray,
    batch_sizes: Sequence[int] = (1, 32),
    threads: int = 2,
    min_seconds: float = 3.0,
) -> dict[str, Any]:
    """Images/s of the exported graph on onnxruntime and of the eager ensemble (the code path of
    ``predict``: :func:`ensemble_probs`) for the same prepared images, batch by batch, taking
    turns so that a change of machine load touches both alike."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows = _time_backends(model, onnx_dir, images_u8, batch_sizes, threads, min_seconds)
    finally:
        torch.set_num_threads(before)
    spec = model.members[0].spec
    return {
        "model": model.name,
        "members": len(model.members),
        "tta": model.tta,
        "input_size": spec.size,
        "threads": threads,
        "cpu": os.cpu_count(),
        "load_1min": os.getloadavg()[0],
        "rows": rows,
    }


def _time_backends(
    model: Any,
    onnx_dir: str | Path,
    images_u8: np.ndarray,
    batch_sizes: Sequence[int],
    threads: int,
    min_seconds: float,
) -> list[dict[str, Any]]:
    from skinlesion.core.runtime import resolve_runtime
    from skinlesion.inference.onnx_export import OnnxModel
    from skinlesion.inference.predict import ensemble_probs

    runtime = resolve_runtime("cpu")
    session = OnnxModel(onnx_dir, threads=threads)
    spec, tta = model.members[0].spec, model.tta
    rows = []
    for bs in batch_sizes:
        batch = np.ascontiguousarray(images_u8[np.arange(bs) % len(images_u8)])

        def eager(b: np.ndarray = batch, n: int = bs) -> None:
            ensemble_probs(model.members, {spec: b}, runtime, tta, n)

        def ort(b: np.ndarray = batch) -> None:
            session.run(b)

        times: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
        eager(), ort()  # warm-up
        start = time.perf_counter()
        while time.perf_counter() - start < min_seconds or len(times["torch"]) < 3:
            for name, fn in (("torch", eager), ("onnxruntime", ort)):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        ips = {k: bs / statistics.median(v) for k, v in times.items()}
        rows.append(
            {
                "batch_size": bs,
                "torch_images_per_s": round(ips["torch"], 2),
                "onnxruntime_images_per_s": round(ips["onnxruntime"], 2),
                "ratio": round(ips["onnxruntime"] / ips["torch"], 2),
                "calls": len(times["torch"]),
            }
        )
    return rows

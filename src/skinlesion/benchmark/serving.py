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
    from skinlesion.inference.onnx_model import OnnxModel
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


def _ham10000_files(data: str | Path | None, n: int) -> list[Path]:
    """The first ``n`` JPEGs of HAM10000's first image folder under ``data``; none when absent."""
    if data is None:
        return []
    return sorted((Path(data) / "HAM10000_images_part_1").glob("*.jpg"))[:n]


def bench_onnx(
    model: str | None,
    data: str | Path | None = None,
    batch_sizes: Sequence[int] = (1, 32),
    threads: int = 2,
    seconds: float = 5.0,
) -> dict[str, Any]:
    """:func:`onnx_vs_torch` for a model exported to a temporary folder, on 32 prepared
    HAM10000 images from ``data`` (random pixels where it holds none)."""
    import tempfile

    from skinlesion.benchmark.workload import hardware_info
    from skinlesion.core.runtime import resolve_runtime
    from skinlesion.data.preprocess import prepare_with_spec
    from skinlesion.inference.onnx_export import export_onnx
    from skinlesion.inference.resolve import resolve_torch_model

    loaded = resolve_torch_model(model, resolve_runtime("cpu"), "benchmark onnx")
    spec = loaded.members[0].spec
    files = _ham10000_files(data, 32)
    if files:
        images = np.stack([prepare_with_spec(f, spec) for f in files])
    else:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 255, (32, spec.size, spec.size, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(loaded, tmp)
        result = onnx_vs_torch(loaded, tmp, images, batch_sizes, threads, seconds)
    images_used = "HAM10000" if files else "synthetic"
    return {"benchmark": "onnx", **result, "images": images_used, "hardware": hardware_info()}


def _payloads(data: str | Path | None, n: int) -> list[bytes]:
    """``n`` JPEG files to upload: HAM10000's where ``data`` holds them, else random 600x450."""
    import io

    from PIL import Image

    found = _ham10000_files(data, n)
    if found:
        return [p.read_bytes() for p in found]
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (450, 600, 3), dtype=np.uint8)).save(buf, "JPEG")
        out.append(buf.getvalue())
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(server: Any, url: str, timeout_s: float = 600) -> None:
    import httpx

    from skinlesion.core.errors import SkinlesionError

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SkinlesionError(f"the server exited with {server.returncode} before serving")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.5)
    raise SkinlesionError(f"the server did not answer {url}/health within {timeout_s:.0f} s")


def bench_serve(
    model: str | None,
    data: str | Path | None = None,
    clients: int = 50,
    duration_s: float = 60.0,
    max_requests: int = 20_000,
    images: int = 16,
) -> dict[str, Any]:
    """:func:`load_test` of ``skinlesion serve`` started on 127.0.0.1 (a free port) for
    ``model``, with ``images`` distinct uploads; the server's batch counts and its stop after."""
    import subprocess
    import sys

    import httpx

    from skinlesion.benchmark.workload import hardware_info

    port = _free_port()
    cmd = [sys.executable, "-m", "skinlesion", "serve", "--port", str(port)]
    cmd += ["--model", str(model)] if model else []
    server = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(server, url)
        payloads = _payloads(data, images)
        result = load_test(url, payloads, clients, duration_s, max_requests, server.pid)
        result["server_batches"] = httpx.get(url + "/health", timeout=10).json()
    finally:
        server.terminate()
        server.wait(30)
    return {"benchmark": "serve", **result, "hardware": hardware_info()}

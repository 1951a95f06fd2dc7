"""Serving benchmarks stop by themselves: the load test within its request budget, with every
request counted; the ONNX comparison times both backends on the same batch."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import lesion_images

from skinlesion.benchmark.serving import load_test, onnx_vs_torch, rss_mb
from skinlesion.core.runtime import resolve_runtime
from skinlesion.data.preprocess import prepare_with_spec
from skinlesion.inference.onnx_export import export_onnx
from skinlesion.inference.resolve import resolve_model
from skinlesion.serving.app import create_app


@pytest.fixture(scope="module")
def model(tiny_packaged: Path):
    return resolve_model(tiny_packaged, resolve_runtime("cpu"))


def test_load_test_is_bounded_and_counts_every_request(model, tmp_path: Path) -> None:
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(model), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            httpx.get(url + "/health", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.1)
    good = [p.read_bytes() for p in lesion_images(tmp_path, 2)]
    try:
        result = load_test(url, good, 3, 600, 7, server_pid=os.getpid(), rss_every_s=0.2)
        refused = load_test(url, [b"not an image"], 2, 600, 4)
    finally:
        server.should_exit = True
        thread.join(30)
    assert result["requests"] == 7 and result["errors"] == 0
    assert refused["requests"] == 4 and refused["errors"] == 4
    assert "HTTP 415" in refused["error_examples"][0]
    assert result["latency_ms"]["p50"] > 0 and result["server_rss_mb"]["start"] > 0


def test_rss_of_a_missing_process_is_none() -> None:
    assert rss_mb(os.getpid()) > 0
    assert rss_mb(2**22 + 12345) is None


def test_onnx_vs_torch_times_both(model, tmp_path: Path) -> None:
    export_onnx(model, tmp_path / "onnx")
    spec = model.members[0].spec
    images = np.stack([prepare_with_spec(p, spec) for p in lesion_images(tmp_path / "i", 2)])
    result = onnx_vs_torch(model, tmp_path / "onnx", images, (1, 3), threads=1, min_seconds=0)
    assert [r["batch_size"] for r in result["rows"]] == [1, 3]
    for r in result["rows"]:
        assert r["torch_images_per_s"] > 0 and r["onnxruntime_images_per_s"] > 0
        assert r["ratio"] == pytest.approx(
            r["onnxruntime_images_per_s"] / r["torch_images_per_s"], rel=0.02
        )

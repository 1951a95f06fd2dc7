"""Load test of `skinlesion serve`: starts the server on 127.0.0.1, sends real (or synthetic)
images from 50 concurrent clients for 60 s (bounded in requests and time), prints requests/s,
p50/p99 latency, errors and the server's RSS at start and end, and stops the server.

    python bench/load_test.py --model runs/quick --json load.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from skinlesion.benchmark.serving import load_test

HAM = Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000"


def payloads(n: int) -> list[bytes]:
    found = sorted((HAM / "HAM10000_images_part_1").glob("*.jpg"))[:n]
    if found:
        return [p.read_bytes() for p in found]
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (450, 600, 3), dtype=np.uint8)).save(buf, "JPEG")
        out.append(buf.getvalue())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="as for `skinlesion serve --model`")
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--max-requests", type=int, default=20_000)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    port = free_port()
    cmd = [sys.executable, "-m", "skinlesion", "serve", "--port", str(port)]
    cmd += ["--model", args.model] if args.model else []
    server = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise SystemExit(f"server exited with {server.returncode}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        result = load_test(
            url, payloads(args.images), args.clients, args.duration, args.max_requests, server.pid
        )
        result["server_batches"] = httpx.get(url + "/health", timeout=10).json()
    finally:
        server.terminate()
        server.wait(30)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

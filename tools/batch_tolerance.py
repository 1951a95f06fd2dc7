"""How far float32 probabilities of one image move with the batch it is computed in: the bound
behind the tests' ``BATCH_ATOL`` (tests/conftest.py).

oneDNN and onnxruntime pick kernels by tensor shape, so an image predicted alone and the same image
in a batch of 16 differ in the last bits. This prints that difference for the packaged default on
real HAM10000 images (when ``../shared/data`` is there) and for the tests' spread model, on this
machine's CPU (its vector extensions are printed too: run it on AVX2 and AVX-512 machines).
It also prints how far the packaged default's answers for its 16 golden images lie from the stored
``golden.json``: the drift between this CPU's kernels and those the golden outputs were written on,
which the golden tests bound at 1e-4.

On one machine other kernel families can stand in for other CPUs: PyTorch's own vector kernels
follow ``ATEN_CPU_CAPABILITY`` (``default`` = no vector code) and oneDNN's convolutions
``ONEDNN_MAX_CPU_ISA`` (e.g. ``SSE41``), both capped below what the CPU has, never above:

    .venv/bin/python tools/batch_tolerance.py
    ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 .venv/bin/python tools/batch_tolerance.py
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import HAM_DIR, make_spread_packaged, spread_images  # noqa: E402

import skinlesion  # noqa: E402
from skinlesion.core.runtime import resolve_runtime  # noqa: E402
from skinlesion.inference import packaged  # noqa: E402
from skinlesion.inference.resolve import resolve_model  # noqa: E402


def _cpu() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    found = sorted(set(re.findall(r"\b(avx512f|avx512_vnni|avx2|avx_vnni)\b", flags)))
    return ", ".join(found) or "unknown"


def batch_difference(model, images: list) -> float:  # type: ignore[no-untyped-def]
    """max |p(each image alone) - p(all images in one batch)| over images and classes."""
    together, _ = model.predict_proba(images)
    alone = np.concatenate([model.predict_proba([p])[0] for p in images])
    return float(np.abs(together - alone).max())


def golden_difference(backend: str) -> float | None:
    """max |p - golden| of the packaged default on its golden images (None: no golden file or
    no images). Metadata as the golden tests give it: the ONNX graph takes images alone."""
    name = packaged.default_name()
    path = packaged.zoo_dir() / name / "golden.json" if name else None
    if path is None or not path.is_file():
        return None
    golden = json.loads(path.read_text())
    found = {p.stem: p for p in HAM_DIR.rglob("*.jpg")}
    if not all(g["image_id"] in found for g in golden["images"]):
        return None
    records = [g["metadata"] for g in golden["images"]]
    key = "given"
    if records[0] is None or backend == "onnx":
        records, key = None, "image_only"
    model = skinlesion.load_model(device="cpu", backend=backend)
    got = model.predict([found[g["image_id"]] for g in golden["images"]], metadata=records)
    classes = model.class_names
    want = np.array([[g[key]["probabilities"][c] for c in classes] for g in golden["images"]])
    return float(np.abs(got[classes].to_numpy(np.float64) - want).max())


def main() -> int:
    cpu = resolve_runtime("cpu")
    caps = {k: os.environ.get(k, "-") for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
    print(f"CPU vector extensions: {_cpu()}; kernel caps: {caps}")
    with tempfile.TemporaryDirectory() as tmp:
        images = spread_images(Path(tmp) / "images", n=24)
        spread = make_spread_packaged(Path(tmp) / "zoo", images[::2])
        for backend in ("torch", "onnx"):
            model = resolve_model(spread, cpu, backend=backend)
            print(f"spread model, {backend}: {batch_difference(model, images):.2e}")
    real = sorted(HAM_DIR.rglob("*.jpg"))[:16]
    if real:
        for backend in ("torch", "onnx"):
            model = resolve_model(None, cpu, backend=backend)
            print(
                f"packaged default, {backend}, 16 HAM10000 images: "
                f"{batch_difference(model, real):.2e}"
            )
        for backend in ("torch", "onnx"):
            drift = golden_difference(backend)
            if drift is not None:
                print(f"packaged default, {backend}, golden images vs golden.json: {drift:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

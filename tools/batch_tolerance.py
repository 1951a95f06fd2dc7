"""How far float32 probabilities of one image move with the batch it is computed in: the bound
behind the tests' ``BATCH_ATOL`` (tests/conftest.py).

oneDNN and onnxruntime pick kernels by tensor shape, so an image predicted alone and the same image
in a batch of 16 differ in the last bits. This prints that difference for the packaged default on
real HAM10000 images (when ``../shared/data`` is there) and for the tests' spread model, on this
machine's CPU (its vector extensions are printed too: run it on AVX2 and AVX-512 machines).

    .venv/bin/python tools/batch_tolerance.py
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import HAM_DIR, make_spread_packaged, spread_images  # noqa: E402

from skinlesion.core.runtime import resolve_runtime  # noqa: E402
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


def main() -> int:
    cpu = resolve_runtime("cpu")
    print(f"CPU vector extensions: {_cpu()}")
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""onnxruntime against eager PyTorch for the same model and batch, in one run, on 2 threads:
exports the model to a temporary folder, then times both on prepared real (or synthetic) images.

    python bench/onnx_speed.py --model runs/quick --json onnx_speed.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from skinlesion.benchmark.serving import onnx_vs_torch
from skinlesion.core.runtime import resolve_runtime
from skinlesion.data.preprocess import prepare_with_spec
from skinlesion.inference.onnx_export import export_onnx
from skinlesion.inference.packaged import resolve_model

HAM = Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=5.0, help="per batch size and backend")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    model = resolve_model(args.model, resolve_runtime("cpu"))
    spec = model.members[0].spec
    files = sorted((HAM / "HAM10000_images_part_1").glob("*.jpg"))[:32]
    if files:
        images = np.stack([prepare_with_spec(f, spec) for f in files])
    else:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 255, (32, spec.size, spec.size, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(model, tmp)
        sizes = [int(b) for b in args.batch_sizes.split(",")]
        result = onnx_vs_torch(model, tmp, images, sizes, args.threads, args.seconds)
    result["images"] = "HAM10000" if files else "synthetic"
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

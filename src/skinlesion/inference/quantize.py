"""Static int8 quantization of an exported graph with onnxruntime's tools, calibrated on images.

The fp32 graph of :func:`~skinlesion.inference.onnx_export.export_onnx` is quantized in QDQ
format (per-channel int8 weights, uint8 activations, MinMax calibration), convolutions only, which
onnxruntime's CPU kernels run as int8 convolutions on x86; the heads, temperatures, softmax and
ensemble mean stay fp32, so probabilities still sum to 1. The nodes that only feed
``unfamiliarity`` (stage statistics, Mahalanobis distances) stay fp32 too, so that output keeps its
scale; it still reads the int8 backbone's features, so it moves a little with the probabilities.

Calibration images should be training images of the model (for the packaged HAM10000 models,
HAM10000 images): decoded and prepared exactly as at prediction time.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from skinlesion.core.errors import ConfigError
from skinlesion.data.preprocess import (
    IMAGE_SUFFIXES,
    ImageDecodeError,
    PreprocessSpec,
    prepare_with_spec,
)
from skinlesion.inference.onnx_model import (
    ONNX_FILE,
    SPEC_FILE,
    read_export_spec,
    write_export_spec,
)

log = logging.getLogger(__name__)

CALIBRATION_BATCH = 8
QUANTIZED_OPS = ["Conv"]
# Names how the graph is quantized; part of an int8 graph's cache key, so that a change here
# never reuses a graph quantized the old way.
QUANTIZATION_ID = "qdq-s8-per-channel-weights-u8-activations-minmax-conv-only"


def calibration_images(folder: str | Path, count: int) -> list[Path]:
    """``count`` image files of ``folder`` (searched recursively), evenly spaced in name order,
    so the same folder always gives the same set."""
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"--calibration-images: {root} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"--calibration-images: no images ({'/'.join(IMAGE_SUFFIXES)}) in {root}")
    if count >= len(files):
        return files
    picks = np.linspace(0, len(files) - 1, count).round().astype(int)
    return [files[i] for i in dict.fromkeys(picks.tolist())]


def calibration_id(images: Sequence[Path]) -> str:
    """SHA-256 over the calibration images' bytes, in order (the cache key's part for them)."""
    h = hashlib.sha256()
    for path in images:
        h.update(path.name.encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def _batches(images: Sequence[Path], spec: PreprocessSpec) -> Iterator[dict[str, np.ndarray]]:
    arrays = []
    for path in images:
        try:
            arrays.append(prepare_with_spec(path, spec))
        except ImageDecodeError as err:
            log.warning("calibration: %s", err)
    if not arrays:
        raise ConfigError("--calibration-images: none of the images could be decoded")
    for i in range(0, len(arrays), CALIBRATION_BATCH):
        yield {"images": np.stack(arrays[i : i + CALIBRATION_BATCH])}


def _probability_nodes(model: Any) -> tuple[list[str], list[str]]:
    """Names of the nodes that lead to ``probabilities`` and of the others (which only feed
    ``unfamiliarity``)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    wanted, stack = set(), ["probabilities"]
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in wanted:
            continue
        wanted.add(node.name)
        stack.extend(node.input)
    names = [n.name for n in model.graph.node]
    return [n for n in names if n in wanted], [n for n in names if n not in wanted]


def _quantize(graph: Path, output: Path, reader: Any) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(dir=output.parent) as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(graph), str(pre), skip_symbolic_shape=True)
        _, fp32_only = _probability_nodes(onnx.load(str(pre)))
        quantize_static(
            str(pre),
            str(output),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=fp32_only,
            # Convolutions only: they are nearly all the work. Quantizing the tail as well
            # (temperature, softmax, the members' mean) rounds the probabilities to uint8 steps,
            # so that a row no longer sums to 1.
            op_types_to_quantize=QUANTIZED_OPS,
            calibrate_method=CalibrationMethod.MinMax,
        )


def quantize_export(export: Path, output: Path, images: Sequence[Path]) -> Path:
    """Write an int8 copy of the export folder ``export`` into ``output`` (``model.onnx``,
    ``spec.json`` with a ``quantization`` entry, ``card.json``), calibrated on ``images``."""
    from onnxruntime.quantization import CalibrationDataReader

    meta, spec = read_export_spec(export / SPEC_FILE)
    batches = _batches(images, spec)

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(batches, None)

    output.mkdir(parents=True, exist_ok=True)
    # onnxruntime's quantizer logs a line per node on the root logger.
    root_level = logging.getLogger().level
    logging.getLogger().setLevel(logging.WARNING)
    try:
        _quantize(export / ONNX_FILE, output / ONNX_FILE, Reader())
    finally:
        logging.getLogger().setLevel(root_level)
    meta["quantization"] = {
        "method": "onnxruntime quantize_static, QDQ, per-channel int8 weights, uint8 "
        "activations, MinMax calibration, convolutions only; unfamiliarity-only nodes kept fp32",
        "calibration_images": len(images),
        "calibration_id": calibration_id(images),
        "quantization_id": QUANTIZATION_ID,
    }
    write_export_spec(output, meta)
    if (export / "card.json").is_file():
        shutil.copyfile(export / "card.json", output / "card.json")
    return output / ONNX_FILE

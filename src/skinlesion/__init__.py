"""skinlesion: leakage-free training, evaluation and serving of dermoscopic lesion classifiers.

Example::

    import skinlesion
    model = skinlesion.load_model()          # the default packaged model, offline
    table = model.predict(["lesion.jpg"])    # probabilities, prediction, melanoma flag
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from skinlesion.core import VERSION
from skinlesion.core.labels import CLASSES

if TYPE_CHECKING:
    from pathlib import Path

    from skinlesion.inference.resolve import Predictor

__all__ = ["CLASSES", "load_model"]
__version__ = VERSION


def load_model(
    name: str | Path | None = None, device: str = "auto", backend: str = "auto"
) -> Predictor:
    """A packaged model by name (``None``: the default one), a packaged folder, a run folder, a
    checkpoint or a ``skinlesion export`` folder (its ONNX graph: images only, its TTA), loaded
    for prediction (:func:`~skinlesion.inference.resolve.resolve_model`). ``backend``: ``auto``
    (onnxruntime on a CPU, PyTorch on CUDA), ``torch``, ``onnx`` or ``onnx-int8``. Imports torch
    only when called."""
    from skinlesion.core.runtime import resolve_runtime
    from skinlesion.inference.resolve import resolve_model

    return resolve_model(name, resolve_runtime(device), backend)

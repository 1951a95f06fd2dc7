from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skinlesion.core.labels import CLASSES
from skinlesion.evaluation.calibration import apply_temperature
from skinlesion.evaluation.metrics import point_metrics
from skinlesion.evaluation.plots import (
    plot_confusion_matrices,
    plot_reliability_diagram,
    plot_roc_curves,
)

K = len(CLASSES)


@pytest.fixture
def predictions() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels (vasc absent), overconfident logits and their softmax."""
    rng = np.random.default_rng(0)
    y = rng.choice(K, size=400, p=[0.05, 0.1, 0.15, 0.05, 0.15, 0.5, 0.0])
    logits = rng.normal(scale=3.0, size=(400, K))
    logits[np.arange(400), y] += 3.0
    return y, logits, apply_temperature(logits, 1.0)


def assert_png(path: Path, min_bytes: int = 10_000) -> None:
    assert path.is_file()
    assert path.stat().st_size > min_bytes
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
        assert width > 300 and height > 300
        # Not a blank canvas: some pixels differ from the background.
        assert len(image.convert("L").getcolors(maxcolors=256)) > 10


def test_confusion_matrices(tmp_path: Path, predictions) -> None:
    y, _, probs = predictions
    cm = point_metrics(y, probs, classes=CLASSES)["confusion_matrix"]
    path = plot_confusion_matrices(cm, CLASSES, tmp_path / "nested" / "cm.png")
    assert path == tmp_path / "nested" / "cm.png"
    assert_png(path)
    with pytest.raises(ValueError):
        plot_confusion_matrices(np.zeros((3, 3)), CLASSES, tmp_path / "bad.png")


def test_reliability_diagram(tmp_path: Path, predictions) -> None:
    y, logits, probs = predictions
    assert_png(plot_reliability_diagram(y, probs, tmp_path / "before.png"))
    after = apply_temperature(logits, 2.0)
    path = plot_reliability_diagram(y, probs, tmp_path / "both.png", n_bins=10, probs_after=after)
    assert_png(path)


def test_roc_curves_skip_absent_classes(tmp_path: Path, predictions) -> None:
    y, _, probs = predictions
    assert_png(plot_roc_curves(y, probs, CLASSES, tmp_path / "roc.png"))

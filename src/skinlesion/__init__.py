"""skinlesion: leakage-free training, evaluation and serving of dermoscopic lesion classifiers."""

from skinlesion.core.labels import CLASSES

__all__ = ["CLASSES"]
__version__ = "0.1.0"

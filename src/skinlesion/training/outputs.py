"""What one fold writes into the run folder: per-epoch metrics, validation figures and
predictions, and the fold's end (:func:`close_fold`); shared by fine-tuning and the linear
probe."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from skinlesion.core.run_folder import FoldFolder
from skinlesion.evaluation.calibration import apply_temperature, fit_temperature, softmax
from skinlesion.evaluation.metrics import point_metrics
from skinlesion.evaluation.prediction_files import labelled_predictions, write_predictions
from skinlesion.training.tracking import Tracker, end_fold_tracking

METRIC_COLUMNS = (
    "epoch",
    "train_loss",
    "val_loss",
    "val_log_loss",
    "val_balanced_accuracy",
    "val_macro_f1",
    "val_macro_auroc",
    "val_accuracy",
    "lr",
    "seconds",
)
AVERAGE_PREFIX = "avg_"
AVERAGE_COLUMNS = tuple(
    AVERAGE_PREFIX + c for c in METRIC_COLUMNS if c.startswith("val_")
)  # the weight average's validation figures (train.average_from), blank before it starts


def write_metrics_rows(path: Path, rows: list[dict[str, Any]], averaging: bool = False) -> None:
    """The fold's metrics rows; ``averaging``: with the weight average's columns."""
    tmp = path.with_name(f".{path.name}.tmp")
    columns = METRIC_COLUMNS + AVERAGE_COLUMNS if averaging else METRIC_COLUMNS
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def val_figures(
    criterion: nn.Module, logits: np.ndarray, y: np.ndarray, mask: np.ndarray | None = None
) -> dict[str, float | None]:
    """Selection loss (the training criterion, over each image's label space ``mask`` in a run
    of sources) and headline metrics (of the full softmax) on validation logits."""
    lt = torch.from_numpy(logits)
    yt = torch.tensor(y, dtype=torch.long)  # a copy: y may be a read-only view (pandas)
    probs = torch.softmax(lt.double(), -1).numpy()
    # Only the scalars are read, which do not depend on the class names.
    pm = point_metrics(y, probs, classes=[f"class_{i}" for i in range(probs.shape[1])])
    loss = criterion(lt, yt) if mask is None else criterion(lt, yt, torch.from_numpy(mask))
    return {
        "val_loss": float(loss),
        "val_log_loss": float(nn.functional.cross_entropy(lt.double(), yt)),
        "val_balanced_accuracy": pm["balanced_accuracy"],
        "val_macro_f1": pm["macro_f1"],
        "val_macro_auroc": pm["macro_auroc"],  # None where no class has both outcomes
        "val_accuracy": pm["accuracy"],
    }


def write_val_predictions(
    val_t: pd.DataFrame,
    logits: np.ndarray,
    temperature: float,
    path: Path,
    classes: Sequence[str],
) -> None:
    """Calibrated probabilities (columns named by class) plus the raw ones (``raw_<class>``);
    a run of sources has the image's ``source`` after ``dx``, cross-site validation its
    ``site``."""
    probs = apply_temperature(logits, temperature)
    raw = softmax(logits)
    extra = [c for c in ("source", "site") if c in val_t.columns]
    keys = ["image_id", "lesion_id", "dx", *extra, "fold"]
    write_predictions(labelled_predictions(val_t[keys], probs, classes, raw=raw), path)


def fold_temperature(logits: np.ndarray, y: np.ndarray, calibrate: bool) -> float:
    """The fold's temperature on its validation images (``eval.calibrate``), else 1."""
    return fit_temperature(logits, y) if calibrate else 1.0


def close_fold(
    folder: FoldFolder,
    summary: dict[str, Any],
    val: pd.DataFrame,
    logits: np.ndarray,
    classes: Sequence[str],
    tracker: Tracker | None = None,
    test: tuple[pd.DataFrame, np.ndarray] | None = None,
) -> None:
    """The end of a fold, one for fine-tuning and the linear probe: its out-of-fold predictions
    at ``summary["temperature"]`` (the validation images in k-fold CV; in cross-site validation
    ``test`` holds the held-out site's images and logits, and the validation images go to
    ``inner_val_predictions.csv``), its summary, and its end in ``tracker``."""
    temperature = summary["temperature"]
    if test is not None:
        write_val_predictions(val, logits, temperature, folder.inner_val_predictions, classes)
    table, test_logits = test if test is not None else (val, logits)
    write_val_predictions(table, test_logits, temperature, folder.val_predictions, classes)
    folder.write_summary(summary)
    end_fold_tracking(tracker, summary, val["label"].to_numpy(), logits, classes, folder.root)

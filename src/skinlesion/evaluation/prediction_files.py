"""The labelled prediction files, written and read here only: a run's
``fold_K/val_predictions.csv``, ``fold_K/inner_val_predictions.csv`` and ``oof_predictions.csv``,
and ``skinlesion evaluate``'s ``predictions.csv``. Every figure of a report is recomputed from such
a file.

One row per image, columns in this order:

==================  ================================================================================
the image's         those of :data:`IMAGE_COLUMNS` the file has: ``image_id``, ``lesion_id``, ``dx``
                    (the label), ``source`` (a run of sources; evaluate: the labels file's stem),
                    ``site`` (cross-site validation), ``fold`` (a run)
one per class       the calibrated probability of each class, in the model's class order
``prediction``      the class of highest probability
after it            a run's uncalibrated ``raw_<class>``; evaluate's ``unfamiliarity``
==================  ================================================================================

The class columns are found by one rule (:func:`class_columns`): the columns before ``prediction``
that describe no image (not in :data:`IMAGE_COLUMNS`, nor a patient metadata field); a column after
``prediction`` is never a class. A file that breaks the layout fails naming the file and the
column or line.

Example::

    write_predictions(labelled_predictions(keys, probs, classes, raw=raw), path)
    saved = read_predictions(path)
    y, probs = saved.labels(), saved.probabilities()
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from skinlesion.core.errors import DataError
from skinlesion.core.labels import class_index
from skinlesion.data.tabular import METADATA_FIELDS

EVALUATION_PREDICTIONS = "predictions.csv"
"""What ``skinlesion evaluate`` writes into its output folder."""
IMAGE_COLUMNS: tuple[str, ...] = ("image_id", "lesion_id", "dx", "source", "site", "fold")
"""The columns that describe the image, before the class columns, in this order."""
REQUIRED_COLUMNS: tuple[str, ...] = ("image_id", "dx", "prediction")
FLOAT_FORMAT = "%.8g"
"""Eight significant digits: the probabilities read back give the same figures."""
RAW_PREFIX = "raw_"
_NOT_CLASSES = frozenset((*IMAGE_COLUMNS, "path", *METADATA_FIELDS))
_TEXT_COLUMNS = ("image_id", "lesion_id", "dx", "source", "site", "prediction")
_LAYOUT = "expected image_id, dx, a probability column per class, then prediction"
_SHOWN = 5  # faulty lines listed per column


@dataclass(frozen=True)
class PredictionFile:
    """A labelled prediction file as read: the table, its class columns in order, the path."""

    path: Path
    table: pd.DataFrame
    classes: tuple[str, ...]

    def labels(self) -> np.ndarray:
        """Each row's label as its class index."""
        return self.table["dx"].map(class_index(self.classes)).to_numpy()

    def probabilities(self, prefix: str = "") -> np.ndarray:
        """``(n, n_classes)`` float64: the calibrated probabilities, or ``prefix="raw_"``'s."""
        return self.table[[f"{prefix}{c}" for c in self.classes]].to_numpy(dtype=np.float64)

    @property
    def has_raw(self) -> bool:
        """Whether every class has its uncalibrated ``raw_<class>`` column (a run's files)."""
        return all(f"{RAW_PREFIX}{c}" in self.table.columns for c in self.classes)


def labelled_predictions(
    keys: pd.DataFrame,
    probs: np.ndarray,
    classes: Sequence[str],
    raw: np.ndarray | None = None,
    unfamiliarity: np.ndarray | None = None,
) -> pd.DataFrame:
    """The table of the layout above: ``keys`` (the image's columns, in order), a probability
    column per class, ``prediction``, then ``raw_<class>`` and ``unfamiliarity`` where given."""
    out = keys.reset_index(drop=True).copy()
    for i, c in enumerate(classes):
        out[c] = probs[:, i]
    out["prediction"] = [classes[i] for i in probs.argmax(1)]
    if raw is not None:
        for i, c in enumerate(classes):
            out[f"{RAW_PREFIX}{c}"] = raw[:, i]
    if unfamiliarity is not None:
        out["unfamiliarity"] = unfamiliarity
    return out


def write_predictions(table: pd.DataFrame, path: Path) -> None:
    """Write ``table`` (any file of this module) at ``path`` in :data:`FLOAT_FORMAT`,
    atomically: a reader never finds half a file, and an interrupted write leaves the previous
    one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        table.to_csv(tmp, index=False, float_format=FLOAT_FORMAT)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def class_columns(columns: Sequence[str], where: str | Path) -> list[str]:
    """The class columns of a file with ``columns`` (the module's rule); ``where`` names the
    file in the error when the layout is not there."""
    columns = [str(c) for c in columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise DataError(
            f"{where}: not a predictions file",
            [f"missing column(s) {missing}; found {columns}; {_LAYOUT}"],
        )
    found = [c for c in columns[: columns.index("prediction")] if c not in _NOT_CLASSES]
    if not found:
        raise DataError(
            f"{where}: not a predictions file",
            [f"no class column before prediction; found {columns}; {_LAYOUT}"],
        )
    return found


def read_predictions(path: str | Path) -> PredictionFile:
    """Read and check a labelled prediction file: the image's columns as text, ``fold`` an
    integer, each class column a probability, every label and prediction one of the classes;
    every fault is listed in one :class:`DataError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected a predictions file; {_LAYOUT})")
    try:
        table = pd.read_csv(path, dtype=dict.fromkeys(_TEXT_COLUMNS, str))
    except pd.errors.EmptyDataError as err:
        raise DataError(f"{path}: the file is empty ({_LAYOUT})") from err
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DataError(f"cannot parse {path}", [str(err)]) from err
    classes = class_columns(table.columns, path)
    problems = _probability_problems(table, classes) + _label_problems(table, classes)
    problems += _fold_problems(table)
    if problems:
        raise DataError(f"{path}: malformed predictions", problems)
    return PredictionFile(path, table, tuple(classes))


def _lines(values: pd.Series, bad: pd.Series, column: str, what: str) -> list[str]:
    """``line N: column C: 'V' what`` for the first faulty rows (header = line 1)."""
    rows = np.flatnonzero(bad.to_numpy())
    out = []
    for i in rows[:_SHOWN]:
        value = values.iloc[i]
        value = value.item() if isinstance(value, np.generic) else value  # 1.5, not np.float64
        out.append(f"line {i + 2}: column {column}: {value!r} {what}")
    more = int(bad.sum()) - _SHOWN
    if more > 0:
        out.append(f"column {column}: {more} more such line(s)")
    return out


def _probability_problems(table: pd.DataFrame, classes: Sequence[str]) -> list[str]:
    problems = []
    for c in classes:
        values = pd.to_numeric(table[c], errors="coerce")
        bad = values.isna() | (values < 0) | (values > 1 + 1e-6)
        problems += _lines(table[c], bad, c, "is not a probability")
        if not bad.any():
            table[c] = values.astype(np.float64)
    return problems


def _label_problems(table: pd.DataFrame, classes: Sequence[str]) -> list[str]:
    problems = []
    for column in ("dx", "prediction"):
        bad = ~table[column].isin(classes)
        problems += _lines(table[column], bad, column, f"is not one of the classes {list(classes)}")
    return problems


def _fold_problems(table: pd.DataFrame) -> list[str]:
    """A run's ``fold`` must be whole numbers; read as integers."""
    if "fold" not in table.columns or pd.api.types.is_integer_dtype(table["fold"]):
        return []
    values = pd.to_numeric(table["fold"], errors="coerce")
    bad = values.isna() | (values % 1 != 0)
    if bad.any():
        return _lines(table["fold"], bad, "fold", "is not an integer")
    table["fold"] = values.astype(np.int64)
    return []


HOLDOUT_COLUMNS: tuple[str, ...] = ("image_id", "unfamiliarity")
"""``fold_K/holdout_unfamiliarity.csv`` (cross-site validation): each held-out image's score."""


def write_holdout_unfamiliarity(image_ids: Sequence[str], scores: np.ndarray, path: Path) -> None:
    """The held-out site's unfamiliarity scores under the fold's member, written atomically."""
    table = pd.DataFrame({"image_id": list(image_ids), "unfamiliarity": np.asarray(scores)})
    write_predictions(table, path)


def read_holdout_unfamiliarity(path: Path) -> pd.DataFrame:
    """``image_id`` (text) and ``unfamiliarity`` (finite floats) of a held-out site, checked: a
    missing column, no rows or a score that is not a finite number fails naming the file."""
    try:
        table = pd.read_csv(path, dtype={"image_id": str})
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable held-out unfamiliarity file ({err})") from err
    missing = [c for c in HOLDOUT_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; expected {list(HOLDOUT_COLUMNS)}")
    scores = pd.to_numeric(table["unfamiliarity"], errors="coerce").to_numpy(np.float64)
    bad = np.flatnonzero(~np.isfinite(scores))
    if len(table) == 0 or len(bad):
        where = f"line {bad[0] + 2} is not a finite number" if len(bad) else "no rows"
        raise DataError(f"{path}: unfamiliarity {where}")
    return table.assign(unfamiliarity=scores)[list(HOLDOUT_COLUMNS)]

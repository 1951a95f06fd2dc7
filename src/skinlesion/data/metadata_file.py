"""A metadata CSV for ``predict --metadata``: its rows matched to the images by ``image_id``,
every fault of the file collected and raised at once with its line.

>>> table = read_metadata_csv("meta.csv", ["imgs/a1.jpg", "imgs/a2.jpg"])  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from skinlesion.core.errors import DataError
from skinlesion.data.tabular import METADATA_FIELDS, age_problems, unknown_columns

log = logging.getLogger(__name__)


def _image_keys(image: str | Path) -> set[str]:
    """The ``image_id`` values that name an image: its path as given, file name and stem."""
    path = Path(image)
    return {str(image), path.name, path.stem}


def _near_miss(image_id: str, images: Sequence[str | Path]) -> str | None:
    """The stem of the image ``image_id`` was likely meant for (same stem up to case, another
    extension or folder), or ``None``."""
    wanted = {image_id.lower(), Path(image_id).stem.lower()}
    for image in images:
        if Path(image).stem.lower() in wanted:
            return Path(image).stem
    return None


def _metadata_rows(
    ids: pd.Series, images: Sequence[str | Path]
) -> tuple[list[list[int]], list[str], list[int]]:
    """Per image, the rows (positions) whose id names it; problems (an image named by several
    rows, a row that looks meant for an image but names none); rows that name no image."""
    by_key: dict[str, list[int]] = {}
    for k, image in enumerate(images):
        for key in _image_keys(image):
            by_key.setdefault(key, []).append(k)
    matched: list[list[int]] = [[] for _ in images]
    problems, unused = [], []
    for pos, image_id in enumerate(ids):
        hits = by_key.get(image_id, [])
        for k in hits:
            matched[k].append(pos)
        if hits or not image_id:
            continue
        stem = _near_miss(image_id, images)
        if stem is None:
            unused.append(pos)
        else:
            problems.append(f"line {pos + 2}: no image named {image_id}; did you mean {stem}?")
    for image, rows in zip(images, matched, strict=True):
        if len({ids.iloc[r] for r in rows}) > 1:
            where = ", ".join(f"{r + 2} ({ids.iloc[r]})" for r in rows)
            problems.append(f"image {image} is named on several lines: {where}")
    return matched, problems, unused


def _listed(items: Sequence[str], limit: int = 10) -> str:
    more = len(items) - limit
    return ", ".join(items[:limit]) + (f" and {more} more" if more > 0 else "")


def _row_problems(table: pd.DataFrame, ids: pd.Series, path: Path) -> list[str]:
    """Empty and repeated ``image_id`` values, and ages that are not ages, with their lines."""
    from skinlesion.data.labelled_table import duplicate_images, empty_cells, number_lines

    lined = number_lines(pd.DataFrame({"image_id": ids}))
    problems = empty_cells(lined, {"image_id": "image_id"}, str(path))
    problems += duplicate_images(lined, str(path))
    if "age" in table.columns:
        problems += age_problems(table["age"].tolist(), lined["line"].tolist(), ids.tolist())
    return problems


def read_metadata_csv(path: str | Path, images: Sequence[str | Path]) -> pd.DataFrame:
    """The rows of a metadata CSV (``image_id`` and any of :data:`METADATA_FIELDS`) for each of
    ``images`` (paths), in that order. A row's ``image_id`` names an image by its file stem
    (``a1``), its file name (``a1.jpg``) or its path as given; an image without a row gets
    missing values (logged), and rows that name none of the images are logged as not used.

    Faults are collected and raised together as one :class:`DataError` naming the file and
    lines: no ``image_id`` column, no metadata column, a column that is neither metadata nor a
    labels file's (``site``: "did you mean localization?"), an empty or repeated id, an age that is
    not a number or is outside 0-:data:`AGE_MAX`, an image named by two rows (``a1`` and
    ``a1.jpg``), and an id that looks meant for an image but names none (``a1.png`` for
    ``a1.jpg``: "did you mean a1?").
    """
    from skinlesion.data.labelled_table import read_table

    path = Path(path)
    table = read_table(path)
    problems = []
    if "image_id" not in table.columns:
        problems.append(f"no image_id column; found {list(table.columns)}")
    fields = [f for f in METADATA_FIELDS if f in table.columns]
    if not fields:
        problems.append(f"none of the columns {list(METADATA_FIELDS)}; found {list(table.columns)}")
    if problems:
        raise DataError(f"{path}: not a metadata file", problems + unknown_columns(table.columns))
    ids = table["image_id"].astype(str).str.strip().reset_index(drop=True)
    problems = unknown_columns(table.columns) + _row_problems(table, ids, path)
    matched, mismatched, unused = _metadata_rows(ids, images)
    problems += mismatched
    if problems:
        raise DataError(f"{path}: invalid metadata", problems)
    if unused:
        lines = _listed([str(i + 2) for i in unused])
        log.warning(
            "%s: %d row(s) name none of the images, not used (lines %s)", path, len(unused), lines
        )
    rowless = [str(image) for image, rows in zip(images, matched, strict=True) if not rows]
    if rowless:
        log.warning(
            "%s: no row for %d image(s), predicted without metadata: %s",
            path,
            len(rowless),
            _listed(rowless),
        )
    first = [rows[0] if rows else -1 for rows in matched]  # -1: no such row, all missing
    return table[fields].reset_index(drop=True).reindex(first).reset_index(drop=True)

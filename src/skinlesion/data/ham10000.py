"""Reading and validating the HAM10000 release: its label table plus image folders.

The release calls its label table ``HAM10000_metadata`` (lesion, image, diagnosis, and the
patient's age, sex and site); here it is the *labels file*, and "metadata" means the patient
fields alone (:mod:`skinlesion.data.tabular`).

Accepts the official layout (``HAM10000_metadata.csv`` or the ``.tab`` that Dataverse serves,
images in ``HAM10000_images_part_1/`` and ``_part_2/``) or any folder tree holding
``<image_id>.jpg``. Validation collects every problem before raising, so a user fixes a broken
download in one pass instead of one error at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from skinlesion.core.errors import DataError
from skinlesion.core.labels import CLASSES
from skinlesion.data.labelled_table import (
    IndexedImages,
    attach_images,
    check_columns,
    duplicate_images,
    empty_cells,
    number_lines,
    read_table,
    strip,
    unknown_labels,
)

log = logging.getLogger(__name__)

REQUIRED_COLUMNS: tuple[str, ...] = ("lesion_id", "image_id", "dx")
LABELS_FILES: tuple[str, ...] = (
    "HAM10000_metadata.csv",
    "HAM10000_metadata.tab",
    "HAM10000_metadata",
)


def find_labels_file(root: Path) -> Path:
    """The labels file (``HAM10000_metadata``) of a HAM10000 folder (CSV preferred over the
    Dataverse ``.tab``)."""
    for name in LABELS_FILES:
        if (root / name).is_file():
            return root / name
    found = sorted(root.glob("*metadata*.csv")) + sorted(root.glob("*metadata*.tab"))
    if found:
        return found[0]
    raise DataError(
        f"no labels file in {root}",
        [f"expected one of {', '.join(LABELS_FILES)} (run `skinlesion download --dest {root}`)"],
    )


def validate_labels(
    df: pd.DataFrame,
    source: str,
    classes: Sequence[str] = CLASSES,
    required: Sequence[str] = REQUIRED_COLUMNS,
) -> pd.DataFrame:
    """Check columns, labels and identifiers (:mod:`skinlesion.data.labelled_table`'s steps),
    and that a lesion has one diagnosis; the table with clean string columns."""
    check_columns(df, required, source, f"expected at least {list(required)}")
    # Positions, not index labels: a frame passed in may not have a 0..n-1 index.
    df = strip(number_lines(df.reset_index(drop=True)), required)
    problems = empty_cells(df, {c: c for c in required}, source)
    problems += unknown_labels(df, classes, source) if "dx" in required else []
    problems += duplicate_images(df, source)
    if "lesion_id" in required:
        per_lesion = df[df["dx"].isin(set(classes))].groupby("lesion_id")["dx"].nunique()
        for lesion in per_lesion[per_lesion > 1].index:
            problems.append(
                f"{source}: lesion {lesion} has several diagnoses: "
                f"{sorted(set(df.loc[df['lesion_id'] == lesion, 'dx']))}"
            )
    if problems:
        raise DataError(f"{source}: invalid labels file", problems)
    return df.drop(columns=["line"])


def read_labels(path: Path) -> pd.DataFrame:
    """Read and validate a HAM10000 labels file (``HAM10000_metadata.csv``)."""
    return validate_labels(read_table(path), str(path))


def attach_paths(
    df: pd.DataFrame, image_root: Path, source: str, verify: bool = True
) -> pd.DataFrame:
    """Add a ``path`` column; every referenced image must be under ``image_root`` (and open, if
    ``verify``)."""
    lined = number_lines(df.reset_index(drop=True))
    out, problems = attach_images(lined, IndexedImages(image_root), source, verify, "image_id")
    if problems:
        raise DataError(f"{source}: missing or unreadable images", problems)
    return out.drop(columns=["line"]).set_axis(df.index)


def load_ham10000(
    root: str | Path, labels: str | Path | None = None, verify: bool = True
) -> pd.DataFrame:
    """The validated labels file of a HAM10000 folder (``labels``, default: found in ``root``)
    with a ``path`` column for each image.

    >>> df = load_ham10000("../shared/data/ham10000")  # doctest: +SKIP
    >>> df.columns[:3].tolist()  # doctest: +SKIP
    ['lesion_id', 'image_id', 'dx']
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            "data folder not found",
            [f"{root} does not exist (set data.root, or run `skinlesion download --dest {root}`)"],
        )
    labels_path = Path(labels) if labels else find_labels_file(root)
    df = read_labels(labels_path)
    df = attach_paths(df, root, str(labels_path), verify=verify)
    log.info("HAM10000: %d images, %d lesions from %s", len(df), df["lesion_id"].nunique(), root)
    return df.reset_index(drop=True)


def subset_by_lesion(df: pd.DataFrame, max_images: int | None, seed: int) -> pd.DataFrame:
    """A stratified subset of whole lesions holding about ``max_images`` images."""
    if max_images is None or max_images >= len(df):
        return df
    lesions = df.groupby("lesion_id", sort=True)["dx"].first()
    frac = max_images / len(df)
    picked = lesions.groupby(lesions, group_keys=False).apply(
        lambda s: s.sample(max(1, round(len(s) * frac)), random_state=seed)
    )
    out = df[df["lesion_id"].isin(set(picked.index))]
    return out.reset_index(drop=True)

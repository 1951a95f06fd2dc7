"""Cross-validation folds: stratified by diagnosis, grouped by lesion, saved as data.

A lesion photographed several times lives in exactly one fold; otherwise near-duplicate images
sit on both sides of a split and every validation number is inflated. A table of several
sources (a ``source`` column, ``data.sources``) is stratified by source x diagnosis, and its
``folds.csv`` keeps the ``source`` column.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import KFold, StratifiedGroupKFold, StratifiedKFold

from skinlesion.core.config import DEFAULT_FOLD_SEED, DEFAULT_N_FOLDS
from skinlesion.core.errors import DataError
from skinlesion.data.labelled_table import read_table

FOLD_COLUMNS: tuple[str, ...] = ("image_id", "lesion_id", "dx", "fold")
SOURCE_COLUMN = "source"
"""Optional column of ``folds.csv`` (after :data:`FOLD_COLUMNS`): the image's source."""
SITE_COLUMN = "site"
"""Optional column of ``folds.csv``: the image's site in cross-site validation
(``cv.holdout_column``)."""
_EXTRA_COLUMNS = (SOURCE_COLUMN, SITE_COLUMN)


def _strata(data: pd.DataFrame) -> np.ndarray:
    """What folds are stratified by: the diagnosis, or site (source) x diagnosis."""
    strata = data["dx"].astype(str)
    for column in _EXTRA_COLUMNS:
        if column in data.columns:
            strata = data[column].astype(str) + "|" + strata
    return strata.to_numpy()


@dataclass(frozen=True)
class FoldSplit:
    """The images of one model: ``train``, ``val`` (early stopping, temperature) and ``test`` (its
    out-of-fold predictions: ``val`` itself in k-fold cross-validation, the held-out site in
    cross-site validation)."""

    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    site: str | None = None
    """The held-out site (cross-site validation), else ``None``."""
    dropped: int = 0
    """Images of other sites left out because their lesion is also at the held-out site."""


INNER_FOLD = 0
"""In cross-site validation, the fold of the training sites' own folds that validates."""


def fold_split(table: pd.DataFrame, fold: int, holdout: Sequence[str] | None = None) -> FoldSplit:
    """Model ``fold``'s images of a table with a ``fold`` column (and ``site`` with ``holdout``).

    k-fold (``holdout`` None): train on the other folds, validate and test on fold ``fold``.
    Cross-site: test on every image of site ``holdout[fold]``; train on the other sites' images
    outside :data:`INNER_FOLD` and validate on those inside it. An image of another site whose
    lesion was also photographed at the held-out site is in neither, so no lesion crosses. The
    test images' ``fold`` is ``fold``.
    """
    if holdout is None:
        val = table[table["fold"] == fold]
        return FoldSplit(table[table["fold"] != fold], val, val)
    site = holdout[fold]
    at_site = (table[SITE_COLUMN] == site).to_numpy()
    shared = table["lesion_id"].isin(set(table.loc[at_site, "lesion_id"])).to_numpy() & ~at_site
    rest = ~at_site & ~shared
    inner = (table["fold"] == INNER_FOLD).to_numpy()
    # The test images' fold is the model's: what an out-of-fold table groups predictions by.
    test = table[at_site].assign(fold=fold)
    return FoldSplit(table[rest & ~inner], table[rest & inner], test, site, int(shared.sum()))


def make_folds(
    df: pd.DataFrame,
    n_folds: int = DEFAULT_N_FOLDS,
    seed: int = DEFAULT_FOLD_SEED,
    grouped: bool = True,
) -> pd.DataFrame:
    """``image_id, lesion_id, dx, fold`` (and ``source``, ``site`` when ``df`` has them) for
    every image, deterministic for a seed.

    ``grouped=False`` gives image-level stratified folds, which leak lesions across folds; it
    exists only so the leakage audit can measure how much that inflates the metrics.
    """
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    # Sort first so the folds depend on the data, not on the row order of the file.
    columns = ["image_id", "lesion_id", "dx"] + [c for c in _EXTRA_COLUMNS if c in df.columns]
    data = df[columns].sort_values("image_id").reset_index(drop=True)
    fold = np.full(len(data), -1, dtype=int)
    y = _strata(data)
    if grouped:
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        splits = splitter.split(data, y, groups=data["lesion_id"].to_numpy())
    elif min(pd.Series(y).value_counts()) >= n_folds:
        splits = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(data, y)
    else:
        splits = KFold(n_splits=n_folds, shuffle=True, random_state=seed).split(data)
    for k, (_, val_idx) in enumerate(splits):
        fold[val_idx] = k
    data["fold"] = fold
    return data[[*FOLD_COLUMNS, *columns[3:]]]


def check_folds(folds: pd.DataFrame) -> None:
    """Raise if a lesion sits in two folds or an image is missing a fold."""
    problems = []
    if (folds["fold"] < 0).any():
        problems.append(f"{int((folds['fold'] < 0).sum())} image(s) without a fold")
    per_lesion = folds.groupby("lesion_id")["fold"].nunique()
    for lesion in per_lesion[per_lesion > 1].index[:50]:
        problems.append(
            f"lesion {lesion} is in folds "
            f"{sorted(set(folds.loc[folds['lesion_id'] == lesion, 'fold']))}"
        )
    if folds["image_id"].duplicated().any():
        problems.append("duplicate image_id rows")
    if problems:
        raise DataError("folds leak or are incomplete", problems)


def save_folds(folds: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = [c for c in _EXTRA_COLUMNS if c in folds.columns]
    folds[[*FOLD_COLUMNS, *extra]].to_csv(path, index=False)


def read_folds(path: Path) -> pd.DataFrame:
    """Read a ``folds.csv``, checking columns and integer folds."""
    df = read_table(Path(path))
    missing = [c for c in FOLD_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(
            f"{path}: wrong columns",
            [f"missing {missing}; found {list(df.columns)}; expected {list(FOLD_COLUMNS)}"],
        )
    bad = [
        f"line {i + 2}: fold '{v}' is not an integer"
        for i, v in enumerate(df["fold"])
        if not re.fullmatch(r"-?[0-9]+", str(v))
    ]
    if bad:
        raise DataError(f"{path}: invalid folds", bad)
    df["fold"] = df["fold"].astype(int)
    return df


def align_folds(df: pd.DataFrame, folds: pd.DataFrame, source: str) -> pd.DataFrame:
    """Attach the ``fold`` column of a saved folds file to the metadata rows it covers."""
    dup = sorted(set(folds["image_id"][folds["image_id"].duplicated()]))
    if dup:
        raise DataError(f"{source}: images with several fold rows", [f"image {i}" for i in dup])
    lookup = folds.set_index("image_id")
    missing = [i for i in df["image_id"] if i not in lookup.index]
    if missing:
        raise DataError(f"{source}: images without a fold", [f"image {i}" for i in missing])
    out = df.copy()
    out["fold"] = lookup.loc[out["image_id"], "fold"].to_numpy()
    for column, what in (("lesion_id", "lesion ids"), (SOURCE_COLUMN, "sources")):
        if column not in out.columns or column not in lookup.columns:
            continue  # a folds.csv of one source has no source column
        mismatched = out[column].to_numpy() != lookup.loc[out["image_id"], column].to_numpy()
        if mismatched.any():
            raise DataError(
                f"{source}: {what} differ from the metadata",
                [f"image {i}" for i in out["image_id"][mismatched]],
            )
    return out


def source_balance(folds: pd.DataFrame) -> dict[str, float]:
    """Per source: the largest deviation (percentage points) of a class's share in a fold from
    its share in the source (:func:`fold_balance` within each source); empty for one source."""
    if SOURCE_COLUMN not in folds.columns:
        return {}
    return {
        str(name): float(fold_balance(part).abs().to_numpy().max())
        for name, part in folds.groupby(SOURCE_COLUMN, sort=True)
    }


def fold_balance(folds: pd.DataFrame) -> pd.DataFrame:
    """Each class's share (percent) per fold minus its share overall."""
    overall = folds["dx"].value_counts(normalize=True)
    per_fold = folds.groupby("fold")["dx"].value_counts(normalize=True).unstack(fill_value=0)
    return (per_fold - overall) * 100

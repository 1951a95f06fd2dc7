"""Labelled image sets beyond the HAM10000 release: any labels CSV over a folder of images
(``data.format: csv``) and the ISIC 2019 training release (``data.format: isic2019``).

Both give the table training uses: ``image_id``, ``dx``, ``lesion_id`` (the group; an image
is its own group where the source names none), ``path``, the file's ``line``, and the canonical
metadata columns ``age`` (float, NaN if unknown), ``sex`` and ``localization`` (strings, NaN if
unknown) wherever the source has them. As for HAM10000, every fault is collected first and
raised as one :class:`DataError` that names the file and line of each. A config's set is read
through :func:`skinlesion.data.sources.load_labelled_set`, which picks the reader by format.

>>> root = "../shared/data/isic2017"
>>> test = {"split": ["test"]}
>>> s = load_csv_set(f"{root}/images", f"{root}/labels.csv", where=test)  # doctest: +SKIP
>>> s.classes, s.grouped  # doctest: +SKIP
(('bkl', 'mel', 'nv'), False)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from skinlesion.core.config import DEFAULT_N_FOLDS
from skinlesion.core.errors import DataError
from skinlesion.core.sources import ColumnsConfig
from skinlesion.data.labelled_table import (
    FolderImages,
    attach_images,
    check_columns,
    duplicate_images,
    empty_cells,
    image_id_of,
    keep_rows,
    number_lines,
    read_table,
    unknown_labels,
)
from skinlesion.data.tabular import METADATA_FIELDS, MISSING_WORDS, NUMERIC_FIELDS

log = logging.getLogger(__name__)


ISIC2019_GROUND_TRUTH = "ISIC_2019_Training_GroundTruth.csv"
ISIC2019_METADATA = "ISIC_2019_Training_Metadata.csv"
ISIC2019_IMAGES = "ISIC_2019_Training_Input"
ISIC2019_CLASSES: dict[str, str] = {
    "MEL": "mel",
    "NV": "nv",
    "BCC": "bcc",
    # HAM10000's name for actinic keratoses (with intraepithelial carcinoma); ISIC 2019 took
    # HAM10000's akiec images into AK, so the names line up with HAM10000-trained models.
    "AK": "akiec",
    "BKL": "bkl",
    "DF": "df",
    "VASC": "vasc",
    "SCC": "scc",
}
ISIC2019_METADATA_COLUMNS: dict[str, str] = {
    "age_approx": "age",
    "anatom_site_general": "localization",
    "sex": "sex",
    "lesion_id": "lesion_id",
}


@dataclass(frozen=True)
class LabelledSet:
    """A validated table (see the module docstring), its class list and how it is grouped."""

    table: pd.DataFrame
    classes: tuple[str, ...]
    grouped: bool
    """The source names a lesion or patient for its images; else each image is its own group."""
    source: str
    notes: tuple[str, ...] = field(default=())
    sources: tuple[dict[str, Any], ...] = field(default=())
    """Several sources (``data.sources``): each one's ``name``, ``format``, ``source``,
    ``classes`` (its label space), ``grouped``, ``n_images`` and ``n_groups``; the table then
    has a ``source`` column."""

    def info(self) -> dict[str, Any]:
        """Plain-type description, saved in the run folder as ``dataset.json``."""
        out = {
            "source": self.source,
            "classes": list(self.classes),
            "grouped": self.grouped,
            "n_images": len(self.table),
            "n_groups": int(self.table["lesion_id"].nunique()),
            "notes": list(self.notes),
        }
        return {**out, "sources": [dict(s) for s in self.sources]} if self.sources else out


def canonical_metadata(df: pd.DataFrame) -> pd.DataFrame:
    """``age`` as float, ``sex``/``localization`` as stripped strings; unknown values NaN."""
    out = df.copy()
    if "age" in out.columns:
        out["age"] = pd.to_numeric(out["age"].astype(str).str.strip(), errors="coerce")
    for col in (f for f in METADATA_FIELDS if f not in NUMERIC_FIELDS):
        if col in out.columns:
            text = out[col].astype(str).str.strip()
            out[col] = text.where(~text.str.lower().isin(MISSING_WORDS), np.nan)
    return out


def check_table(
    df: pd.DataFrame, classes: Sequence[str] | None, n_folds: int, source: str
) -> list[str]:
    """Empty cells, unknown labels, duplicate images, and labels with fewer groups than folds
    (each fold must be able to hold one)."""
    problems = empty_cells(df, {"image_id": "image", "dx": "label"}, source)
    if classes is not None:
        problems += unknown_labels(df, classes, source)
    problems += duplicate_images(df, source)
    # A group may hold several labels: a patient can have a naevus and a melanoma.
    labelled = df[df["dx"] != ""]
    groups = labelled.groupby("dx")["lesion_id"].nunique()
    for label in classes if classes is not None else sorted(groups.index):
        n = int(groups.get(label, 0))
        if n < n_folds:
            problems.append(
                f"{source}: label '{label}' has {n} image group(s), fewer than the "
                f"{n_folds} folds (cv.n_folds); add images or drop the label"
            )
    return problems


def _finish(
    df: pd.DataFrame,
    classes: Sequence[str] | None,
    grouped: bool,
    source: str,
    notes: list[str],
) -> LabelledSet:
    found = tuple(classes) if classes is not None else tuple(sorted(set(df["dx"])))
    table = canonical_metadata(df.drop(columns=["image"]))
    return LabelledSet(table.reset_index(drop=True), found, grouped, source, tuple(notes))


def _column_names(columns: ColumnsConfig, header: Sequence[str]) -> dict[str, str | None]:
    """Canonical name -> the file's column; defaults are taken only where the file has them."""
    names: dict[str, str | None] = {"image_id": columns.image, "dx": columns.label}
    defaults = {"lesion_id": columns.group, **{m: getattr(columns, m) for m in METADATA_FIELDS}}
    for canonical, given in defaults.items():
        if given is not None:
            names[canonical] = given
        else:
            names[canonical] = canonical if canonical in header else None
    return names


def _canonical_frame(df: pd.DataFrame, names: Mapping[str, str | None]) -> pd.DataFrame:
    """The canonical columns first (from their mapped columns), then the file's other ones."""
    mapped = {c for c in names.values() if c is not None}
    out = pd.DataFrame(index=df.index)
    out["image"] = df[names["image_id"]].astype(str).str.strip()
    out["image_id"] = out["image"].map(image_id_of)
    out["dx"] = df[names["dx"]].astype(str).str.strip()
    group = names["lesion_id"]
    out["lesion_id"] = df[group].astype(str).str.strip() if group else out["image_id"]
    if group:  # an image with an empty group cell is its own group
        out["lesion_id"] = out["lesion_id"].where(out["lesion_id"] != "", out["image_id"])
    for meta in METADATA_FIELDS:
        column = names[meta]
        if column is not None:
            out[meta] = df[column]
    for col in df.columns:
        if col not in mapped and col not in out.columns:
            out[col] = df[col]
    return out


def load_csv_set(
    images: str | Path,
    labels: str | Path,
    columns: ColumnsConfig | None = None,
    classes: Sequence[str] | None = None,
    where: Mapping[str, Sequence[str]] | None = None,
    n_folds: int = DEFAULT_N_FOLDS,
    verify: bool = True,
) -> LabelledSet:
    """A labels CSV over an image folder, validated (``data.format: csv``)."""
    columns = columns or ColumnsConfig()
    labels, folder = Path(labels), Path(images)
    df = read_table(labels)
    names = _column_names(columns, list(df.columns))
    wanted = [c for c in names.values() if c is not None]
    check_columns(df, wanted, str(labels), "set data.columns")
    df = keep_rows(number_lines(df), where, str(labels), "where")
    table = _canonical_frame(df, names)
    table["line"] = df["line"]
    table, problems = attach_images(table, FolderImages(folder), str(labels), verify)
    problems += check_table(table, classes, n_folds, str(labels))
    if problems:
        raise DataError(f"{labels}: invalid labelled set", problems)
    grouped = names["lesion_id"] is not None
    return _finish(table, classes, grouped, str(labels), [])


def _isic2019_labels(gt: pd.DataFrame, source: str) -> tuple[pd.DataFrame, list[str], list[str]]:
    """``image``, ``image_id``, ``dx`` and ``line`` from the one-hot table; problems; notes."""
    df = gt
    notes, problems = [], []
    onehot = df[list(ISIC2019_CLASSES)].apply(pd.to_numeric, errors="coerce")
    if "UNK" in df.columns:
        unk = pd.to_numeric(df["UNK"], errors="coerce").fillna(0) >= 0.5
        notes.append(
            f"the UNK column is ignored (not a diagnosis); {int(unk.sum())} image(s) labelled "
            f"UNK dropped"
        )
        df, onehot = df[~unk], onehot[~unk]
    hits = onehot >= 0.5
    for r, n in zip(df.itertuples(), hits.sum(axis=1), strict=True):
        if n != 1:
            problems.append(
                f"{source} line {r.line} (image {r.image}): {n} diagnoses marked, expected one"
            )
    codes = np.array(list(ISIC2019_CLASSES.values()))
    dx = np.where(hits.sum(axis=1) == 1, codes[hits.to_numpy().argmax(axis=1)], "")
    image = df["image"].astype(str).str.strip()
    out = pd.DataFrame({"image": image, "image_id": image, "dx": dx, "line": df["line"]})
    return out.reset_index(drop=True), problems, notes


def _isic2019_metadata(labels: pd.DataFrame, meta: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Join the metadata table's renamed columns; a missing lesion id makes its own group."""
    keep = {c: ISIC2019_METADATA_COLUMNS[c] for c in meta.columns if c in ISIC2019_METADATA_COLUMNS}
    meta = meta.assign(image=meta["image"].astype(str).str.strip())
    meta = meta.drop_duplicates("image")[["image", *keep]].rename(columns=keep)
    out = labels.merge(meta, on="image", how="left", validate="one_to_one")
    lesion = out["lesion_id"].fillna("") if "lesion_id" in out.columns else pd.Series("", out.index)
    lesion = lesion.astype(str).str.strip()
    own = lesion == ""
    out["lesion_id"] = lesion.where(~own, out["image_id"])
    note = f"{int(own.sum())} of {len(out)} image(s) have no lesion_id: each is its own group"
    return out, note


def load_isic2019(
    root: str | Path,
    where: Mapping[str, Sequence[str]] | None = None,
    n_folds: int = DEFAULT_N_FOLDS,
    verify: bool = True,
) -> LabelledSet:
    """The ISIC 2019 training release in ``root`` (``data.format: isic2019``): the one-hot
    ground truth (8 diagnoses, ``UNK`` ignored), the metadata table and the image folder."""
    root = Path(root)
    gt_path, meta_path = root / ISIC2019_GROUND_TRUTH, root / ISIC2019_METADATA
    absent = [str(p) for p in (gt_path, meta_path, root / ISIC2019_IMAGES) if not p.exists()]
    if absent:
        raise DataError(
            f"{root}: not an ISIC 2019 training release", [f"{p}: not found" for p in absent]
        )
    gt, meta = read_table(gt_path), read_table(meta_path)
    wanted = [(gt_path, gt, c) for c in ["image", *ISIC2019_CLASSES, *(where or {})]]
    missing = [f"{path}: missing column {c}" for path, t, c in wanted if c not in t.columns]
    if "image" not in meta.columns:
        missing.append(f"{meta_path}: missing column image")
    if missing:
        raise DataError(f"{root}: wrong columns", missing)
    kept = keep_rows(number_lines(gt), where, str(gt_path), "where")
    labels, problems, notes = _isic2019_labels(kept, str(gt_path))
    table, note = _isic2019_metadata(labels, meta)
    images = FolderImages(root / ISIC2019_IMAGES)
    table, bad_images = attach_images(table, images, str(gt_path), verify)
    classes = tuple(sorted(ISIC2019_CLASSES.values()))
    problems += bad_images + check_table(table, classes, n_folds, str(gt_path))
    if problems:
        raise DataError(f"{root}: invalid ISIC 2019 release", problems)
    grouped = bool((table["lesion_id"] != table["image_id"]).any())
    for text in [*notes, note]:
        log.info("ISIC 2019: %s", text)
    return _finish(table, classes, grouped, str(root), [*notes, note])

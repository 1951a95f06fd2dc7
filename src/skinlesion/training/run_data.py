"""What every fold of a run shares: the table of images with folds and labels, the image cache
and the preprocessing spec."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from skinlesion.core.config import Config, check_name
from skinlesion.core.errors import ConfigError, DataError
from skinlesion.core.labels import class_index
from skinlesion.data.cache import build_cache
from skinlesion.data.datasets import LabelledSet
from skinlesion.data.folds import (
    SITE_COLUMN,
    FoldSplit,
    align_folds,
    check_folds,
    fold_split,
    make_folds,
    read_folds,
    save_folds,
)
from skinlesion.data.preprocess import PreprocessSpec, measure_detail
from skinlesion.data.sources import load_labelled, warn_ungrouped_sources
from skinlesion.data.tabular import MetadataSpec, encode_metadata, missing_vector
from skinlesion.inference.forward import ImageRows
from skinlesion.training.builders import run_spec

log = logging.getLogger(__name__)


@dataclass
class RunData:
    """Everything the folds share: table (with ``fold`` and ``label``), cached images, spec."""

    table: pd.DataFrame
    images: ImageRows
    spec: PreprocessSpec
    cache_root: Path
    dataset: dict[str, Any] = field(default_factory=dict)
    """What :meth:`LabelledSet.info` says of the data (saved as the run's ``dataset.json``)."""
    source_classes: dict[str, tuple[str, ...]] | None = None
    """A run of sources (``data.sources``): each source's label space; ``None`` for one set."""
    holdout: tuple[str, ...] | None = None
    """Cross-site validation (``cv.holdout_column``): the site each model holds out, by fold
    number; ``None`` for k-fold cross-validation."""

    def split(self, fold: int) -> FoldSplit:
        """Model ``fold``'s training, validation and test images (:func:`fold_split`)."""
        return fold_split(self.table, fold, self.holdout)


def _folds_table(
    cfg: Config, folds_out: Path | None, labelled: LabelledSet | None = None
) -> pd.DataFrame:
    """The labelled table (``data.max_images`` applied) with a ``fold`` column: made, or read
    from cv.folds_file."""
    labelled = labelled or load_labelled(cfg)
    df = with_sites(labelled.table, cfg)
    if cfg.cv.folds_file:
        df = align_folds(df, read_folds(Path(cfg.cv.folds_file)), cfg.cv.folds_file)
    else:
        folds = make_folds(df, cfg.cv.n_folds, cfg.cv.seed, grouped=cfg.cv.grouped)
        df = df.merge(folds[["image_id", "fold"]], on="image_id", validate="one_to_one")
    if cfg.cv.grouped:
        check_folds(df)
    else:
        log.warning(
            "cv.grouped=false: images of one lesion may sit in several folds; the "
            "metrics of this run are inflated by leakage"
        )
    warn_ungrouped_sources(labelled)
    for note in labelled.notes:
        log.info("data: %s", note)
    if folds_out is not None:
        save_folds(df, folds_out)
    return df.sort_values("image_id").reset_index(drop=True)


def with_sites(table: pd.DataFrame, cfg: Config) -> pd.DataFrame:
    """The table with a ``site`` column from ``cv.holdout_column`` (a source's name where the
    column is missing or empty); unchanged for k-fold cross-validation."""
    column = cfg.cv.holdout_column
    if column is None:
        return table
    if column in table.columns:
        site = table[column].astype("string").str.strip().replace("", pd.NA)
    else:
        site = pd.Series(pd.NA, index=table.index, dtype="string")
    if "source" in table.columns:
        site = site.fillna(table["source"].astype("string"))
    missing = table.loc[site.isna().to_numpy(), "image_id"].tolist()
    if missing:
        raise DataError(
            f"cv.holdout_column={column}: {len(missing)} image(s) name no site",
            [f"image {i}: no {column}" for i in missing],
        )
    return table.assign(**{SITE_COLUMN: site.astype(str).to_numpy()})


def holdout_sites(table: pd.DataFrame, cfg: Config) -> tuple[str, ...] | None:
    """The sites held out, by fold number (``cv.holdout``, else every site); each must be one."""
    if cfg.cv.holdout_column is None:
        return None
    present = sorted(set(table[SITE_COLUMN]))
    sites = tuple(cfg.cv.holdout) if cfg.cv.holdout is not None else tuple(present)
    for site in sites:
        if site not in present:
            check_name("cv.holdout", site, present, f"site of {cfg.cv.holdout_column}")
    if len(present) < 2:
        raise ConfigError(
            f"cv.holdout_column={cfg.cv.holdout_column}: one site ({present}); cross-site "
            "validation needs at least two"
        )
    return sites


def metadata_by_row(data: RunData, spec: MetadataSpec | None) -> np.ndarray | None:
    """Encoded metadata (rows of the image cache, ``spec.dim``) of the run's images, indexed like
    ``data.images``; ``None`` for an image-only model."""
    if spec is None:
        return None
    out = np.tile(missing_vector(spec), (len(data.images), 1))
    out[data.table["row"].to_numpy()] = encode_metadata(data.table, spec)
    return out


def load_run_data(
    cfg: Config,
    folds_out: Path | None,
    progress: bool = True,
    labelled: LabelledSet | None = None,
) -> RunData:
    """Validate the data (``labelled``: as already read), make or read the folds, and build (or
    reuse) the image cache."""
    labelled = labelled or load_labelled(cfg)
    df = _folds_table(cfg, folds_out, labelled)
    spec = run_spec(cfg, labelled.classes)
    if cfg.data.match_detail:
        spec = replace(spec, detail=measure_detail(df["path"].tolist(), seed=cfg.cv.seed))
        log.info("training images' detail: %s", spec.detail.label())
    df["label"] = df["dx"].map(class_index(spec.class_names)).astype(int)
    cache = build_cache(
        df["image_id"].tolist(),
        df["path"].tolist(),
        cfg.data.image_size,
        Path(cfg.data.cache_dir) if cfg.data.cache_dir else None,
        spec.interpolation,
        spec.colour_constancy,
        progress=progress,
    )
    df["row"] = cache.rows(df["image_id"].tolist())
    fmt = cfg.data.format if cfg.data.sources is None else "sources"
    info = {"format": fmt, **labelled.info()}
    spaces = {s["name"]: tuple(s["classes"]) for s in labelled.sources} or None
    return RunData(df, cache.images, spec, cache.root, info, spaces, holdout_sites(df, cfg))


def label_mask(data: RunData, table: pd.DataFrame) -> np.ndarray | None:
    """Each row's label space (bool, rows x classes) in a run of sources; ``None`` where the
    loss is over every class anyway (one set, or sources that all list every class)."""
    if data.source_classes is None:
        return None
    names = np.asarray(data.spec.class_names)
    spaces = {s: np.isin(names, list(kept)) for s, kept in data.source_classes.items()}
    if all(m.all() for m in spaces.values()):
        return None
    return np.stack([spaces[s] for s in table["source"]])


def table_sources(table: pd.DataFrame) -> np.ndarray | None:
    """The ``source`` of each row (what the weighted sampler balances with the class); ``None``
    for one set."""
    return table["source"].to_numpy() if "source" in table.columns else None


def targets_by_row(data: RunData) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each cached image row's class index and, where :func:`label_mask` gives one, its label
    space (bool, rows x classes)."""
    rows = torch.tensor(data.table["row"].to_numpy())
    labels = torch.zeros(len(data.images), dtype=torch.long)
    labels[rows] = torch.tensor(data.table["label"].to_numpy())
    mask = label_mask(data, data.table)
    if mask is None:
        return labels, None
    masks = torch.ones(len(data.images), mask.shape[1], dtype=torch.bool)
    masks[rows] = torch.from_numpy(mask)
    return labels, masks

"""Fitting each member's familiarity (:mod:`skinlesion.inference.familiarity`) on the images of
its own run, and storing it with the model.

Which images (the run's image cache, identity view, no augmentation):

- a fold model ``fold_K/best.pt``: up to 3,000 of its training images (a seeded random draw) for
  the Gaussians, up to 1,000 others for the normalisation, and fold K's validation images (held
  out) for the threshold;
- the final model ``final/best.pt`` (``fit-final``, trained on every image): a seeded 80/20 split of
  its lesions, the 80% as above and the 20% for the threshold. Those images were trained on, so
  its threshold is lower than a held-out one would be and its in-distribution refer rate is
  optimistic; its ``familiarity.safetensors`` and model card say so.

Written to ``fold_K/familiarity.safetensors`` (or ``final/``) beside the checkpoint, which
``load_ensemble`` reads; ``skinlesion fit-familiarity`` does it for runs and packaged models made
before it existed, skipping members that already have one.

Example::

    fit_run_familiarity("runs/quick")                      # every fold (and final) without one
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from skinlesion.core.config import Config, load_config
from skinlesion.core.errors import CheckpointError, SkinlesionError
from skinlesion.core.run_folder import FoldFolder, RunFolder
from skinlesion.core.runtime import Runtime, resolve_runtime
from skinlesion.data.folds import fold_split
from skinlesion.data.preprocess import Normalization
from skinlesion.evaluation.prediction_files import write_holdout_unfamiliarity
from skinlesion.inference.familiarity import (
    FAMILIARITY_FILE,
    Familiarity,
    StageCapture,
    fit_familiarity,
    save_familiarities,
)
from skinlesion.inference.forward import ImageRows, predict_logits
from skinlesion.models.checkpoint import load_checkpoint, model_from_checkpoint
from skinlesion.training.run_data import RunData, load_run_data

log = logging.getLogger(__name__)

MAX_FIT = 3000
MAX_CALIBRATION = 1000
FINAL_HELDOUT_SHARE = 0.2


def identity_statistics(
    model: nn.Module,
    images: ImageRows,
    rows: np.ndarray,
    runtime: Runtime,
    norm: Normalization,
    batch_size: int = 64,
    progress: bool = False,
) -> list[np.ndarray]:
    """Per stage, the (N, D) statistics of the prepared uint8 images ``images[rows]`` (an
    image cache, or an array), identity view."""
    with StageCapture(model) as cap:
        predict_logits(
            model,
            images,
            rows,
            batch_size=batch_size,
            runtime=runtime,
            norm=norm,
            progress=progress,
        )
    return cap.identity_numpy(1)


def training_split(rows: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, calibration) rows drawn from training ``rows``: a quarter (at most
    :data:`MAX_CALIBRATION`) for calibration, up to :data:`MAX_FIT` of the rest for the fit."""
    perm = np.random.default_rng(seed).permutation(np.asarray(rows))
    n_cal = min(MAX_CALIBRATION, max(2, len(perm) // 4))
    return perm[n_cal : n_cal + MAX_FIT], perm[:n_cal]


def member_rows(
    table: pd.DataFrame, fold: int, seed: int, holdout: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(training rows, held-out rows, how) for the member of ``fold`` (-1: the final model, an
    80/20 split of its lesions), from a table with ``row`` and ``fold`` (and ``lesion_id``;
    ``site`` in cross-site validation, whose ``holdout`` sites name the folds)."""
    if fold >= 0:
        split = fold_split(table, fold, holdout)
        how = {"fold": fold, "heldout": f"fold {fold}'s validation images", "trained_on": False}
        return np.array(split.train["row"]), np.array(split.val["row"]), how
    groups = table["lesion_id"] if "lesion_id" in table.columns else table["image_id"]
    unique = np.asarray(sorted(set(groups.astype(str))))
    rng = np.random.default_rng(seed)
    n_held = max(1, round(FINAL_HELDOUT_SHARE * len(unique)))
    held_groups = set(rng.choice(unique, n_held, replace=False).tolist())
    is_held = groups.astype(str).isin(held_groups).to_numpy()
    how = {
        "fold": fold,
        "heldout": f"{FINAL_HELDOUT_SHARE:.0%} of the model's own training lesions, left out "
        "of the fit but trained on, so its in-distribution refer rate is optimistic",
        "trained_on": True,
    }
    rows = np.array(table["row"])
    return rows[~is_held], rows[is_held], how


def fit_member(
    model: nn.Module,
    data: RunData,
    fold: int,
    runtime: Runtime,
    seed: int,
    batch_size: int = 64,
    progress: bool = False,
) -> Familiarity:
    """The familiarity of the member of ``fold`` (see the module's docstring)."""
    train_rows, held_rows, how = member_rows(data.table, fold, seed, data.holdout)
    fit_rows, cal_rows = training_split(train_rows, seed)

    def stats(rows: np.ndarray) -> list[np.ndarray]:
        norm = data.spec.normalization
        return identity_statistics(model, data.images, rows, runtime, norm, batch_size, progress)

    return fit_familiarity(stats(fit_rows), stats(cal_rows), stats(held_rows), how, seed)


def _run_config(run: RunFolder) -> Config:
    """The run's saved config, reading its own ``folds.csv`` (so the folds are the run's)."""
    overrides = [f"cv.folds_file={run.folds}"] if run.folds.is_file() else []
    return load_config(run.config, overrides)


def _members_without(run: RunFolder, refit: bool) -> list[Path]:
    found = [f.best for f in run.fold_folders() if f.best.is_file()]
    final = run.root / "final" / "best.pt"
    found += [final] if final.is_file() else []
    return [p for p in found if refit or not (p.parent / FAMILIARITY_FILE).is_file()]


def fit_run_familiarity(
    run_dir: str | Path,
    cfg: Config | None = None,
    data: RunData | None = None,
    runtime: Runtime | None = None,
    progress: bool = True,
    refit: bool = False,
    strict: bool = True,
) -> list[Path]:
    """Fit and write ``familiarity.safetensors`` for every member of a run folder (``fold_K``,
    ``final``) that has none (``refit``: all); the files written.

    ``cfg``, ``data`` and ``runtime`` are the run's (training passes its own); by default read
    from the run folder (its config and ``folds.csv``; the image cache rebuilt or reused).
    ``strict=False`` logs a member that cannot have one (a backbone without stages, too few
    images) and goes on, so a finished training never fails here.
    """
    run = RunFolder(Path(run_dir))
    if not run.config.is_file():
        raise CheckpointError(f"{run.root}: not a run folder (no config.yaml) or packaged model")
    todo = _members_without(run, refit)
    if not todo:
        log.info("%s: every member already has its %s", run.root, FAMILIARITY_FILE)
        return []
    cfg = cfg or _run_config(run)
    runtime = runtime or resolve_runtime(cfg.train.device)
    data = data or load_run_data(cfg, None, progress=progress)
    written = [fit_checkpoint_familiarity(p, cfg, data, runtime, progress, strict) for p in todo]
    return [p for p in written if p is not None]


def fit_checkpoint_familiarity(
    path: Path,
    cfg: Config,
    data: RunData,
    runtime: Runtime,
    progress: bool = True,
    strict: bool = True,
) -> Path | None:
    """Fit the familiarity of the checkpoint ``path`` (its fold decides the images) and write
    it beside it; ``strict=False``: ``None`` (logged) for a member that cannot have one."""
    ckpt = load_checkpoint(path)
    model, _ = model_from_checkpoint(ckpt, runtime, path)
    batch = cfg.train.eval_batch_size or cfg.train.batch_size * 2
    try:
        fam = fit_member(model, data, int(ckpt["fold"]), runtime, cfg.seed, batch, progress)
    except SkinlesionError as err:
        if strict:
            raise
        log.warning("%s: no familiarity (%s)", path.parent, err)
        return None
    log_fitted(path.parent, fam)
    if data.holdout is not None and int(ckpt["fold"]) >= 0:
        score_holdout_site(model, fam, data, int(ckpt["fold"]), runtime, batch, path.parent)
    return save_familiarities(path.parent / FAMILIARITY_FILE, {"": fam})


def score_holdout_site(
    model: nn.Module,
    fam: Familiarity,
    data: RunData,
    fold: int,
    runtime: Runtime,
    batch_size: int,
    folder: Path,
) -> Path:
    """The held-out site's unfamiliarity under the member's familiarity, for the cross-site
    report's refer rates ("unlike the training images" at another site's dermoscopy)."""
    test = data.split(fold).test
    norm = data.spec.normalization
    stats = identity_statistics(
        model, data.images, test["row"].to_numpy(), runtime, norm, batch_size
    )
    path = FoldFolder(folder).holdout_unfamiliarity
    write_holdout_unfamiliarity(test["image_id"].to_numpy(), fam.unfamiliarity(stats), path)
    return path


def log_fitted(where: Path | str, fam: Familiarity) -> None:
    i = fam.info
    log.info(
        "%s: familiarity fitted on %d images, normalised on %d, threshold %.3f at the 99th "
        "percentile of %d held-out images (%s)",
        where,
        i["n_fit"],
        i["n_calibration"],
        fam.threshold,
        i["n_heldout"],
        i["heldout"],
    )

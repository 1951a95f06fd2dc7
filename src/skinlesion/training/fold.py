"""One fold from start to finish: epochs with validation and early stopping, the best checkpoint
kept, then calibrated on the fold's validation images. The files it writes are described in
:mod:`skinlesion.core.run_folder`."""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from skinlesion.core.config import Config, config_to_dict
from skinlesion.core.errors import ConfigError
from skinlesion.core.labels import MELANOMA
from skinlesion.core.run_folder import FoldFolder, RunFolder
from skinlesion.core.runtime import Runtime
from skinlesion.data.folds import FoldSplit
from skinlesion.evaluation.calibration import apply_temperature
from skinlesion.evaluation.metrics import melanoma_threshold_for_specificity
from skinlesion.inference.refer import fit_refer_reference
from skinlesion.models.checkpoint import (
    atomic_torch_save,
    checkpoint_metadata,
    load_checkpoint,
    make_checkpoint,
    model_from_checkpoint,
)
from skinlesion.training.builders import model_kwargs
from skinlesion.training.fold_trainer import (
    FoldTrainer,
    train_one_epoch,
    trainer_for_table,
    validate,
    validation_logits,
)
from skinlesion.training.outputs import (
    AVERAGE_PREFIX,
    close_fold,
    fold_temperature,
    write_metrics_rows,
)
from skinlesion.training.run_data import (
    RunData,
    metadata_by_row,
)
from skinlesion.training.tracking import Tracker

log = logging.getLogger(__name__)


def _read_metrics(path: Path, upto_epoch: int) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path) as fh:
        return [r for r in csv.DictReader(fh) if int(r["epoch"]) <= upto_epoch]


def _split(data: RunData, fold: int) -> FoldSplit:
    split = data.split(fold)
    if len(split.train) == 0 or len(split.val) == 0:
        raise ConfigError(
            f"fold {fold} has {len(split.train)} training and {len(split.val)} validation "
            f"images; check cv.n_folds and cv.folds_to_run"
        )
    if split.site is not None:
        log.info(
            "fold %d holds out site %s: %d test images; %d training and %d validation images "
            "of the other sites (%d left out: their lesion is also at %s)",
            fold,
            split.site,
            len(split.test),
            len(split.train),
            len(split.val),
            split.dropped,
            split.site,
        )
    return split


def _eval_batch_size(cfg: Config) -> int:
    return cfg.train.eval_batch_size or cfg.train.batch_size * 2


def _save_epoch(
    cfg: Config, data: RunData, tr: FoldTrainer, folder: FoldFolder, row: dict[str, Any]
) -> None:
    """best.pt first (if improved), then last.pt; the caller writes metrics.csv after them, so a
    crash between two writes leaves a state that --resume continues from consistently. The kept
    weights are the trained ones or, where validation preferred it, their average."""
    if tr.state["best_epoch"] == row["epoch"]:
        model, extra, prefix = tr.model, None, ""
        if tr.state.get("best_average") and tr.average is not None:
            model, prefix = tr.average.averaged(tr.model), AVERAGE_PREFIX
            extra = {"weights": tr.average.describe()}
        metrics = {k[len(prefix) :]: v for k, v in row.items() if k.startswith(prefix + "val_")}
        ckpt = make_checkpoint(
            model,
            backbone=cfg.model.backbone,
            spec=data.spec,
            fold=folder.number,
            epoch=row["epoch"],
            metrics=metrics,
            config=config_to_dict(cfg),
            model_kwargs=model_kwargs(cfg.model),
            metadata=tr.metadata,
            extra=extra,
        )
        atomic_torch_save(ckpt, folder.best)
    atomic_torch_save(tr.snapshot(), folder.last)


def run_epoch(
    cfg: Config,
    data: RunData,
    tr: FoldTrainer,
    split: FoldSplit,
    runtime: Runtime,
    progress: bool,
) -> dict[str, Any]:
    """One epoch of a fold: :func:`~skinlesion.training.fold_trainer.train_one_epoch`, then
    :func:`~skinlesion.training.fold_trainer.validate`, then the schedule and the
    early-stopping state step; the epoch's metrics row. Once weights are averaged
    (``train.average_from``) their average is validated too, and the lower validation loss of the
    two is the epoch's candidate (the average's alone with ``train.average_only``)."""
    t0 = time.perf_counter()
    train_loss = train_one_epoch(cfg, data, tr, split.train, runtime, progress)
    figs = validate(tr, data, split.val, runtime, _eval_batch_size(cfg))
    tr.schedule.after_epoch(figs["val_loss"])
    epoch = tr.state["epoch"] + 1
    tr.state["epoch"] = epoch
    avg: dict[str, Any] = {}
    if tr.average is not None and tr.average.count:
        net = tr.average.averaged(tr.model)
        avg = validate(tr, data, split.val, runtime, _eval_batch_size(cfg), model=net)
    loss, from_average = figs["val_loss"], False
    if avg and (avg["val_loss"] < loss or cfg.train.average_only):
        loss, from_average = avg["val_loss"], True
    if loss < tr.state["best_val_loss"]:
        tr.state.update(
            best_val_loss=loss, best_epoch=epoch, bad_epochs=0, best_average=from_average
        )
    else:
        tr.state["bad_epochs"] += 1
    return {
        "epoch": epoch,
        "train_loss": train_loss,
        **figs,
        "lr": tr.optimizer.param_groups[0]["lr"],
        "seconds": time.perf_counter() - t0,
        **{AVERAGE_PREFIX + k: v for k, v in avg.items()},
    }


def fit_fold(
    cfg: Config,
    data: RunData,
    fold: int,
    run_dir: Path,
    runtime: Runtime,
    resume: bool = False,
    progress: bool = True,
    tracker: Tracker | None = None,
) -> dict[str, Any]:
    """Train one fold, keep the lowest-validation-loss checkpoint, calibrate it; its summary.
    Each epoch's metrics row, and the fold's end, go to ``tracker``."""
    tracker = tracker or Tracker()
    folder = RunFolder(run_dir).fold(fold)
    if resume and folder.finished:
        log.info("fold %d already complete, skipping", fold)
        return folder.read_summary()
    if runtime.dist.is_main:
        folder.root.mkdir(parents=True, exist_ok=True)
    split = _split(data, fold)
    tr = trainer_for_table(cfg, data, fold, split.train, runtime)
    if resume and folder.last.is_file():
        tr.restore(folder.last)
        log.info("fold %d: resuming after epoch %d", fold, tr.state["epoch"])
    rows = _read_metrics(folder.metrics, tr.state["epoch"])
    while tr.state["epoch"] < cfg.train.epochs:
        rows.append(run_epoch(cfg, data, tr, split, runtime, progress))
        if runtime.dist.is_main:
            _save_epoch(cfg, data, tr, folder, rows[-1])
            write_metrics_rows(folder.metrics, rows, averaging=tr.average is not None)
            tracker.log_epoch(fold, rows[-1])
        improved = tr.state["best_epoch"] == rows[-1]["epoch"]
        kept = ("average" if tr.state.get("best_average") else "trained") if improved else None
        _log_epoch(fold, cfg.train.epochs, rows[-1], kept)
        if runtime.dist.enabled:
            dist.barrier()
        if cfg.train.patience and tr.state["bad_epochs"] >= cfg.train.patience:
            log.info(
                "fold %d: early stop after %d epochs without a lower val_loss",
                fold,
                cfg.train.patience,
            )
            break
    return finish_fold(cfg, data, fold, folder.root, runtime, split, tracker)


def _log_epoch(fold: int, epochs: int, row: dict[str, Any], kept: str | None) -> None:
    """``kept``: None, or which weights became the fold's checkpoint (``trained``/``average``)."""
    key = AVERAGE_PREFIX + "val_loss"
    average = f" average's val_loss {row[key]:.4f}" if row.get(key) is not None else ""
    log.info(
        "fold %d epoch %d/%d: train_loss %.4f val_loss %.4f bal_acc %.3f macro_f1 %.3f%s (%.0fs)%s",
        fold,
        row["epoch"],
        epochs,
        row["train_loss"],
        row["val_loss"],
        row["val_balanced_accuracy"],
        row["val_macro_f1"],
        average,
        row["seconds"],
        "" if kept is None else (" * (average)" if kept == "average" else " *"),
    )


def finish_fold(
    cfg: Config,
    data: RunData,
    fold: int,
    fold_dir: Path,
    runtime: Runtime,
    split: FoldSplit,
    tracker: Tracker | None = None,
) -> dict[str, Any]:
    """Reload the best checkpoint, fit its temperature on the validation images, save the test
    images' predictions (the validation images' in k-fold CV; cross-site also keeps the
    validation images' and the thresholds they give)."""
    folder = FoldFolder(fold_dir)
    if runtime.dist.enabled:
        dist.barrier()
    ckpt = load_checkpoint(folder.best)
    model, _ = model_from_checkpoint(ckpt, runtime, folder.best)
    meta = metadata_by_row(data, checkpoint_metadata(ckpt))

    def tta_logits(table: pd.DataFrame, metadata: np.ndarray | None = meta) -> np.ndarray:
        return _tta_logits(cfg, model, data, table, runtime, metadata)

    logits = tta_logits(split.val)
    temperature = fold_temperature(logits, split.val["label"].to_numpy(), cfg.eval.calibrate)
    summary = {
        "fold": fold,
        "best_epoch": ckpt["epoch"],
        "metrics": ckpt["metrics"],
        "temperature": temperature,
        "n_train": len(split.train),
        "n_val": len(split.val),
        "averaged": "weights" in ckpt,  # the kept weights are train.average_from's mean
    }
    # Another clinic's images come without the patient's details: a held-out site is predicted
    # on images alone, as the cross-site score is defined.
    test = None if split.site is None else (split.test, tta_logits(split.test, None))
    if split.site is not None:
        summary.update(site_summary(split, apply_temperature(logits, temperature), data))
    if runtime.dist.is_main:
        ckpt["temperature"] = float(temperature)
        ckpt["tta"] = int(cfg.eval.tta)  # the views the temperature was fitted on
        atomic_torch_save(ckpt, folder.best)
        close_fold(folder, summary, split.val, logits, data.spec.class_names, tracker, test)
    log.info(
        "fold %d done: best epoch %d, val_loss %.4f, temperature %.3f",
        fold,
        ckpt["epoch"],
        ckpt["metrics"]["val_loss"],
        temperature,
    )
    return summary


def _tta_logits(
    cfg: Config,
    model: torch.nn.Module,
    data: RunData,
    table: pd.DataFrame,
    runtime: Runtime,
    meta: np.ndarray | None,
) -> np.ndarray:
    """The same TTA as inference (eval.tta), views averaged in logit space, so the temperature
    is fitted on exactly the output it will calibrate."""
    rows = table["row"].to_numpy()
    out = validation_logits(model, data, rows, _eval_batch_size(cfg), runtime, cfg.eval.tta, meta)
    return out.mean(0).astype(np.float64)


def site_summary(split: FoldSplit, val_probs: np.ndarray, data: RunData) -> dict[str, Any]:
    """What a cross-site model takes from its training sites' validation images: the melanoma
    threshold at 95% specificity and the refer rules, the ones a deployed model would use."""
    classes = data.spec.class_names
    y = split.val["label"].to_numpy()
    threshold = None
    if MELANOMA in classes and (y == list(classes).index(MELANOMA)).any():
        threshold = melanoma_threshold_for_specificity(y, val_probs, 0.95, classes=classes)
    return {
        "holdout_site": split.site,
        "n_test": len(split.test),
        "n_left_out": split.dropped,
        "mel_threshold": threshold,
        "mel_threshold_rule": "lowest p(mel) threshold with specificity >= 0.95 on the "
        "training sites' validation images",
        "refer": fit_refer_reference(val_probs),
    }

"""Cross-validated training: data -> folds -> cache -> one model per fold, resumable.

The run folder it writes is described in :mod:`skinlesion.core.run_folder`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn

from skinlesion.core.config import Config, config_to_dict, save_config
from skinlesion.core.errors import CheckpointError, ConfigError, torch_load_problem
from skinlesion.core.run_folder import FoldFolder, RunFolder, check_resume_config
from skinlesion.core.runtime import (
    DistInfo,
    Runtime,
    environment_info,
    init_distributed,
    planned_world_size,
    resolve_runtime,
    seed_everything,
)
from skinlesion.data.preprocess import PreprocessSpec
from skinlesion.data.sampling import draw_indices
from skinlesion.data.tabular import MetadataSpec, missing_vector
from skinlesion.evaluation.calibration import fit_temperature
from skinlesion.evaluation.report import write_oof_report
from skinlesion.inference.engine import predict_logits
from skinlesion.models.checkpoint import (
    atomic_torch_save,
    checkpoint_metadata,
    load_checkpoint,
    make_checkpoint,
    model_from_checkpoint,
)
from skinlesion.models.freezing import freeze_stages
from skinlesion.training.checks import check_config, check_world_size
from skinlesion.training.distributed import (
    convert_sync_batchnorm,
    rank_share,
    seed_rank_streams,
)
from skinlesion.training.engine import MetadataFeed, train_one_epoch
from skinlesion.training.fit_familiarity import fit_run_familiarity
from skinlesion.training.outputs import val_figures, write_metrics_rows, write_val_predictions
from skinlesion.training.probe import run_linear_probe
from skinlesion.training.run_data import (
    RunData,
    label_mask,
    load_run_data,
    metadata_by_row,
    table_sources,
    targets_by_row,
)
from skinlesion.training.setup import (
    Schedule,
    build_criterion,
    build_optimizer,
    build_run_model,
    model_kwargs,
    run_metadata_spec,
)

log = logging.getLogger(__name__)


def _read_metrics(path: Path, upto_epoch: int) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path) as fh:
        return [r for r in csv.DictReader(fh) if int(r["epoch"]) <= upto_epoch]


def validation_logits(
    model: nn.Module,
    data: RunData,
    rows: np.ndarray,
    batch_size: int,
    runtime: Runtime,
    tta: int = 1,
    metadata: np.ndarray | None = None,
) -> np.ndarray:
    """Logits (V, N, C) for ``rows``, computed in shards across ranks when distributed;
    ``metadata`` (encoded, by image row) for a fused model."""
    d = runtime.dist
    mine = rows[d.rank :: d.world_size]
    logits = predict_logits(
        model,
        data.images,
        mine,
        batch_size=batch_size,
        runtime=runtime,
        norm=data.spec.normalization,
        tta=tta,
        metadata=metadata,
    )
    if not d.enabled:
        return logits
    parts: list[Any] = [None] * d.world_size
    dist.all_gather_object(parts, logits)
    out = np.zeros((tta, len(rows), parts[0].shape[-1]), dtype=np.float32)
    for r, part in enumerate(parts):
        out[:, r :: d.world_size] = part
    return out


@dataclass
class FoldTrainer:
    """Everything that changes while one fold trains, and what --resume restores."""

    model: nn.Module
    train_model: nn.Module  # model, or its DDP / compiled wrapper
    frozen: list[nn.Module]
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    scaler: torch.amp.GradScaler | None
    gen: torch.Generator  # sampler draws (same on every rank)
    aug_gen: torch.Generator  # augmentation draws (per rank, seeded every epoch)
    steps: int  # optimizer steps per epoch, on every rank
    state: dict[str, Any]
    fold: int  # with the seed, epoch and rank, keys the per-rank draws
    metadata: MetadataSpec | None = None  # the encoding a fused model takes
    feed: MetadataFeed | None = None

    def snapshot(self) -> dict[str, Any]:
        return {
            "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            # Augmentation and dropout draws are seeded afresh every epoch (seed_epoch).
            "generator": self.gen.get_state(),
            "state": self.state,
        }

    def restore(self, path: Path) -> None:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                last = torch.load(path, map_location="cpu", weights_only=True)
            self.model.load_state_dict(last["state_dict"])
            self.optimizer.load_state_dict(last["optimizer"])
            self.schedule.load_state_dict(last["scheduler"])
            if self.scaler is not None and last.get("scaler"):
                self.scaler.load_state_dict(last["scaler"])
            self.gen.set_state(last["generator"])
            self.state = dict(last["state"])
        except Exception as err:  # noqa: BLE001 - truncated or foreign files raise many types
            raise CheckpointError(
                f"{path}: cannot resume from it, {torch_load_problem(err, 'training state')}; "
                f"delete it to restart this fold"
            ) from err

    def seed_epoch(self, seed: int, rank: int) -> None:
        """Seed the coming epoch's per-rank draws (augmentation, metadata drop, dropout and
        drop-path) from (seed, fold, epoch, rank): after the weights are broadcast every rank
        draws its own, and --resume draws what an uninterrupted run would."""
        seed_rank_streams(self.aug_gen, seed, self.fold, self.state["epoch"], rank)


def build_trainer(
    cfg: Config,
    spec: PreprocessSpec,
    fold: int,
    n_train: int,
    runtime: Runtime,
    metadata: MetadataSpec | None = None,
    metadata_rows: np.ndarray | None = None,
) -> FoldTrainer:
    """Model (pretrained, synchronised BatchNorm, frozen stages, DDP/compile), loss, optimizer,
    schedule, generators.

    ``train.batch_size`` is the global batch: the steps per epoch do not depend on the number
    of processes. A fused model takes ``metadata``'s encoding; ``metadata_rows`` holds it per
    image row.
    """
    seed_everything(cfg.seed + fold, cfg.train.deterministic)
    model = build_run_model(cfg, spec, runtime, metadata)
    if runtime.dist.enabled and cfg.train.sync_bn:
        model = convert_sync_batchnorm(model, runtime.device)
    frozen = freeze_stages(model, cfg.train.freeze_stages)
    train_model: nn.Module = model
    if runtime.dist.enabled:
        # Broadcasts rank 0's weights and buffers; the ranks' random streams part afterwards.
        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if cfg.train.compile:
        train_model = torch.compile(train_model)
    steps = cfg.train.steps_per_epoch or math.ceil(n_train / cfg.train.batch_size)
    optimizer = build_optimizer(cfg.train, model)
    return FoldTrainer(
        model=model,
        train_model=train_model,
        frozen=frozen,
        criterion=build_criterion(cfg.loss),
        optimizer=optimizer,
        schedule=Schedule(cfg.train, optimizer, steps),
        scaler=torch.amp.GradScaler("cuda") if runtime.needs_scaler else None,
        gen=torch.Generator().manual_seed(cfg.seed * 1000 + fold),
        aug_gen=torch.Generator(),
        steps=steps,
        state={"epoch": 0, "best_val_loss": math.inf, "best_epoch": 0, "bad_epochs": 0},
        fold=fold,
        metadata=metadata,
        feed=_feed(metadata, metadata_rows, cfg.model.metadata_drop),
    )


def _feed(spec: MetadataSpec | None, rows: np.ndarray | None, drop: float) -> MetadataFeed | None:
    if spec is None or rows is None:
        return None
    return MetadataFeed(
        torch.from_numpy(rows).float(), torch.from_numpy(missing_vector(spec)), drop
    )


def trainer_for_table(
    cfg: Config, data: RunData, fold: int, train_t: pd.DataFrame, runtime: Runtime
) -> FoldTrainer:
    """:func:`build_trainer` for the images of ``train_t``; with ``model.metadata``, the encoding
    is fitted on them."""
    spec = run_metadata_spec(cfg, train_t)
    rows = metadata_by_row(data, spec)
    return build_trainer(cfg, data.spec, fold, len(train_t), runtime, spec, rows)


def train_epoch(
    cfg: Config,
    data: RunData,
    tr: FoldTrainer,
    train_t: pd.DataFrame,
    runtime: Runtime,
    progress: bool,
) -> float:
    """Draw this epoch's global batches (the same on every rank), train this rank's share of
    each; the loss averaged over ranks."""
    d = runtime.dist
    tr.seed_epoch(cfg.seed, d.rank)
    picks = draw_indices(
        cfg.sampler.name,
        train_t["label"].to_numpy(),
        len(data.spec.class_names),
        tr.steps * cfg.train.batch_size,
        tr.gen,
        cfg.sampler.power,
        sources=table_sources(train_t),
    )
    rows = torch.tensor(train_t["row"].to_numpy(), dtype=torch.long)
    labels_by_row, masks_by_row = targets_by_row(data)
    loss = train_one_epoch(
        tr.train_model,
        images=data.images,
        labels=labels_by_row,
        order=rank_share(rows[picks], cfg.train.batch_size, d),
        batch_size=cfg.train.batch_size // d.world_size,
        criterion=tr.criterion,
        optimizer=tr.optimizer,
        runtime=runtime,
        norm=data.spec.normalization,
        augment=cfg.augment,
        generator=tr.aug_gen,
        scaler=tr.scaler,
        step_scheduler=tr.schedule.after_step,
        grad_clip=cfg.train.grad_clip,
        progress=progress and d.is_main,
        frozen=tr.frozen,
        metadata=tr.feed,
        masks=masks_by_row,
    )
    if d.enabled:
        t = torch.tensor([loss], device=runtime.device)
        dist.all_reduce(t)
        loss = float(t.item() / d.world_size)
    return loss


def _split(data: RunData, fold: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    table = data.table
    train_t, val_t = table[table["fold"] != fold], table[table["fold"] == fold]
    if len(train_t) == 0 or len(val_t) == 0:
        raise ConfigError(
            f"fold {fold} has {len(train_t)} training and {len(val_t)} validation "
            f"images; check cv.n_folds and cv.folds_to_run"
        )
    return train_t, val_t


def _eval_batch_size(cfg: Config) -> int:
    return cfg.train.eval_batch_size or cfg.train.batch_size * 2


def _save_epoch(
    cfg: Config, data: RunData, tr: FoldTrainer, folder: FoldFolder, row: dict[str, Any]
) -> None:
    """best.pt first (if improved), then last.pt, then metrics.csv: a crash between two writes
    leaves a state that --resume continues from consistently."""
    if tr.state["best_epoch"] == row["epoch"]:
        metrics = {k: v for k, v in row.items() if k.startswith("val_")}
        ckpt = make_checkpoint(
            tr.model,
            backbone=cfg.model.backbone,
            spec=data.spec,
            fold=folder.number,
            epoch=row["epoch"],
            metrics=metrics,
            config=config_to_dict(cfg),
            model_kwargs=model_kwargs(cfg.model),
            metadata=tr.metadata,
        )
        atomic_torch_save(ckpt, folder.best)
    atomic_torch_save(tr.snapshot(), folder.last)


def _run_epoch(
    cfg: Config,
    data: RunData,
    tr: FoldTrainer,
    split: tuple[pd.DataFrame, pd.DataFrame],
    runtime: Runtime,
    progress: bool,
) -> dict[str, Any]:
    """Train one epoch, validate, step the schedule and early-stopping state; the metrics row."""
    train_t, val_t = split
    t0 = time.perf_counter()
    train_loss = train_epoch(cfg, data, tr, train_t, runtime, progress)
    rows = val_t["row"].to_numpy()
    meta = tr.feed.by_row.numpy() if tr.feed is not None else None
    logits = validation_logits(tr.model, data, rows, _eval_batch_size(cfg), runtime, 1, meta)[0]
    figs = val_figures(tr.criterion, logits, val_t["label"].to_numpy(), label_mask(data, val_t))
    tr.schedule.after_epoch(figs["val_loss"])
    epoch = tr.state["epoch"] + 1
    tr.state["epoch"] = epoch
    if figs["val_loss"] < tr.state["best_val_loss"]:
        tr.state.update(best_val_loss=figs["val_loss"], best_epoch=epoch, bad_epochs=0)
    else:
        tr.state["bad_epochs"] += 1
    return {
        "epoch": epoch,
        "train_loss": train_loss,
        **figs,
        "lr": tr.optimizer.param_groups[0]["lr"],
        "seconds": time.perf_counter() - t0,
    }


def fit_fold(
    cfg: Config,
    data: RunData,
    fold: int,
    run_dir: Path,
    runtime: Runtime,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one fold, keep the lowest-validation-loss checkpoint, calibrate it; its summary."""
    folder = RunFolder(run_dir).fold(fold)
    if resume and folder.finished:
        log.info("fold %d already complete, skipping", fold)
        return folder.read_summary()
    if runtime.dist.is_main:
        folder.root.mkdir(parents=True, exist_ok=True)
    split = _split(data, fold)
    tr = trainer_for_table(cfg, data, fold, split[0], runtime)
    if resume and folder.last.is_file():
        tr.restore(folder.last)
        log.info("fold %d: resuming after epoch %d", fold, tr.state["epoch"])
    rows = _read_metrics(folder.metrics, tr.state["epoch"])
    while tr.state["epoch"] < cfg.train.epochs:
        rows.append(_run_epoch(cfg, data, tr, split, runtime, progress))
        if runtime.dist.is_main:
            _save_epoch(cfg, data, tr, folder, rows[-1])
            write_metrics_rows(folder.metrics, rows)
        _log_epoch(fold, cfg.train.epochs, rows[-1], tr.state["best_epoch"] == rows[-1]["epoch"])
        if runtime.dist.enabled:
            dist.barrier()
        if cfg.train.patience and tr.state["bad_epochs"] >= cfg.train.patience:
            log.info(
                "fold %d: early stop after %d epochs without a lower val_loss",
                fold,
                cfg.train.patience,
            )
            break
    return finish_fold(cfg, data, fold, folder.root, runtime, split[1])


def _log_epoch(fold: int, epochs: int, row: dict[str, Any], improved: bool) -> None:
    log.info(
        "fold %d epoch %d/%d: train_loss %.4f val_loss %.4f bal_acc %.3f macro_f1 %.3f (%.0fs)%s",
        fold,
        row["epoch"],
        epochs,
        row["train_loss"],
        row["val_loss"],
        row["val_balanced_accuracy"],
        row["val_macro_f1"],
        row["seconds"],
        " *" if improved else "",
    )


def finish_fold(
    cfg: Config, data: RunData, fold: int, fold_dir: Path, runtime: Runtime, val_t: pd.DataFrame
) -> dict[str, Any]:
    """Reload the best checkpoint, fit its temperature, save validation predictions."""
    folder = FoldFolder(fold_dir)
    if runtime.dist.enabled:
        dist.barrier()
    ckpt = load_checkpoint(folder.best)
    model, _ = model_from_checkpoint(ckpt, runtime)
    # Out-of-fold predictions use the same TTA as inference (eval.tta), views averaged in logit
    # space, so the temperature is fitted on exactly the output it will calibrate.
    rows = val_t["row"].to_numpy()
    meta = metadata_by_row(data, checkpoint_metadata(ckpt))
    batch = _eval_batch_size(cfg)
    logits = validation_logits(model, data, rows, batch, runtime, cfg.eval.tta, meta)
    logits = logits.mean(0).astype(np.float64)
    y = val_t["label"].to_numpy()
    temperature = fit_temperature(logits, y) if cfg.eval.calibrate else 1.0
    summary = {
        "fold": fold,
        "best_epoch": ckpt["epoch"],
        "metrics": ckpt["metrics"],
        "temperature": temperature,
        "n_train": int((data.table["fold"] != fold).sum()),
        "n_val": len(val_t),
    }
    if runtime.dist.is_main:
        ckpt["temperature"] = float(temperature)
        ckpt["tta"] = int(cfg.eval.tta)  # the views the temperature was fitted on
        atomic_torch_save(ckpt, folder.best)
        classes = data.spec.class_names
        write_val_predictions(val_t, logits, temperature, folder.val_predictions, classes)
        folder.write_summary(summary)
    log.info(
        "fold %d done: best epoch %d, val_loss %.4f, temperature %.3f",
        fold,
        ckpt["epoch"],
        ckpt["metrics"]["val_loss"],
        temperature,
    )
    return summary


def setup_logging(run_dir: Path | None, is_main: bool = True) -> logging.Handler | None:
    """Console logging, plus ``train.log`` in the run folder on the main process.

    Returns the file handler, which the caller removes when the run ends. A root level of DEBUG
    (``--verbose``) is kept.
    """
    root = logging.getLogger()
    if root.level != logging.DEBUG or not is_main:
        root.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not any(
        isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
        for h in root.handlers
    ):
        h = logging.StreamHandler()
        h.setFormatter(fmt)
        root.addHandler(h)
    if run_dir is not None and is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(RunFolder(run_dir).train_log)
        fh.setFormatter(fmt)
        root.addHandler(fh)
        return fh
    return None


def check_resume(run_dir: Path, cfg: Config, resume: bool) -> Config:
    """Refuse to mix runs: a folder with results needs --resume, and --resume may change only
    the keys that do not decide what is trained; the config to save in the run folder."""
    run = RunFolder(run_dir)
    if not run.config.is_file():
        return cfg
    if not resume and run.has_results():
        raise ConfigError(
            f"output_dir: {run_dir} already holds a run; pass --resume to continue it, "
            f"or choose another output_dir"
        )
    if not resume:
        return cfg
    saved = check_resume_config(run.config, cfg)
    # The folder holds the folds of both parts: its config says so.
    merged = cfg.model_copy(deep=True)
    old, new = saved.cv.folds_to_run, cfg.cv.folds_to_run
    merged.cv.folds_to_run = None if old is None or new is None else sorted({*old, *new})
    return merged


def run_cv(cfg: Config, resume: bool = False, progress: bool = True) -> Path:
    """Train every fold of ``cv.folds_to_run``; write the run folder and its OOF report.

    Names and paths are checked first (:func:`~skinlesion.training.checks.check_config`), and
    that the run fits torchrun's processes: a typo fails in seconds, before any folder, fold or
    cache entry exists.
    """
    check_config(cfg)
    check_world_size(cfg, planned_world_size())
    dist_info = init_distributed()
    run_dir = Path(cfg.output_dir)
    saved = check_resume(run_dir, cfg, resume) if dist_info.is_main else cfg
    handler = setup_logging(run_dir, dist_info.is_main)
    try:
        _run_cv(cfg, saved, run_dir, dist_info, resume, progress)
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
        if dist_info.enabled and dist.is_initialized():
            dist.destroy_process_group()
    return run_dir


def _shared_data(cfg: Config, run: RunFolder, dist_info: DistInfo, progress: bool) -> RunData:
    """The main process builds the image cache first; the others then find it ready."""
    if dist_info.is_main:
        data = load_run_data(cfg, run.folds, progress=progress)
    if dist_info.enabled:
        dist.barrier()
    if not dist_info.is_main:
        data = load_run_data(cfg, None, progress=False)
    return data


def _folds_to_run(cfg: Config, data: RunData) -> list[int]:
    present = sorted(set(data.table["fold"].tolist()))
    folds = cfg.cv.folds_to_run if cfg.cv.folds_to_run is not None else present
    unknown = [f for f in folds if f not in present]
    if unknown:
        raise ConfigError(f"cv.folds_to_run names folds {unknown}; the folds are {present}")
    return folds


def _run_cv(
    cfg: Config, saved: Config, run_dir: Path, dist_info: DistInfo, resume: bool, progress: bool
) -> None:
    """Train ``cfg``'s folds; ``saved`` is the config the run folder records."""
    runtime = resolve_runtime(cfg.train.device, cfg.train.amp, cfg.train.channels_last, dist_info)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    run = RunFolder(run_dir)
    if dist_info.is_main:
        save_config(saved, run.config)
        run.environment.write_text(json.dumps(environment_info(runtime), indent=2))
    data = _shared_data(cfg, run, dist_info, progress)
    if dist_info.is_main:
        run.dataset.write_text(json.dumps(data.dataset, indent=2))
    if runtime.device.type == "cuda":
        # The whole uint8 cache lives on the GPU (HAM10000 at 300 px: ~2.7 GB).
        data.images = torch.from_numpy(np.ascontiguousarray(data.images)).to(runtime.device)
    folds = _folds_to_run(cfg, data)
    if cfg.train.scheme == "linear_probe":
        run_linear_probe(cfg, data, run_dir, runtime, folds, resume, progress)
    else:
        for fold in folds:
            fit_fold(cfg, data, fold, run_dir, runtime, resume=resume, progress=progress)
        if dist_info.is_main:  # each fold's familiarity.safetensors (refer: unlike training)
            fit_run_familiarity(run_dir, cfg, data, runtime, progress, strict=False)
    if dist_info.is_main:
        write_oof_report(run_dir, n_boot=cfg.eval.n_boot)
    if dist_info.enabled:
        dist.barrier()

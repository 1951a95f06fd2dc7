"""One fold's trainer: model, loss, optimiser, schedule and generators (what --resume restores),
and one training epoch of it across ranks."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn

from skinlesion.core.config import Config
from skinlesion.core.errors import CheckpointError, torch_load_problem
from skinlesion.core.runtime import (
    Runtime,
    seed_everything,
)
from skinlesion.data.preprocess import PreprocessSpec
from skinlesion.data.sampling import draw_indices
from skinlesion.data.tabular import MetadataSpec, missing_vector
from skinlesion.inference.forward import predict_logits
from skinlesion.models.freezing import freeze_stages
from skinlesion.models.mixstyle import add_mixstyle
from skinlesion.training.averaging import WeightAverage
from skinlesion.training.builders import (
    Schedule,
    build_criterion,
    build_optimizer,
    build_run_model,
    run_metadata_spec,
)
from skinlesion.training.distributed import (
    convert_sync_batchnorm,
    rank_share,
    seed_rank_streams,
)
from skinlesion.training.outputs import val_figures
from skinlesion.training.run_data import (
    RunData,
    label_mask,
    metadata_by_row,
    table_sources,
    targets_by_row,
)
from skinlesion.training.steps import MetadataFeed, train_batches


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
    average: WeightAverage | None = None  # train.average_from's running mean of the weights

    def after_step(self) -> None:
        """After every optimizer step: the schedule, and the weight average once its epoch
        (``train.average_from``) has come."""
        self.schedule.after_step()
        if self.average is not None and self.state["epoch"] + 1 >= self.average.start:
            self.average.update(self.model)

    def snapshot(self) -> dict[str, Any]:
        return {
            "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            # Augmentation and dropout draws are seeded afresh every epoch (seed_epoch).
            "generator": self.gen.get_state(),
            "state": self.state,
            "average": self.average.state_dict() if self.average is not None else None,
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
            if self.average is not None and last.get("average"):
                device = next(self.model.parameters()).device
                self.average.load_state_dict(last["average"], device)
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
    """Model (pretrained, synchronised BatchNorm, frozen stages, MixStyle, DDP/compile), loss,
    optimizer, schedule, generators.

    ``train.batch_size`` is the global batch: the steps per epoch do not depend on the number
    of processes. A fused model takes ``metadata``'s encoding; ``metadata_rows`` holds it per
    image row.
    """
    seed_everything(cfg.seed + fold, cfg.train.deterministic)
    model = build_run_model(cfg, spec, runtime, metadata)
    if runtime.dist.enabled and cfg.train.sync_bn:
        model = convert_sync_batchnorm(model, runtime.device)
    frozen = freeze_stages(model, cfg.train.freeze_stages)
    if cfg.train.mixstyle > 0:
        add_mixstyle(model, cfg.train.mixstyle, cfg.train.mixstyle_alpha, cfg.train.mixstyle_stages)
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
        average=WeightAverage(cfg.train.average_from) if cfg.train.average_from else None,
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


def train_one_epoch(
    cfg: Config,
    data: RunData,
    tr: FoldTrainer,
    train_t: pd.DataFrame,
    runtime: Runtime,
    progress: bool,
) -> float:
    """One training epoch of a fold: draw its global batches with the fold's sampler (the same
    on every rank), :func:`~skinlesion.training.steps.train_batches` on this rank's share of
    each; the loss averaged over ranks. No validation."""
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
    loss = train_batches(
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
        step_scheduler=tr.after_step,
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


def validate(
    tr: FoldTrainer,
    data: RunData,
    val_t: pd.DataFrame,
    runtime: Runtime,
    batch_size: int,
    model: nn.Module | None = None,
) -> dict[str, float]:
    """The fold's validation figures after an epoch (one view; validation loss, the figure that
    selects the model, with each image's own label space in a run of sources) of its trained
    weights, or of ``model`` (the weight average)."""
    meta = tr.feed.by_row.numpy() if tr.feed is not None else None
    rows = val_t["row"].to_numpy()
    net = tr.model if model is None else model
    logits = validation_logits(net, data, rows, batch_size, runtime, 1, meta)[0]
    return val_figures(tr.criterion, logits, val_t["label"].to_numpy(), label_mask(data, val_t))

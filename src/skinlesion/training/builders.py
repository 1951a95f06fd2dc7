"""Each config section turned into what it describes, by one function each: the model (built and
placed on the device), preprocessing spec, loss, optimizer and learning-rate schedule.

Fine-tuning and the linear probe both build from here, so they cannot drift apart (a loss built
without the config's label smoothing, say).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from torch import nn

from skinlesion.core.config import Config, LossConfig, ModelConfig, TrainConfig
from skinlesion.core.runtime import Runtime
from skinlesion.data.preprocess import PreprocessSpec
from skinlesion.data.tabular import MetadataSpec, fit_metadata_spec
from skinlesion.models.factory import build_placed_model, default_spec
from skinlesion.training.losses import build_loss


def model_kwargs(model: ModelConfig) -> dict[str, Any]:
    """timm keyword arguments of the ``model`` section (stored in every checkpoint)."""
    return {"drop_rate": model.drop_rate, "drop_path_rate": model.drop_path_rate}


def build_run_model(
    cfg: Config, spec: PreprocessSpec, runtime: Runtime, metadata: MetadataSpec | None = None
) -> nn.Module:
    """The run's model, pretrained as the config says, with a head for the spec's classes (and
    a metadata branch for ``metadata``'s encoding, when given)."""
    return build_placed_model(
        runtime,
        cfg.model.backbone,
        len(spec.class_names),
        cfg.model.pretrained,
        cfg.model.weights,
        metadata=metadata,
        metadata_hidden=cfg.model.metadata_hidden,
        **model_kwargs(cfg.model),
    )


def run_metadata_spec(cfg: Config, train_table: pd.DataFrame) -> MetadataSpec | None:
    """The metadata encoding of ``model.metadata`` fitted on a fold's training images; ``None``
    when the run uses images only."""
    if not cfg.model.metadata:
        return None
    return fit_metadata_spec(train_table, cfg.model.metadata, cfg.model.metadata_sites)


def run_spec(cfg: Config, class_names: Sequence[str] | None = None) -> PreprocessSpec:
    """The preprocessing spec of the ``data`` and ``model`` sections, for ``class_names`` (the
    data's; default ``data.classes``, else HAM10000's)."""
    names = class_names if class_names is not None else cfg.data.classes
    return default_spec(
        cfg.model.backbone,
        cfg.data.image_size,
        cfg.data.interpolation,
        cfg.data.colour_constancy,
        tuple(names) if names else None,
    )


def build_criterion(loss: LossConfig, reduction: str = "mean") -> nn.Module:
    """The ``loss`` section; ``reduction="none"`` gives one value per sample."""
    return build_loss(loss.name, loss.gamma, loss.alpha, loss.label_smoothing, reduction)


def build_optimizer(train: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if train.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    return torch.optim.SGD(
        params, lr=train.lr, momentum=0.9, nesterov=True, weight_decay=train.weight_decay
    )


class Schedule:
    """The learning-rate schedule of the ``train`` section, stepped in one place.

    ``cosine`` (with linear warm-up) and ``none`` (warm-up only) advance after every optimizer
    step; ``plateau`` halves the rate after 2 epochs without a lower validation loss.
    """

    def __init__(self, train: TrainConfig, optimizer: torch.optim.Optimizer, steps: int):
        self.kind = train.scheduler
        self.scheduler: Any
        if self.kind == "plateau":
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, factor=0.5, patience=2
            )
            return
        total = train.epochs * steps
        warmup = min(train.warmup_epochs * steps, max(total - 1, 0))
        cosine = self.kind == "cosine"

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if not cosine:
                return 1.0
            progress = (step - warmup) / max(total - warmup, 1)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def after_step(self) -> None:
        if self.kind != "plateau":
            self.scheduler.step()

    def after_epoch(self, val_loss: float) -> None:
        if self.kind == "plateau":
            self.scheduler.step(val_loss)

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state)

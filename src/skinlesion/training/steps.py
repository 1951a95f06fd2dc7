"""The inner training loop: one optimisation step and one epoch over cached uint8 images."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from skinlesion.core.runtime import Runtime
from skinlesion.data.augment import AugmentConfig
from skinlesion.data.preprocess import Normalization
from skinlesion.inference.forward import ImageRows, gather, prepare
from skinlesion.models.fusion import drop_metadata


@dataclass
class MetadataFeed:
    """Encoded metadata for training a fused model: a row per cached image, the all-missing
    encoding, and the probability that a sample's whole vector is dropped."""

    by_row: torch.Tensor
    missing: torch.Tensor
    drop: float = 0.2

    def batch(self, rows: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return drop_metadata(self.by_row[rows.cpu()], self.missing, self.drop, generator)


def train_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    runtime: Runtime,
    scaler: torch.amp.GradScaler | None = None,
    grad_clip: float | None = None,
    metadata: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One optimisation step on a prepared batch (autocast, grad scaler, clipping); the loss.
    ``mask`` (bool, per image and class): each image's label space, for a run of sources."""
    with runtime.autocast():
        logits = model(x) if metadata is None else model(x, metadata.to(x.device))
        loss = criterion(logits, y) if mask is None else criterion(logits, y, mask)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return loss


def train_batches(
    model: nn.Module,
    *,
    images: ImageRows,
    labels: torch.Tensor,
    order: torch.Tensor,
    batch_size: int,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    runtime: Runtime,
    norm: Normalization,
    augment: AugmentConfig,
    generator: torch.Generator,
    scaler: torch.amp.GradScaler | None = None,
    step_scheduler: Callable[[], None] | None = None,
    grad_clip: float | None = None,
    progress: bool = True,
    frozen: Sequence[nn.Module] = (),
    metadata: MetadataFeed | None = None,
    masks: torch.Tensor | None = None,
) -> float:
    """Train on the image rows in ``order`` (drawn by the caller), batch by batch: gather,
    augment, step; the mean loss. No sampling, no ranks: one process's share of an epoch.

    ``labels[row]`` is the class of image row ``row``; ``step_scheduler`` is called after every
    optimizer step. ``frozen`` modules stay in eval mode, so their BatchNorm statistics do not
    drift. A fused model gets each batch's ``metadata``, whole vectors dropped at random.
    ``masks[row]`` (bool, classes) is the label space of image row ``row`` in a run of sources
    whose loss is masked; ``None`` trains over every class.
    """
    model.train()
    for m in frozen:
        m.eval()
    total, count = torch.zeros((), device=runtime.device), 0
    n_batches = math.ceil(len(order) / batch_size)
    for b in tqdm(range(n_batches), desc="train", leave=False, disable=not progress):
        rows = order[b * batch_size : (b + 1) * batch_size]
        if len(rows) < 2:  # BatchNorm cannot train on a single sample
            continue
        x = prepare(gather(images, rows, runtime.device), norm, runtime, augment, generator)
        y = labels[rows].to(runtime.device, non_blocking=True)
        meta = metadata.batch(rows, generator) if metadata is not None else None
        mask = masks[rows].to(runtime.device, non_blocking=True) if masks is not None else None
        loss = train_step(model, x, y, criterion, optimizer, runtime, scaler, grad_clip, meta, mask)
        if step_scheduler is not None:
            step_scheduler()
        total += loss.detach() * len(rows)
        count += len(rows)
    return float(total.item() / max(count, 1))

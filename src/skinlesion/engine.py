"""The inner loops: one training epoch and batched (TTA) prediction over cached uint8 images.

Images arrive as uint8 (N, S, S, 3), either a NumPy memmap (CPU path: rows are read per batch)
or a torch tensor already on the device (GPU path: the whole cache moved once). Conversion,
augmentation and normalisation run batched on the device, so the CPU does no per-image work.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from skinlesion.augment import AugmentConfig, augment_batch, normalize, to_float, tta_views
from skinlesion.runtime import Runtime

ImageSource = np.ndarray | torch.Tensor


def gather(
    images: ImageSource, rows: torch.Tensor | np.ndarray, device: torch.device
) -> torch.Tensor:
    """uint8 (B, S, S, 3) rows of the image source, on ``device``."""
    if isinstance(images, torch.Tensor):
        idx = torch.as_tensor(rows, device=images.device)
        return images.index_select(0, idx).to(device, non_blocking=True)
    idx = np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows)
    batch = torch.from_numpy(np.ascontiguousarray(images[idx]))
    if device.type == "cuda":
        batch = batch.pin_memory()
    return batch.to(device, non_blocking=True)


def prepare(
    batch_u8: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    runtime: Runtime,
    augment: AugmentConfig | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> normalised float (B, 3, S, S), augmented if ``augment`` is given."""
    x = to_float(batch_u8)
    if augment is not None:
        x = augment_batch(x, augment, generator=generator)
    x = normalize(x, mean, std)
    if runtime.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def train_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    runtime: Runtime,
    scaler: torch.amp.GradScaler | None = None,
    grad_clip: float | None = None,
) -> torch.Tensor:
    """One optimisation step on a prepared batch (autocast, grad scaler, clipping); the loss."""
    with runtime.autocast():
        loss = criterion(model(x), y)
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


def train_one_epoch(
    model: nn.Module,
    images: ImageSource,
    labels: torch.Tensor,
    order: torch.Tensor,
    batch_size: int,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    runtime: Runtime,
    mean: Sequence[float],
    std: Sequence[float],
    augment: AugmentConfig,
    generator: torch.Generator,
    scaler: torch.amp.GradScaler | None = None,
    step_scheduler: Callable[[], None] | None = None,
    grad_clip: float | None = None,
    progress: bool = True,
    frozen: Sequence[nn.Module] = (),
) -> float:
    """Train over the image rows in ``order`` (already drawn by the sampler); mean loss.

    ``frozen`` modules stay in eval mode, so their BatchNorm statistics do not drift.
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
        x = prepare(gather(images, rows, runtime.device), mean, std, runtime, augment, generator)
        y = labels[rows].to(runtime.device, non_blocking=True)
        loss = train_step(model, x, y, criterion, optimizer, runtime, scaler, grad_clip)
        if step_scheduler is not None:
            step_scheduler()
        total += loss.detach() * len(rows)
        count += len(rows)
    return float(total.item() / max(count, 1))


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: ImageSource,
    rows: np.ndarray | torch.Tensor,
    batch_size: int,
    runtime: Runtime,
    mean: Sequence[float],
    std: Sequence[float],
    tta: int = 1,
    progress: bool = False,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> np.ndarray:
    """Logits (V, N, C) for the given rows, one slice per TTA view (V = ``tta``).

    ``forward`` replaces ``model(x)``, e.g. to return pooled features instead of logits.
    """
    model.eval()
    rows = torch.as_tensor(np.asarray(rows), dtype=torch.long)
    out: list[torch.Tensor] = []
    n_batches = math.ceil(len(rows) / batch_size)
    for b in tqdm(range(n_batches), desc="predict", leave=False, disable=not progress):
        x = prepare(
            gather(images, rows[b * batch_size : (b + 1) * batch_size], runtime.device),
            mean,
            std,
            runtime,
        )
        views = tta_views(x, tta) if tta > 1 else [x]
        with runtime.autocast():
            logits = torch.stack([(forward or model)(v) for v in views])
        out.append(logits.float().cpu())
    if not out:
        return np.zeros((tta, 0, 0), dtype=np.float32)
    return torch.cat(out, dim=1).numpy()

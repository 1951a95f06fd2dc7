"""Batched (TTA) prediction over cached uint8 images, and the batch preparation it shares with
training.

Images arrive as uint8 (N, S, S, 3), either a NumPy memmap (CPU path: rows are read per batch)
or a torch tensor already on the device (GPU path: the whole cache moved once). Conversion,
augmentation and normalisation run batched on the device, so the CPU does no per-image work.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from skinlesion.core.runtime import Runtime
from skinlesion.data.augment import AugmentConfig, augment_batch, normalize, to_float, tta_views
from skinlesion.data.preprocess import Normalization

ImageRows = np.ndarray | torch.Tensor


def gather(
    images: ImageRows, rows: torch.Tensor | np.ndarray, device: torch.device
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
    norm: Normalization,
    runtime: Runtime,
    augment: AugmentConfig | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> normalised float (B, 3, S, S), augmented if ``augment`` is given."""
    x = to_float(batch_u8)
    if augment is not None:
        x = augment_batch(x, augment, generator=generator)
    x = normalize(x, norm.mean, norm.std)
    if runtime.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: ImageRows,
    rows: np.ndarray | torch.Tensor,
    *,
    batch_size: int,
    runtime: Runtime,
    norm: Normalization,
    tta: int = 1,
    progress: bool = False,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    metadata: np.ndarray | None = None,
) -> np.ndarray:
    """Logits (V, N, C) for the given rows, one slice per TTA view (V = ``tta``).

    ``forward`` replaces ``model(x)``, e.g. to return pooled features instead of logits.
    ``metadata`` (encoded, indexed like ``images``) goes to a fused model as ``model(x, m)``.
    """
    model.eval()
    # A copy: the rows may be a read-only view (pandas), which torch warns about.
    rows = torch.tensor(np.asarray(rows), dtype=torch.long)
    out: list[torch.Tensor] = []
    n_batches = math.ceil(len(rows) / batch_size)
    for b in tqdm(range(n_batches), desc="predict", leave=False, disable=not progress):
        batch = rows[b * batch_size : (b + 1) * batch_size]
        x = prepare(gather(images, batch, runtime.device), norm, runtime)
        views = tta_views(x, tta) if tta > 1 else [x]
        call = forward or model
        if metadata is not None:
            m = torch.from_numpy(np.ascontiguousarray(metadata[batch.numpy()])).to(x.device)
            call = lambda v, m=m: model(v, m)  # noqa: E731
        with runtime.autocast():
            logits = torch.stack([call(v) for v in views])
        out.append(logits.float().cpu())
    if not out:
        return np.zeros((tta, 0, 0), dtype=np.float32)
    return torch.cat(out, dim=1).numpy()

"""Losses for imbalanced classification: multi-class focal loss and cross-entropy."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from skinlesion.core.config import check_name


class FocalLoss(nn.Module):
    """Multi-class focal loss (Lin et al. 2017): ``-alpha_y (1 - p_y)^gamma log p_y``.

    With ``gamma=0`` and no ``alpha`` it equals cross-entropy; larger ``gamma`` down-weights
    examples the model already gets right, so rare, hard lesions dominate the gradient.

    >>> loss = FocalLoss(gamma=2.0)
    >>> loss(torch.zeros(2, 7), torch.tensor([0, 3])).item() > 0
    True
    """

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
    ):
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be mean, sum or none, got {reduction!r}")
        self.reduction = reduction
        self.gamma = float(gamma)
        self.label_smoothing = float(label_smoothing)
        alpha_t = torch.as_tensor(alpha, dtype=torch.float32) if alpha is not None else None
        self.register_buffer("alpha", alpha_t, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # Half-precision logits are upcast; float64 (the linear probe's fit) stays float64.
        logp = F.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)
        n_classes = logits.shape[-1]
        onehot = F.one_hot(target, n_classes).to(logp.dtype)
        if self.label_smoothing:
            onehot = onehot * (1 - self.label_smoothing) + self.label_smoothing / n_classes
        # (1 - p)^gamma per class, weighted by the (smoothed) target distribution.
        modulator = (1 - logp.exp()).clamp(min=0).pow(self.gamma) if self.gamma else 1.0
        per_class = -onehot * modulator * logp
        if self.alpha is not None:
            if self.alpha.numel() != n_classes:
                raise ValueError(f"alpha has {self.alpha.numel()} weights for {n_classes} classes")
            per_class = per_class * self.alpha.to(logp.device)
        per_sample = per_class.sum(-1)
        if self.reduction == "none":
            return per_sample
        return per_sample.sum() if self.reduction == "sum" else per_sample.mean()


def _focal(
    gamma: float, alpha: Sequence[float] | None, label_smoothing: float, reduction: str
) -> nn.Module:
    return FocalLoss(gamma=gamma, alpha=alpha, label_smoothing=label_smoothing, reduction=reduction)


def _cross_entropy(
    gamma: float, alpha: Sequence[float] | None, label_smoothing: float, reduction: str
) -> nn.Module:
    weight = torch.as_tensor(alpha, dtype=torch.float32) if alpha is not None else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing, reduction=reduction)


LOSSES: dict[str, Callable[..., nn.Module]] = {"focal": _focal, "ce": _cross_entropy}


def build_loss(
    name: str,
    gamma: float = 2.0,
    alpha: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> nn.Module:
    """The loss registered as ``name`` (``focal`` or ``ce``); ``reduction="none"`` gives one
    value per sample."""
    check_name("loss.name", name, LOSSES, "loss")
    return LOSSES[name](gamma, alpha, label_smoothing, reduction)

"""Losses for imbalanced classification: multi-class focal loss and cross-entropy.

Both take an optional ``mask`` (bool, ``[N, C]``): an image's label space where a run has several
sources (``data.sources``). The logits outside it are set to :data:`MASKED_LOGIT` before the
log-softmax, so the loss is that of the softmax over the kept classes only and the others get
no gradient from the image; label smoothing spreads over the kept classes. Without a mask the
losses are computed as they always were.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from skinlesion.core.config import check_name

MASKED_LOGIT = -1e9
"""A class outside the image's label space: its ``exp`` is 0 in float32, and 0 times its
log-probability stays finite (``-inf`` would give NaN)."""


def masked_log_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``log_softmax`` over the classes ``mask`` keeps (float32 at least): the values at the
    kept classes are those of the sub-softmax, the others about ``MASKED_LOGIT``."""
    x = logits if logits.dtype == torch.float64 else logits.float()
    return F.log_softmax(x.masked_fill(~mask.to(x.device, torch.bool), MASKED_LOGIT), dim=-1)


def _targets(
    target: torch.Tensor, n_classes: int, smoothing: float, mask: torch.Tensor | None, dtype: Any
) -> torch.Tensor:
    """One-hot targets, smoothed over all classes (no mask) or over the kept ones."""
    onehot = F.one_hot(target, n_classes).to(dtype)
    if not smoothing:
        return onehot
    if mask is None:
        return onehot * (1 - smoothing) + smoothing / n_classes
    keep = mask.to(onehot.device, dtype)
    return onehot * (1 - smoothing) + smoothing * keep / keep.sum(-1, keepdim=True)


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

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        # Half-precision logits are upcast; float64 (the linear probe's fit) stays float64.
        if mask is None:
            logp = F.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), -1)
        else:
            logp = masked_log_softmax(logits, mask)
        n_classes = logits.shape[-1]
        onehot = _targets(target, n_classes, self.label_smoothing, mask, logp.dtype)
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


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """:class:`torch.nn.CrossEntropyLoss`, which also takes a ``mask`` (see the module
    docstring); class weights and the mean over their sum work as in torch."""

    def forward(
        self, input: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if mask is None:
            return super().forward(input, target)
        logp = masked_log_softmax(input, mask)
        n_classes = logp.shape[-1]
        weight = self.weight if self.weight is not None else logp.new_ones(n_classes)
        weight = weight.to(logp.device, logp.dtype)
        keep = mask.to(logp.device, logp.dtype)
        nll = -logp.gather(-1, target[:, None]).squeeze(-1) * weight[target]
        # torch's smoothing term, -sum_c w_c log p_c / C, over the kept classes only.
        smooth = -(logp * keep * weight).sum(-1) / keep.sum(-1)
        per_sample = (1 - self.label_smoothing) * nll + self.label_smoothing * smooth
        if self.reduction == "none":
            return per_sample
        if self.reduction == "sum":
            return per_sample.sum()
        return per_sample.sum() / weight[target].sum()


def _cross_entropy(
    gamma: float, alpha: Sequence[float] | None, label_smoothing: float, reduction: str
) -> nn.Module:
    weight = torch.as_tensor(alpha, dtype=torch.float32) if alpha is not None else None
    return CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing, reduction=reduction)


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

"""MixStyle (Zhou et al., "Domain generalization with MixStyle", ICLR 2021): during training, the
per-channel feature statistics (mean and standard deviation over space, the "style") of early
stages are mixed between images of the batch, so the later stages learn from styles of sites and
devices that no training image had as such.

It is a training-time feature augmentation: forward hooks on the output of the chosen stages that
act only while the model is in training mode, and change neither the weights nor the state dict.
Evaluation, packaging and export see the plain model.

>>> import timm
>>> model = timm.create_model("tf_efficientnet_lite0", num_classes=3)
>>> handles = add_mixstyle(model, p=1.0, alpha=0.1, stages=(1, 2))
>>> _ = model.eval()(torch.zeros(2, 3, 64, 64))  # evaluation: no mixing
>>> len(handles)
2
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from skinlesion.core.errors import ConfigError
from skinlesion.models.fusion import MetadataFusion


def mix_styles(x: torch.Tensor, alpha: float, eps: float = 1e-6) -> torch.Tensor:
    """``x`` (N, C, H, W) with each image's channel statistics mixed with those of another image
    of the batch, by a weight drawn from Beta(alpha, alpha) per image (torch's global stream).

    The statistics are detached, as in the paper: the mixing is an augmentation, not a path for
    gradients.
    """
    n = x.shape[0]
    if n < 2:
        return x
    mu = x.mean(dim=(2, 3), keepdim=True).detach()
    sig = (x.var(dim=(2, 3), keepdim=True) + eps).sqrt().detach()
    normed = (x - mu) / sig
    lam = torch.distributions.Beta(alpha, alpha).sample((n, 1, 1, 1)).to(x.device, x.dtype)
    perm = torch.randperm(n, device=x.device)
    mu_mix = lam * mu + (1 - lam) * mu[perm]
    sig_mix = lam * sig + (1 - lam) * sig[perm]
    return normed * sig_mix + mu_mix


def add_mixstyle(
    model: nn.Module, p: float, alpha: float, stages: Sequence[int]
) -> list[RemovableHandle]:
    """Hook MixStyle onto the outputs of ``stages`` of ``model``'s ``blocks`` (the EfficientNet
    family's stages); each batch is mixed with probability ``p`` at each stage.

    The hooks look at the whole model's training flag, not the stage's: a frozen stage stays in
    eval mode for its BatchNorm statistics while the model trains, and its output is still mixed.
    """
    root = model
    backbone = model.backbone if isinstance(model, MetadataFusion) else model
    blocks = getattr(backbone, "blocks", None)
    if not isinstance(blocks, nn.Sequential):
        raise ConfigError(
            f"train.mixstyle: {type(backbone).__name__} has no stages in 'blocks' "
            "(MixStyle supports the EfficientNet family)"
        )
    bad = [s for s in stages if not 0 <= s < len(blocks) - 1]
    if bad:
        raise ConfigError(
            f"train.mixstyle_stages: {bad} out of range; {type(backbone).__name__} has stages "
            f"0-{len(blocks) - 1}, and the last one feeds the head (use at most {len(blocks) - 2})"
        )

    def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor | None:
        if not root.training or torch.rand(()) >= p:
            return None
        return mix_styles(output, alpha)

    return [blocks[s].register_forward_hook(hook) for s in sorted(set(stages))]

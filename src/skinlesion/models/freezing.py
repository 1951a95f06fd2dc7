"""Freezing the early stages of a backbone, for fine-tuning only its last stages."""

from __future__ import annotations

from timm.models import group_modules
from torch import nn

from skinlesion.models.fusion import MetadataFusion


def freeze_stages(model: nn.Module, k: int) -> list[nn.Module]:
    """Freeze the stem and the first ``k`` stages; return the frozen modules.

    Frozen modules keep their BatchNorm statistics: the caller puts them in eval mode after
    every ``model.train()``.
    """
    if k <= 0:
        return []
    # A metadata-fused model freezes stages of its image backbone.
    model = model.backbone if isinstance(model, MetadataFusion) else model
    groups = group_modules(model, model.group_matcher(coarse=True))
    ids = sorted(groups)
    if k >= len(ids) - 1:
        raise ValueError(
            f"train.freeze_stages={k}, but {type(model).__name__} has "
            f"{len(ids) - 2} stages after its stem; use at most {len(ids) - 2}"
        )
    names = [n for g in ids[: k + 1] for n in groups[g]]
    modules = dict(model.named_modules())
    frozen = [modules[n] for n in names if n in modules]
    for m in frozen:
        for p in m.parameters():
            p.requires_grad_(False)
    return frozen

"""Weight averaging over a fold's optimizer steps (SWA, taken densely as SWAD does: Izmailov et
al. 2018, Cha et al. 2021): the running mean of the weights from ``train.average_from`` on, a
candidate beside the trained weights when validation loss picks the fold's checkpoint."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class WeightAverage:
    """The running mean of a model's floating-point state after each update: its weights and its
    BatchNorm statistics (averaged like the weights, so no extra pass over the images). Integer
    entries (BatchNorm's batch counters) take the latest model's value. ``start``: the epoch
    (1-based) whose steps are the first averaged."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.count = 0
        self.mean: dict[str, torch.Tensor] = {}

    def describe(self) -> str:
        """What a checkpoint of the average says it holds (its ``weights`` entry)."""
        return f"mean of {self.count} steps from epoch {self.start}"

    def update(self, model: nn.Module) -> None:
        """Add ``model``'s current state to the mean."""
        self.count += 1
        with torch.no_grad():
            for key, value in model.state_dict().items():
                if not value.is_floating_point():
                    continue
                if self.count == 1:
                    self.mean[key] = value.detach().float().clone()
                else:
                    self.mean[key].lerp_(value.detach().float(), 1.0 / self.count)

    def averaged(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` (in eval mode) that holds the mean; ``model`` is not touched."""
        if self.count == 0:
            raise RuntimeError("no weights averaged yet")
        out = copy.deepcopy(model)
        state = out.state_dict()
        for key, value in self.mean.items():
            state[key].copy_(value.to(state[key].dtype))
        return out.eval()

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": {k: v.cpu() for k, v in self.mean.items()}}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.count = int(state["count"])
        self.mean = {k: v.to(device) for k, v in state["mean"].items()}

"""What makes N ``torchrun`` processes train as one: each global batch split between the ranks,
BatchNorm over the whole global batch (also on CPUs, where PyTorch's own SyncBatchNorm does not
run), and random streams that differ between ranks yet survive ``--resume``.

With ``train.batch_size`` the global batch B, rank r of N trains on rows ``r::N`` of every batch
of B drawn from the sampler's shared generator; DDP averages the ranks' mean losses, which is the
mean over the global batch because every rank holds B / N rows (not so for cross-entropy with
class weights, ``loss.name=ce`` with ``loss.alpha``, whose mean divides by each rank's own sum of
weights). With ``train.sync_bn`` the batch statistics are those of the B rows too, so without
dropout, drop-path and augmentation the weights follow one process with batch B up to float
rounding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from timm.layers import BatchNormAct2d
from timm.layers import convert_sync_batchnorm as timm_convert_sync_batchnorm
from torch import nn

from skinlesion.core.runtime import DistInfo, derive_seeds


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks, differentiable: the gradient of a sum shared by every rank is the
    sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        out = grad.clone()
        dist.all_reduce(out)
        return out


def _all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(x)


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the batch on every rank (gloo, CPU
    tensors), where PyTorch's SyncBatchNorm runs on GPUs only and DDP refuses it on CPUs;
    outside training or a process group it is plain BatchNorm."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.ndim < 2:
            raise ValueError(f"expected at least 2-D input (N, C, ...), got {x.ndim}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        # One all-reduce of the sums of x and x^2, and of the count, in float64 (as PyTorch's
        # CPU BatchNorm accumulates): E[x^2] - E[x]^2 then loses ~1e-16 (mean/std)^2, nothing
        # at float32 precision, and each layer costs one collective forward, one backward.
        wide = x.to(torch.float64)
        dims = [0, *range(2, x.ndim)]
        shape = [1, -1] + [1] * (x.ndim - 2)
        count = wide.new_tensor([x.numel() // x.shape[1]])
        sums = torch.cat([wide.sum(dims), wide.square().sum(dims), count])
        total = _all_reduce_sum(sums)
        channels = x.shape[1]
        n = total[-1].detach()
        mean = total[:channels] / n
        var = (total[channels : 2 * channels] / n - mean.square()).clamp(min=0)
        # Then x * scale + shift in x's precision, as PyTorch's transform does.
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = scale * self.weight
        shift = -mean * scale + (self.bias if self.affine else 0.0)
        if self.track_running_stats:
            self._update_running(mean.detach(), var.detach(), n)
        return x * scale.to(x.dtype).view(shape) + shift.to(x.dtype).view(shape)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
        """As ``F.batch_norm`` does: an exponential (or, without momentum, cumulative) average
        of the batch mean and the unbiased batch variance."""
        assert self.num_batches_tracked is not None
        assert self.running_mean is not None and self.running_var is not None
        self.num_batches_tracked.add_(1)
        factor = self.momentum
        if factor is None:
            factor = 1.0 / float(self.num_batches_tracked)
        unbiased = var * (n / (n - 1).clamp(min=1))
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)


class CpuSyncBatchNormAct(CpuSyncBatchNorm):
    """timm's BatchNorm + drop + activation layer (:class:`~timm.layers.BatchNormAct2d`),
    synchronised on CPUs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def _world_size() -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of ``module`` (timm's BatchNorm + activation layers included) replaced by
    one synchronised across the process group, holding the same parameters and statistics:
    PyTorch's SyncBatchNorm on GPUs, :class:`CpuSyncBatchNorm` on ``device`` ``cpu``. Returns
    the module; convert before freezing stages, so the frozen modules are the ones that stay.
    """
    if device.type != "cpu":
        return timm_convert_sync_batchnorm(module)
    return _convert_cpu(module)


def _convert_cpu(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        kind = CpuSyncBatchNormAct if isinstance(module, BatchNormAct2d) else CpuSyncBatchNorm
        out = kind(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        )
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        if isinstance(module, BatchNormAct2d):
            out.drop, out.act = module.drop, module.act
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _convert_cpu(child))
    return out


def rank_share(order: torch.Tensor, batch_size: int, dist_info: DistInfo) -> torch.Tensor:
    """This rank's rows of ``order``, cut into global batches of ``batch_size``: rows
    ``rank::world`` of each, so rank r's b-th batch of ``batch_size / world`` rows is its share
    of the global b-th batch.

    >>> rank_share(torch.arange(8), 4, DistInfo(rank=1, world_size=2)).tolist()
    [1, 3, 5, 7]
    """
    world = dist_info.world_size
    if world == 1:
        return order
    if batch_size % world or len(order) % batch_size:
        raise ValueError(
            f"{len(order)} rows in batches of {batch_size} do not split across {world} ranks"
        )
    return order.view(-1, batch_size)[:, dist_info.rank :: world].reshape(-1)


def seed_rank_streams(
    generator: torch.Generator, seed: int, fold: int, epoch: int, rank: int
) -> None:
    """Seed this rank's augmentation ``generator`` and torch's global stream (dropout,
    drop-path) for ``epoch``: each rank draws its own masks and augmentations, yet the draws
    are a function of (seed, fold, epoch, rank) alone, so a resumed run draws as an
    uninterrupted one without storing any rank's state."""
    aug, drop = derive_seeds(seed, fold, epoch, rank, n=2)
    generator.manual_seed(aug)
    torch.manual_seed(drop)

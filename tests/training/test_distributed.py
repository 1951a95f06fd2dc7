"""DDP trains like one process: the global batch split between ranks, BatchNorm over the global
batch, per-rank random streams that survive --resume, and torchrun on 2 CPU processes (gloo)
giving the weights of 1 process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import FINETUNE, run_overrides, train_cli
from timm.layers import BatchNormAct2d
from torch import nn

from skinlesion.core.config import load_config
from skinlesion.core.errors import ConfigError
from skinlesion.core.runtime import DistInfo
from skinlesion.models.checkpoint import load_checkpoint
from skinlesion.models.factory import build_model
from skinlesion.training.checks import check_world_size
from skinlesion.training.distributed import (
    CpuSyncBatchNorm,
    CpuSyncBatchNormAct,
    convert_sync_batchnorm,
    rank_share,
    seed_rank_streams,
)

# -- the global batch split between ranks ----------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 4])
def test_ranks_split_each_global_batch(world: int) -> None:
    order = torch.randperm(48, generator=torch.Generator().manual_seed(0))
    batch = 8
    shares = [rank_share(order, batch, DistInfo(r, world)) for r in range(world)]
    per_rank = batch // world
    for b in range(len(order) // batch):
        parts = [s[b * per_rank : (b + 1) * per_rank] for s in shares]
        # Rank r's b-th batch is its share of the b-th global batch, and the shares make it up.
        assert sorted(torch.cat(parts).tolist()) == sorted(order[b * batch : (b + 1) * batch])
        assert all(len(p) == per_rank for p in parts)


def test_rank_share_refuses_an_uneven_split() -> None:
    with pytest.raises(ValueError, match="do not split"):
        rank_share(torch.arange(12), 6, DistInfo(0, 4))


@pytest.mark.parametrize(
    ("batch", "world"), [(7, 2), (8, 3), (2, 2), (6, 4)], ids=["odd", "3", "one_each", "6of4"]
)
def test_batch_that_does_not_split_is_refused(batch: int, world: int) -> None:
    cfg = load_config(None, [f"train.batch_size={batch}"])
    with pytest.raises(ConfigError, match=rf"train\.batch_size={batch} .*world size {world}"):
        check_world_size(cfg, world)


def test_batch_that_splits_and_one_process_pass() -> None:
    check_world_size(load_config(None, ["train.batch_size=8"]), 2)
    check_world_size(load_config(None, ["train.batch_size=12"]), 3)
    check_world_size(load_config(None, ["train.batch_size=1"]), 1)


def test_linear_probe_refuses_torchrun() -> None:
    cfg = load_config(None, ["train.scheme=linear_probe"])
    with pytest.raises(ConfigError, match="linear_probe runs in one process"):
        check_world_size(cfg, 2)


def test_train_refuses_the_batch_before_any_work(
    syn_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # torchrun's environment, without joining a group: the check comes first.
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "run"
    args = run_overrides(FINETUNE, syn_root, out, tmp_path / "cache", **{"train.batch_size": 9})
    assert train_cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.batch_size=9" in err[0] and "world size 2" in err[0], err
    assert not out.exists() and not (tmp_path / "cache").exists()


# -- per-rank random streams -----------------------------------------------------------------


def _draws(seed: int, fold: int, epoch: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator()
    seed_rank_streams(gen, seed, fold, epoch, rank)
    return torch.rand(16, generator=gen), torch.rand(16)  # augmentation, dropout


def test_ranks_draw_their_own_streams_and_repeat_them() -> None:
    aug0, drop0 = _draws(42, 0, 3, 0)
    aug1, drop1 = _draws(42, 0, 3, 1)
    # Each rank its own dropout masks and augmentations ...
    assert not torch.equal(aug0, aug1) and not torch.equal(drop0, drop1)
    assert not torch.equal(aug0, drop0)
    # ... a function of (seed, fold, epoch, rank) only, so --resume draws them again.
    again = _draws(42, 0, 3, 0)
    assert torch.equal(again[0], aug0) and torch.equal(again[1], drop0)
    for other in (_draws(42, 0, 4, 0), _draws(42, 1, 3, 0), _draws(43, 0, 3, 0)):
        assert not torch.equal(other[0], aug0) and not torch.equal(other[1], drop0)


# -- BatchNorm over the global batch, on CPUs ------------------------------------------------


def _bn_net() -> nn.Sequential:
    """A net with each kind of BatchNorm the models hold: timm's BatchNorm + activation,
    torch's 2-d one, and the 1-d one of the metadata MLP."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        BatchNormAct2d(4, act_layer=nn.ReLU),
        nn.Conv2d(4, 5, 1),
        nn.BatchNorm2d(5, momentum=None),  # cumulative average
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.BatchNorm1d(5),
        nn.Linear(5, 3),
    )
    with torch.no_grad():  # informative affine parameters, not 1 and 0
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return net.double()


def _bn_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 6, 6, generator=gen, dtype=torch.float64) * 2 + 3  # mean far from 0
    return x, torch.randn(8, 3, generator=gen, dtype=torch.float64)


def _bn_step(
    net: nn.Module, x: torch.Tensor, g: torch.Tensor, wrapper: nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """Output, input gradient, parameter gradients and BN statistics of ``net`` after a
    training forward and backward of ``sum(net(x) * g)`` (through ``wrapper``, a DDP of it, if
    given), twice, so the running averages move on."""
    net.train()
    for _ in range(2):
        net.zero_grad()
        x = x.detach().requires_grad_()
        y = (wrapper or net)(x)
        (y * g).sum().backward()
    out = {"y": y.detach(), "x_grad": x.grad}
    out.update({f"grad.{k}": p.grad for k, p in net.named_parameters()})
    out.update({f"buf.{k}": b for k, b in net.named_buffers()})
    return out


def _gather_rows(value: torch.Tensor, world: int) -> torch.Tensor:
    """The whole batch from the ranks' ``rank::world`` rows."""
    parts = [torch.empty(0)] * world
    dist.all_gather_object(parts, value)
    whole = torch.empty((sum(len(p) for p in parts), *value.shape[1:]), dtype=value.dtype)
    for r, part in enumerate(parts):
        whole[r::world] = part
    return whole


def _sync_bn_worker(rank: int, world: int, store: str, result: str) -> None:
    """Rank ``rank`` of ``world`` steps on its rows of the batch: under DDP with BatchNorm
    synchronised (``sync``), and with plain BatchNorm (``plain``); rank 0 saves the gathered
    results."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        x, g = _bn_inputs()
        results = {}
        for name in ("sync", "plain"):
            net = _bn_net()
            if name == "sync":
                net = convert_sync_batchnorm(net, torch.device("cpu"))
                ddp = nn.parallel.DistributedDataParallel(net)
                got = _bn_step(net, x[rank::world], g[rank::world], ddp)
                scale = float(world)  # DDP averages the ranks' gradients; the loss is their sum
            else:
                got = _bn_step(net, x[rank::world], g[rank::world])
                scale = 1.0
            for key, value in got.items():
                if key.startswith("grad."):
                    if name == "plain":
                        dist.all_reduce(value)
                    value.mul_(scale)
            got.update({k: _gather_rows(got[k], world) for k in ("y", "x_grad")})
            results[name] = got
        if rank == 0:
            torch.save(results, result)
    finally:
        dist.destroy_process_group()


def test_sync_batchnorm_on_two_cpu_ranks_is_batchnorm_on_the_whole_batch(tmp_path: Path) -> None:
    net = _bn_net()
    converted = convert_sync_batchnorm(_bn_net(), torch.device("cpu"))
    kinds = [type(m) for m in converted.modules() if isinstance(m, CpuSyncBatchNorm)]
    assert kinds == [CpuSyncBatchNormAct, CpuSyncBatchNorm, CpuSyncBatchNorm]
    x, g = _bn_inputs()
    # In one process, converted or not, it is the same layer.
    single = _bn_step(net, x, g)
    same = _bn_step(converted, x, g)
    for key, value in single.items():
        torch.testing.assert_close(same[key], value, rtol=0, atol=0, msg=key)
    # Two gloo ranks under DDP, half the batch each: the whole batch's output, gradients and
    # statistics.
    # float64 throughout, so only summation order separates them (~1e-15).
    args = (2, str(tmp_path / "store"), str(tmp_path / "ranks.pt"))
    mp.start_processes(_sync_bn_worker, args=args, nprocs=2, start_method="spawn")
    ranks = torch.load(tmp_path / "ranks.pt", weights_only=True)
    assert ranks["sync"].keys() == single.keys()
    for key, value in single.items():
        torch.testing.assert_close(ranks["sync"][key], value, rtol=1e-9, atol=1e-10, msg=key)
    # The test's own guard: unsynchronised BatchNorm on the halves is another function.
    assert (ranks["plain"]["y"] - single["y"]).abs().max() > 1e-2


# -- torchrun on 2 CPU processes against 1 process ------------------------------------------

# The DDP run must equal one process up to float rounding, so everything random that a rank
# draws for itself is off: dropout, drop-path and augmentation (flips, rotation, zoom, colour).
# BatchNorm is synchronised (train.sync_bn=true, the default). timm's tiny test_efficientnet at
# 64 px keeps float32 well conditioned (lite0 at 32 px already differs from float64 by 4e-4 at
# initialisation); SGD keeps the weights linear in the gradients, where Adam divides near-zero
# gradients by their own magnitude and turns float rounding into steps of the learning rate
# (4.7e-3 apart after these 6 steps); a small rate keeps the 6 steps out of the regime where
# rounding grows from step to step.
EQUIVALENCE = {
    **FINETUNE,
    "data.image_size": 64,
    "cv.folds_to_run": "[0]",
    "model.backbone": "test_efficientnet",
    "model.drop_rate": 0,
    "model.drop_path_rate": 0,
    "train.epochs": 2,
    "train.batch_size": 8,
    "train.steps_per_epoch": 3,
    "train.optimizer": "sgd",
    "train.lr": 2e-3,
    "train.warmup_epochs": 0,
    "train.sync_bn": "true",
    "train.num_threads": 1,
    "eval.calibrate": "false",
    **{f"augment.{k}": 0 for k in ("hflip", "vflip", "rotation", "brightness", "contrast")},
    **{f"augment.{k}": 0 for k in ("saturation", "hue")},
    "augment.scale": "[1,1]",
}
# Float32 sums taken in another order (per-rank halves, all-reduced) differ by ~1e-7 relative;
# these 6 steps carry that to ~1e-6 on the weights and ~2e-5 on running variances of up to ~3.
# 1e-4 (absolute, plus 1e-4 relative for the running statistics) leaves a wide margin, is 100x
# below how far training moves the weights (checked below), and far below the gap that
# per-rank BatchNorm opens (train.sync_bn=false: 2.6e-2) or a per-rank batch and another split
# of the data.
TOL = 1e-4


def _float_state(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k: v.float() for k, v in state.items() if v.is_floating_point()}


@pytest.mark.slow
def test_torchrun_two_cpu_processes_train_as_one(syn_root: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    init = tmp_path / "init.pt"  # both runs start from these weights, whatever their seeding
    torch.save(build_model("test_efficientnet", 7, pretrained=False).state_dict(), init)
    cache = tmp_path / "cache"
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    extra = {"model.weights": init}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    cmd += ["-m", "skinlesion", "train", "--no-progress"]
    done = subprocess.run(
        [*cmd, *run_overrides(EQUIVALENCE, syn_root, ddp, cache, **extra)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert train_cli(run_overrides(EQUIVALENCE, syn_root, single, cache, **extra)) == 0

    a, b = _float_state(ddp / "fold_0" / "last.pt"), _float_state(single / "fold_0" / "last.pt")
    assert a.keys() == b.keys()
    diff = {k: float((a[k] - b[k]).abs().max()) for k in a}
    weights = max(v for k, v in diff.items() if "running_" not in k)
    print(f"max |DDP - single|: weights {weights:.1e}, all tensors {max(diff.values()):.1e}")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=TOL, atol=TOL, msg=key)
    # The test's own guard: the weights moved far beyond the tolerance.
    start = {k: v.float() for k, v in torch.load(init, weights_only=True).items()}
    moved = max(float((b[k] - start[k]).abs().max()) for k in b if "running_" not in k)
    assert moved > 100 * TOL, moved
    ma, mb = (pd.read_csv(r / "fold_0" / "metrics.csv") for r in (ddp, single))
    assert ma["epoch"].tolist() == mb["epoch"].tolist() == [1, 2]
    cols = ["train_loss", "val_loss"]
    np.testing.assert_allclose(ma[cols].to_numpy(), mb[cols].to_numpy(), rtol=1e-4)
    assert load_checkpoint(ddp / "fold_0" / "best.pt")["epoch"] == int(
        mb.loc[mb["val_loss"].idxmin(), "epoch"]
    )
    # Only rank 0 writes: one log line per epoch, not two, and one tracker's event file (TensorBoard
    # is on by default; a second process that tracked would leave a second file).
    assert (ddp / "train.log").read_text().count("fold 0 epoch 1/2") == 1
    assert len(list((ddp / "fold_0" / "tensorboard").glob("events.*"))) == 1
    oof = pd.read_csv(ddp / "oof_predictions.csv")
    assert oof["image_id"].is_unique
    assert sorted(oof["image_id"]) == sorted(
        pd.read_csv(single / "oof_predictions.csv")["image_id"]
    )

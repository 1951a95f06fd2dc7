"""A run of 2 processes, simulated in one: rank 0 trains a fold, then rank 1 trains the same fold
into the same folder, each told its rank the way ``torchrun`` tells it (``init_distributed``),
with the collectives stubbed. The training's wiring: every rank draws the same sampler indices
and its own share of each batch, its own augmentation and dropout streams (a function of seed,
fold, epoch and rank), and only rank 0 writes, logs or tracks.

(``test_distributed.py`` checks the helpers, and that torchrun on 2 real processes trains as one
process with random streams off.)"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from conftest import FINETUNE, run_overrides

from skinlesion.core.config import load_config
from skinlesion.core.runtime import DistInfo
from skinlesion.training import cv, fold_trainer
from skinlesion.training.distributed import seed_rank_streams

WORLD = 2
TINY = {
    **FINETUNE,
    "model.backbone": "test_efficientnet",
    "cv.folds_to_run": "[0]",
    "train.epochs": 1,
    "train.steps_per_epoch": 2,
    "model.drop_rate": 0.5,  # streams that matter: dropout and augmentation on
}


@dataclass
class Rank:
    """What one simulated rank drew, told its helpers, logged and left in the run folder."""

    draws: list[torch.Tensor] = field(default_factory=list)  # sampler indices, per epoch
    shares: list[tuple[torch.Tensor, int, DistInfo]] = field(default_factory=list)  # rank_share
    orders: list[tuple[torch.Tensor, int]] = field(default_factory=list)  # its rows, batch size
    aug: list[torch.Tensor] = field(default_factory=list)  # augmentation stream state
    dropout: list[torch.Tensor] = field(default_factory=list)  # torch's global stream state
    tracker_main: list[bool] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    folder: dict[str, tuple[int, int, str]] = field(default_factory=dict)


def _snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    return {
        str(p.relative_to(root)): (
            p.stat().st_size,
            p.stat().st_mtime_ns,
            hashlib.sha256(p.read_bytes()).hexdigest(),
        )
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _gather(rank: int) -> Any:
    """``all_gather_object`` of a world of one process: this rank's logits where they belong,
    one row broadcast where another rank's would be (their values are not what is checked)."""

    def gather(parts: list[Any], obj: Any) -> None:
        for r in range(len(parts)):
            parts[r] = obj if r == rank else obj[:, :1]

    return gather


def _spy(mp: pytest.MonkeyPatch, rank: int, seen: Rank) -> None:
    mp.setattr(cv, "init_distributed", lambda: DistInfo(rank, WORLD))
    mp.setattr(dist, "barrier", lambda *a, **k: None)
    mp.setattr(dist, "all_reduce", lambda *a, **k: None)
    mp.setattr(dist, "all_gather_object", _gather(rank))
    # DDP needs a process group; the weights it would broadcast are the same here anyway.
    mp.setattr(torch.nn.parallel, "DistributedDataParallel", lambda m, device_ids=None: m)
    real_draw, real_share = fold_trainer.draw_indices, fold_trainer.rank_share
    real_batches, real_tracker = fold_trainer.train_batches, cv.open_tracker

    def draw_indices(*args: Any, **kwargs: Any) -> torch.Tensor:
        seen.draws.append(real_draw(*args, **kwargs))
        return seen.draws[-1]

    def rank_share(order: torch.Tensor, batch_size: int, info: DistInfo) -> torch.Tensor:
        seen.shares.append((order.clone(), batch_size, info))
        return real_share(order, batch_size, info)

    def train_batches(*args: Any, **kwargs: Any) -> float:
        seen.orders.append((kwargs["order"].clone(), kwargs["batch_size"]))
        seen.aug.append(kwargs["generator"].get_state())
        seen.dropout.append(torch.get_rng_state())
        return real_batches(*args, **kwargs)

    def open_tracker(cfg: Any, run: Any, is_main: bool, resume: bool) -> Any:
        seen.tracker_main.append(is_main)
        return real_tracker(cfg, run, is_main, resume)

    mp.setattr(fold_trainer, "draw_indices", draw_indices)
    mp.setattr(fold_trainer, "rank_share", rank_share)
    mp.setattr(fold_trainer, "train_batches", train_batches)
    mp.setattr(cv, "open_tracker", open_tracker)


class _Messages(logging.Handler):
    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record.getMessage())


@pytest.fixture(scope="module")
def ranks(syn_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Rank]]:
    base = tmp_path_factory.mktemp("ranks")
    out = base / "run"
    cfg = load_config(None, run_overrides(TINY, syn_root, out, base / "cache"))
    root = logging.getLogger()
    level, seen = root.level, [Rank(), Rank()]
    for rank in range(WORLD):  # rank 0 first: rank 1 reads its best.pt, as under torchrun
        handler = _Messages(seen[rank].messages)
        root.addHandler(handler)
        try:
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("WORLD_SIZE", str(WORLD))
                _spy(mp, rank, seen[rank])
                cv.run_cv(cfg, progress=False)
        finally:
            root.removeHandler(handler)
            root.setLevel(level)
        seen[rank].folder = _snapshot(out)
    return out, seen


def test_ranks_share_the_sampler_and_split_each_batch(ranks: tuple[Path, list[Rank]]) -> None:
    """Every rank draws the same global batches; rank r trains on rows r::2 of each."""
    _, seen = ranks
    batch = int(TINY["train.batch_size"])
    assert torch.equal(seen[0].draws[0], seen[1].draws[0])
    assert torch.equal(seen[0].shares[0][0], seen[1].shares[0][0])
    for rank, r in enumerate(seen):
        (whole, size, info), (mine, per_rank) = r.shares[0], r.orders[0]
        assert (size, info, per_rank) == (batch, DistInfo(rank, WORLD), batch // WORLD)
        assert len(whole) == batch * int(TINY["train.steps_per_epoch"])
        assert torch.equal(mine, whole.view(-1, batch)[:, rank::WORLD].reshape(-1))


def test_each_rank_draws_its_own_augmentation_and_dropout(ranks: tuple[Path, list[Rank]]) -> None:
    """The streams of rank r at an epoch are those that ``seed_rank_streams`` gives for the run's
    seed, the fold, the epoch and r: other ranks draw others, a resumed run the same."""
    out, seen = ranks
    seed = load_config(out / "config.yaml").seed
    for rank, r in enumerate(seen):
        with torch.random.fork_rng():
            gen = torch.Generator()
            seed_rank_streams(gen, seed, 0, 0, rank)  # fold 0, epoch 0
            expected_aug, expected_dropout = gen.get_state(), torch.get_rng_state()
        assert torch.equal(r.aug[0], expected_aug), f"rank {rank}: augmentation stream"
        assert torch.equal(r.dropout[0], expected_dropout), f"rank {rank}: dropout stream"
    assert not torch.equal(seen[0].aug[0], seen[1].aug[0])
    assert not torch.equal(seen[0].dropout[0], seen[1].dropout[0])


def test_only_rank_0_writes_logs_and_tracks(ranks: tuple[Path, list[Rank]]) -> None:
    _, (r0, r1) = ranks
    # Rank 0 made the run folder: the checkpoints, the log, the report and the tracking files.
    names = set(r0.folder)
    assert {"config.yaml", "train.log", "fold_0/best.pt", "fold_0/metrics.csv"} <= names
    assert {"oof_predictions.csv", "fold_0/summary.json"} <= names
    assert any(n.startswith("fold_0/tensorboard/events.") for n in names)
    # Rank 1 trained and validated the same fold, yet changed not one file of it ...
    assert r1.orders and r1.folder == r0.folder
    # ... opened no tracker, and logged no line of its epochs.
    assert r0.tracker_main == [True] and r1.tracker_main == [False]
    epoch_line = "fold 0 epoch 1/1"
    assert any(epoch_line in m for m in r0.messages)
    assert not any(epoch_line in m for m in r1.messages)

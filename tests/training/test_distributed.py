"""DDP training on 2 CPU processes (gloo) through torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from skinlesion.core.labels import CLASSES
from skinlesion.data.synthetic import make_synthetic_ham10000


def _args(root: Path, out: Path, cache: Path) -> list[str]:
    return [
        f"data.root={root}",
        "data.image_size=48",
        f"data.cache_dir={cache}",
        "cv.n_folds=2",
        "model.backbone=tf_efficientnet_lite0",
        "model.pretrained=true",
        "train.epochs=3",
        "train.batch_size=8",
        "train.steps_per_epoch=8",
        "train.lr=1e-3",
        "train.warmup_epochs=0",
        "train.num_threads=1",
        "eval.n_boot=20",
        f"output_dir={out}",
    ]


def _accuracy(run: Path) -> float:
    oof = pd.read_csv(run / "oof_predictions.csv")
    y = oof["dx"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    return float((oof[list(CLASSES)].to_numpy().argmax(1) == y).mean())


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path: Path) -> None:
    root = tmp_path / "syn"
    make_synthetic_ham10000(root, lesions_per_class=6)
    cache = tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        "-m",
        "skinlesion",
        "train",
        "--no-progress",
    ]
    done = subprocess.run(
        [*cmd, *_args(root, ddp, cache)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run(
        [sys.executable, "-m", "skinlesion", "train", "--no-progress", *_args(root, single, cache)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for fold in (0, 1):
        metrics = pd.read_csv(ddp / f"fold_{fold}" / "metrics.csv")
        assert metrics["epoch"].tolist() == [1, 2, 3]
        assert np.isfinite(metrics[["train_loss", "val_loss"]].to_numpy()).all()
    oof = pd.read_csv(ddp / "oof_predictions.csv")
    assert oof["image_id"].is_unique and len(oof) == len(pd.read_csv(single / "folds.csv"))
    # Only rank 0 writes: one log line per epoch, not two.
    log = (ddp / "train.log").read_text()
    assert log.count("fold 0 epoch 1/3") == 1
    # Same recipe, same data: the distributed models predict about as well.
    acc_ddp, acc_single = _accuracy(ddp), _accuracy(single)
    assert acc_ddp > 0.3 and abs(acc_ddp - acc_single) < 0.25, (acc_ddp, acc_single)

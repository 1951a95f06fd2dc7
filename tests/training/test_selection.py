"""Which checkpoint a fold ships: the lowest validation loss, across --resume, with early stopping.

The validation loss each epoch reports is scripted (the real figure plus a known offset), so the
epoch that must be selected is known in advance whatever the tiny model learns; everything else
(training, checkpoints, resume, temperature) is the real code.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import FINETUNE, crash_on_call, run_overrides, train_cli

from skinlesion.models.checkpoint import load_checkpoint
from skinlesion.training import fold_trainer, outputs


def script_val_loss(monkeypatch: pytest.MonkeyPatch, offsets: Iterator[float]) -> None:
    """Each epoch's ``val_loss`` becomes the real one plus the next offset."""
    real = outputs.val_figures  # the original, however often this test scripts it

    def scripted(*args: Any, **kwargs: Any) -> dict[str, float]:
        figs = real(*args, **kwargs)
        return {**figs, "val_loss": figs["val_loss"] + next(offsets)}

    monkeypatch.setattr(fold_trainer, "val_figures", scripted)


def rising() -> Iterator[float]:
    """0, 10, 20, ...: every epoch looks worse than the one before, so epoch 1 is the best."""
    k = 0
    while True:
        yield 10.0 * k
        k += 1


def assert_same_best(a: Path, b: Path) -> None:
    """best.pt of two runs: same epoch, weights and temperature."""
    x, y = load_checkpoint(a), load_checkpoint(b)
    assert x["epoch"] == y["epoch"], (a, x["epoch"], y["epoch"])
    assert x["temperature"] == pytest.approx(y["temperature"], rel=1e-4)
    assert x["metrics"]["val_loss"] == pytest.approx(y["metrics"]["val_loss"], rel=1e-4)
    assert x["state_dict"].keys() == y["state_dict"].keys()
    for key, value in x["state_dict"].items():
        if value.is_floating_point():
            torch.testing.assert_close(value, y["state_dict"][key], rtol=1e-4, atol=1e-5)
        else:
            assert torch.equal(value, y["state_dict"][key]), key


RESUME_EPOCHS = {"train.epochs": 4}


@pytest.fixture(scope="module")
def full(syn_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run that every crashed-and-resumed run must match (trained once)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as mp:
        script_val_loss(mp, rising())
        args = run_overrides(FINETUNE, syn_root, root / "full", root / "cache", **RESUME_EPOCHS)
        assert train_cli(args) == 0
    return root / "full"


# Fold 0 trains epochs 1-4 (calls 1-4), fold 1 calls 5-8: call 3 crashes fold 0 in epoch 3,
# call 7 crashes fold 1 in epoch 3 after fold 0 finished.
@pytest.mark.parametrize("crash_call", [3, 7], ids=["fold0_epoch3", "fold1_epoch3"])
def test_resumed_run_ships_the_same_best_checkpoint(
    syn_root: Path, full: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_call: int
) -> None:
    extra = RESUME_EPOCHS
    script_val_loss(monkeypatch, rising())
    crashed = tmp_path / "crashed"
    args = run_overrides(FINETUNE, syn_root, crashed, tmp_path / "cache", **extra)
    undo = crash_on_call(monkeypatch, crash_call)
    with pytest.raises(KeyboardInterrupt):
        train_cli(args)
    undo()
    crashed_fold = (crash_call - 1) // 4
    assert (crashed / f"fold_{crashed_fold}" / "last.pt").is_file()
    assert not (crashed / f"fold_{crashed_fold}" / "summary.json").exists()
    # The scripted losses go on rising after the restart: epoch 3 is still worse than epoch 1.
    assert train_cli(["--resume", *args]) == 0

    for fold in (0, 1):
        assert load_checkpoint(full / f"fold_{fold}" / "best.pt")["epoch"] == 1
        assert_same_best(full / f"fold_{fold}" / "best.pt", crashed / f"fold_{fold}" / "best.pt")
        epochs = pd.read_csv(crashed / f"fold_{fold}" / "metrics.csv")["epoch"].tolist()
        assert epochs == [1, 2, 3, 4]
    a = pd.read_csv(full / "oof_predictions.csv").sort_values("image_id")
    b = pd.read_csv(crashed / "oof_predictions.csv").sort_values("image_id")
    cols = [c for c in a.columns if c.startswith("raw_")]
    np.testing.assert_allclose(a[cols].to_numpy(), b[cols].to_numpy(), atol=1e-5)


@pytest.mark.parametrize(
    ("patience", "offsets", "stopped_after", "best"),
    [
        # Epoch 3 is the first without a lower loss: patience 1 stops there.
        (1, [3.0, 2.0, 2.5, 1.0, 0.5, 0.2], 3, 2),
        # Two epochs without a lower loss (3 and 4) after the best, epoch 2.
        (2, [3.0, 2.0, 2.5, 2.6, 1.0, 0.5], 4, 2),
        # A lower loss resets the count: 3 bad, 4 better, 5 bad, 6 bad -> stops after 6.
        (2, [3.0, 2.0, 2.5, 1.0, 1.5, 1.6, 0.1], 6, 4),
        # null: never stops early.
        ("null", [3.0, 2.0, 2.5, 2.6, 2.7, 2.8], 6, 2),
    ],
)
def test_early_stopping_stops_where_it_should(
    syn_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    patience: int | str,
    offsets: list[float],
    stopped_after: int,
    best: int,
) -> None:
    # Scaled by 100, the offsets dwarf how much the real loss moves between two tiny epochs.
    script_val_loss(monkeypatch, iter([100.0 * o for o in offsets]))
    out = tmp_path / "run"
    extra = {
        "cv.folds_to_run": "[0]",
        "train.epochs": len(offsets),
        "train.patience": patience,
        "eval.calibrate": "false",
    }
    assert train_cli(run_overrides(FINETUNE, syn_root, out, tmp_path / "cache", **extra)) == 0
    metrics = pd.read_csv(out / "fold_0" / "metrics.csv")
    assert metrics["epoch"].tolist() == list(range(1, stopped_after + 1))
    assert load_checkpoint(out / "fold_0" / "best.pt")["epoch"] == best

"""Weight averaging (train.average_from): the running mean of the weights over optimizer steps,
a checkpoint candidate that validation loss picks or not, kept across --resume.

The validation losses are scripted as in test_selection (the real figure plus a known offset),
so which weights must be kept is known in advance; training, averaging and checkpoints are the
real code."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from conftest import FINETUNE, crash_on_call, run_overrides, train_cli
from test_selection import assert_same_best, script_val_loss
from torch import nn

from skinlesion.core.config import ConfigError, load_config
from skinlesion.models.checkpoint import load_checkpoint
from skinlesion.training.averaging import WeightAverage
from skinlesion.training.final import fit_final

# Epoch 1 validates the trained weights once; from epoch 2 on (average_from=2) the trained
# weights, then their average.
AVERAGING = {"cv.folds_to_run": "[0]", "train.average_from": 2, "eval.calibrate": "false"}
STEPS = int(FINETUNE["train.steps_per_epoch"])


def offsets(values: list[float]) -> Iterator[float]:
    """Scaled by 100, the offsets dwarf how much the real loss moves between tiny epochs."""
    return iter([100.0 * v for v in values])


def record_updates(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, torch.Tensor]]:
    """The model state at every averaging update, in order."""
    seen: list[dict[str, torch.Tensor]] = []
    real = WeightAverage.update

    def spy(self: WeightAverage, model: nn.Module) -> None:
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        real(self, model)

    monkeypatch.setattr(WeightAverage, "update", spy)
    return seen


def assert_mean_of(state: dict[str, torch.Tensor], seen: list[dict[str, torch.Tensor]]) -> None:
    for key, value in state.items():
        if value.is_floating_point():
            mean = torch.stack([s[key].float() for s in seen]).mean(0)
            torch.testing.assert_close(value.float(), mean, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(value, seen[-1][key]), key


def test_mean_of_floating_state_latest_of_integer_state() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    avg, seen = WeightAverage(1), []
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(5, 3))  # moves BatchNorm's statistics and its counter
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        avg.update(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = avg.averaged(model)
    assert not out.training and out is not model
    assert_mean_of(out.state_dict(), seen)
    for key, value in model.state_dict().items():  # the trained model is untouched
        assert torch.equal(value, before[key]), key
    again = WeightAverage(1)
    again.load_state_dict(avg.state_dict(), torch.device("cpu"))
    assert again.count == 3
    assert_mean_of(again.averaged(model).state_dict(), seen)


def test_nothing_averaged_yet_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="no weights averaged"):
        WeightAverage(1).averaged(nn.Linear(2, 2))


def test_average_after_the_last_epoch_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"train.average_from=5 is after the last epoch"):
        load_config(None, ["train.epochs=4", "train.average_from=5"])
    assert load_config(None, ["train.epochs=4", "train.average_from=4"]).train.average_from == 4


def _train(root: Path, out: Path, **extra: Any) -> list[str]:
    return run_overrides(FINETUNE, root, out, out.parent / "cache", **AVERAGING, **extra)


def _fold0_best(
    root: Path, out: Path, monkeypatch: pytest.MonkeyPatch, losses: list[float], **extra: Any
) -> dict[str, Any]:
    """Fold 0 trained with the scripted ``losses``; its best.pt."""
    script_val_loss(monkeypatch, offsets(losses))
    assert train_cli(_train(root, out, **extra)) == 0
    return load_checkpoint(out / "fold_0" / "best.pt")


def test_average_kept_where_its_validation_loss_is_lowest(
    syn_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # epoch 1: trained 5; epoch 2: trained 4, average 1 (kept); epoch 3: trained 3, average 2.
    seen = record_updates(monkeypatch)
    out = tmp_path / "run"
    best = _fold0_best(syn_root, out, monkeypatch, [5, 4, 1, 3, 2])
    assert len(seen) == 2 * STEPS  # epochs 2 and 3, every step
    assert best["epoch"] == 2
    assert best["weights"] == f"mean of {STEPS} steps from epoch 2"
    assert_mean_of(best["state_dict"], seen[:STEPS])
    metrics = pd.read_csv(out / "fold_0" / "metrics.csv")
    assert metrics["avg_val_loss"].isna().tolist() == [True, False, False]
    assert best["metrics"]["val_loss"] == pytest.approx(metrics["avg_val_loss"][1])


def test_trained_weights_kept_where_they_validate_better(
    syn_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # epoch 2's trained weights (1) beat its average (2) and every later candidate.
    out = tmp_path / "run"
    best = _fold0_best(syn_root, out, monkeypatch, [5, 1, 2, 3, 4])
    assert best["epoch"] == 2 and "weights" not in best
    metrics = pd.read_csv(out / "fold_0" / "metrics.csv")
    assert best["metrics"]["val_loss"] == pytest.approx(metrics["val_loss"][1])


def test_average_only_keeps_the_average_though_the_trained_weights_validate_better(
    syn_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same losses as above: epoch 2's trained weights (1) lose to nothing but are no
    # candidate; the averages (2, then 4) decide, so epoch 2's average is kept.
    only = {"train.average_only": "true"}
    best = _fold0_best(syn_root, tmp_path / "run", monkeypatch, [5, 1, 2, 3, 4], **only)
    assert best["epoch"] == 2 and best["weights"] == f"mean of {STEPS} steps from epoch 2"
    with pytest.raises(ConfigError, match="train.average_only needs train.average_from"):
        load_config(None, ["train.average_only=true"])


def test_resume_keeps_the_average(
    syn_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Crashed in epoch 3, the resumed fold averages epochs 2 and 3 as an unbroken one does."""
    # epoch 3's average (0) is kept: the mean over epochs 2 and 3.
    losses = [5, 4, 3.5, 3, 0]
    script_val_loss(monkeypatch, offsets(losses))
    full = tmp_path / "full"
    assert train_cli(_train(syn_root, full)) == 0

    script_val_loss(monkeypatch, offsets(losses))
    crashed = tmp_path / "crashed"
    args = _train(syn_root, crashed)
    undo = crash_on_call(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train_cli(args)
    undo()
    assert train_cli(["--resume", *args]) == 0
    best = load_checkpoint(crashed / "fold_0" / "best.pt")
    assert best["epoch"] == 3 and best["weights"] == f"mean of {2 * STEPS} steps from epoch 2"
    assert_same_best(full / "fold_0" / "best.pt", crashed / "fold_0" / "best.pt")


def test_final_fit_ships_its_average_where_the_folds_kept_theirs(
    syn_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fold 0 keeps epoch 2's average; the final fit trains 2 epochs and keeps its own average.
    seen = record_updates(monkeypatch)
    out = tmp_path / "run"
    _fold0_best(syn_root, out, monkeypatch, [5, 4, 1, 3, 2])
    assert json.loads((out / "fold_0" / "summary.json").read_text())["averaged"] is True
    del seen[:]
    final = fit_final(out, progress=False)
    ckpt = load_checkpoint(final)
    assert ckpt["final_fit"]["epochs"] == 2 and ckpt["final_fit"]["average"] is True
    assert len(seen) == STEPS and ckpt["weights"] == f"mean of {STEPS} steps from epoch 2"
    assert_mean_of(ckpt["state_dict"], seen)

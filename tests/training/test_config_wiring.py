"""Config keys that no shipped recipe sets reach what they configure: the trainer (compile,
deterministic kernels, seeds, the loss), the runtime (amp, channels_last), the evaluation batch
and the preprocessing of the run's images (interpolation, detail)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_overrides

from skinlesion.core.config import load_config
from skinlesion.core.runtime import DistInfo, resolve_runtime
from skinlesion.training import cv
from skinlesion.training.builders import run_spec
from skinlesion.training.fold import _eval_batch_size
from skinlesion.training.fold_trainer import build_trainer
from skinlesion.training.losses import CrossEntropyLoss, FocalLoss
from skinlesion.training.run_data import load_run_data

CPU = resolve_runtime("cpu", channels_last=False)
TINY = ["model.backbone=test_efficientnet", "model.pretrained=false", "data.image_size=32"]


def _trainer(*overrides: str, fold: int = 1):
    cfg = load_config(None, [*TINY, *overrides])
    return build_trainer(cfg, run_spec(cfg), fold, 16, CPU), cfg


def test_train_compile_wraps_the_model_it_trains(monkeypatch: pytest.MonkeyPatch) -> None:
    compiled: list[torch.nn.Module] = []

    def compile(module: torch.nn.Module) -> torch.nn.Module:  # torch.compile costs seconds
        compiled.append(module)
        return torch.nn.Sequential(module)

    monkeypatch.setattr(torch, "compile", compile)
    plain, _ = _trainer()
    assert plain.train_model is plain.model and compiled == []
    tr, _ = _trainer("train.compile=true")
    assert compiled == [tr.model] and tr.train_model[0] is tr.model


def test_train_deterministic_turns_on_deterministic_kernels(monkeypatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)  # restored after the test
    was = torch.are_deterministic_algorithms_enabled()
    benchmark = torch.backends.cudnn.benchmark
    try:
        torch.use_deterministic_algorithms(False)
        _trainer()
        assert not torch.are_deterministic_algorithms_enabled()
        _trainer("train.deterministic=true")
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(was)
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = benchmark


def test_seed_keys_the_fold_s_streams() -> None:
    """``seed`` (with the fold) seeds the weights' initialisation and the sampler's draws."""
    a, _ = _trainer("seed=7", fold=1)
    assert a.gen.initial_seed() == 7 * 1000 + 1
    b, _ = _trainer("seed=7", fold=1)
    c, _ = _trainer("seed=8", fold=1)
    head = "classifier.weight"
    assert torch.equal(a.model.state_dict()[head], b.model.state_dict()[head])
    assert not torch.equal(a.model.state_dict()[head], c.model.state_dict()[head])
    assert c.gen.initial_seed() == 8 * 1000 + 1


ALPHA = [0.5, 1.0, 2.0, 1.5, 3.0, 0.25, 1.0]


@pytest.mark.parametrize("name", ["focal", "ce"])
def test_the_loss_section_reaches_the_criterion(name: str) -> None:
    overrides = [f"loss.name={name}", "loss.gamma=1.5", "loss.label_smoothing=0.1"]
    tr, _ = _trainer(*overrides, f"loss.alpha=[{','.join(map(str, ALPHA))}]")
    criterion = tr.criterion
    assert criterion.label_smoothing == pytest.approx(0.1)
    if name == "focal":
        assert isinstance(criterion, FocalLoss) and criterion.gamma == 1.5
        assert criterion.alpha.tolist() == ALPHA
    else:
        assert isinstance(criterion, CrossEntropyLoss) and criterion.weight.tolist() == ALPHA


def test_train_eval_batch_size_sets_the_evaluation_batch() -> None:
    assert _eval_batch_size(load_config(None, ["train.batch_size=12"])) == 24  # the default
    cfg = load_config(None, ["train.batch_size=12", "train.eval_batch_size=5"])
    assert _eval_batch_size(cfg) == 5


def test_amp_and_channels_last_reach_the_runtime(
    syn_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = []

    class Stop(Exception):
        pass

    def resolve(*args: object) -> None:
        seen.append(args)
        raise Stop

    monkeypatch.setattr(cv, "resolve_runtime", resolve)
    extra = {"train.device": "cpu", "train.amp": "false", "train.channels_last": "false"}
    args = run_overrides({}, syn_root, tmp_path / "run", tmp_path / "cache", **extra)
    with pytest.raises(Stop):
        cv.run_cv(load_config(None, args), progress=False)
    assert seen == [("cpu", False, False, DistInfo())]


def test_interpolation_and_detail_reach_the_run_s_images(syn_root: Path, tmp_path: Path) -> None:
    """``data.interpolation`` resizes the cached images and is the spec's; ``data.match_detail``
    measures the training images' detail into the spec, or leaves it out."""
    common = {"data.image_size": 32, "cv.n_folds": 2}

    def data(**extra: object):
        args = run_overrides(common, syn_root, tmp_path / "run", tmp_path / "cache", **extra)
        return load_run_data(load_config(None, args), None, progress=False)

    default = data()
    assert default.spec.interpolation == "bicubic" and default.spec.detail is not None
    other = data(**{"data.interpolation": "bilinear", "data.match_detail": "false"})
    assert other.spec.interpolation == "bilinear" and other.spec.detail is None
    assert other.table["image_id"].tolist() == default.table["image_id"].tolist()
    a = np.asarray(default.images)[default.table["row"].to_numpy()]
    b = np.asarray(other.images)[other.table["row"].to_numpy()]
    assert a.shape == b.shape and not np.array_equal(a, b)  # resized another way

"""A run of two sources through the real entry point (synthetic HAM10000 + a 3-class csv set, 1
epoch at 32 px): the sources reach folds.csv, the predictions, the report and the model card's
data line, and the model's classes are the union of theirs. Spies on the run (wrapping, never
replacing) check the wiring: every training step's loss gets each image's own label space as its
mask, and the sampler gets each image's source."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import FINETUNE, make_csv_source, train_cli
from torch import nn

from skinlesion.cli import main
from skinlesion.core.labels import CLASSES
from skinlesion.models.checkpoint import load_checkpoint
from skinlesion.training import fold_trainer

EXT = {"bkl": 6, "mel": 6, "nv": 8}


@dataclass
class Spies:
    """What the run's training handed its helpers."""

    table: pd.DataFrame | None = None  # the run's images: cache row, source, label
    draws: list[dict[str, Any]] = field(default_factory=list)  # sampler calls
    epochs: list[dict[str, Any]] = field(default_factory=list)  # train_batches calls
    losses: list[dict[str, Any]] = field(default_factory=list)  # criterion calls, in order


class SpyLoss(nn.Module):
    """The run's criterion, recording each call's targets and mask (``None``: unmasked)."""

    def __init__(self, inner: nn.Module, calls: list[dict[str, Any]]) -> None:
        super().__init__()
        self.inner, self.calls = inner, calls

    def forward(self, logits: torch.Tensor, target: torch.Tensor, *mask: torch.Tensor) -> Any:
        self.calls.append(
            {
                "training": logits.requires_grad,
                "target": target.detach().cpu().clone(),
                "mask": mask[0].detach().cpu().clone() if mask else None,
            }
        )
        return self.inner(logits, target, *mask)


def _spy_on_training(mp: pytest.MonkeyPatch, spies: Spies) -> None:
    real_targets, real_draw = fold_trainer.targets_by_row, fold_trainer.draw_indices
    real_batches, real_criterion = fold_trainer.train_batches, fold_trainer.build_criterion

    def targets_by_row(data: Any) -> Any:
        spies.table = data.table[["image_id", "row", "source", "label"]].copy()
        return real_targets(data)

    def draw_indices(*args: Any, **kwargs: Any) -> torch.Tensor:
        picks = real_draw(*args, **kwargs)
        spies.draws.append({"name": args[0], "labels": np.array(args[1]), **kwargs})
        return picks

    def train_batches(*args: Any, **kwargs: Any) -> float:
        spies.epochs.append({k: kwargs[k] for k in ("order", "batch_size", "masks")})
        return real_batches(*args, **kwargs)

    mp.setattr(fold_trainer, "targets_by_row", targets_by_row)
    mp.setattr(fold_trainer, "draw_indices", draw_indices)
    mp.setattr(fold_trainer, "train_batches", train_batches)
    mp.setattr(
        fold_trainer,
        "build_criterion",
        lambda *a, **k: SpyLoss(real_criterion(*a, **k), spies.losses),
    )


@pytest.fixture(scope="module")
def spied_run(tmp_path_factory: pytest.TempPathFactory, syn_root: Path) -> tuple[Path, Spies]:
    root = tmp_path_factory.mktemp("sources_run")
    images, labels = make_csv_source(root / "ext", EXT)
    sources = (
        f"[{{name: ham, format: ham10000, root: {syn_root}}}, "
        f"{{name: ext, format: csv, images: {images}, labels: {labels}, "
        f"where: {{split: [train]}}}}]"
    )
    overrides = {
        **FINETUNE,
        "data.sources": sources,
        "data.cache_dir": root / "cache",
        "cv.folds_to_run": "[0]",
        "train.epochs": 1,
        "output_dir": root / "run",
    }
    spies = Spies()
    with pytest.MonkeyPatch.context() as mp:
        _spy_on_training(mp, spies)
        assert train_cli([f"{k}={v}" for k, v in overrides.items()]) == 0
    return root / "run", spies


@pytest.fixture(scope="module")
def sources_run(spied_run: tuple[Path, Spies]) -> Path:
    return spied_run[0]


def test_folds_and_predictions_carry_the_source(sources_run: Path) -> None:
    folds = pd.read_csv(sources_run / "folds.csv", dtype=str)
    assert list(folds.columns) == ["image_id", "lesion_id", "dx", "fold", "source"]
    assert set(folds["source"]) == {"ham", "ext"}
    assert (folds["lesion_id"].str.split(":").str[0] == folds["source"]).all()
    assert not folds["image_id"].str.endswith(("bkl5", "mel5", "nv7")).any()  # test split
    for name in ("fold_0/val_predictions.csv", "oof_predictions.csv"):
        preds = pd.read_csv(sources_run / name, dtype={"image_id": str})
        assert list(preds.columns[:5]) == ["image_id", "lesion_id", "dx", "source", "fold"]
        assert list(preds.columns[5:12]) == list(CLASSES)  # the full softmax over the union
        assert set(preds["source"]) == {"ham", "ext"}
        merged = preds.merge(folds, on="image_id", suffixes=("", "_folds"))
        assert (merged["source"] == merged["source_folds"]).all()


def test_model_classes_are_the_union(sources_run: Path) -> None:
    ckpt = load_checkpoint(sources_run / "fold_0" / "best.pt")
    assert tuple(ckpt["class_names"]) == CLASSES
    dataset = json.loads((sources_run / "dataset.json").read_text())
    assert dataset["format"] == "sources"
    spaces = {s["name"]: s["classes"] for s in dataset["sources"]}
    assert spaces == {"ham": list(CLASSES), "ext": ["bkl", "mel", "nv"]}
    metrics = pd.read_csv(sources_run / "fold_0" / "metrics.csv")
    assert all(math.isfinite(v) for v in metrics["val_loss"])
    log = (sources_run / "train.log").read_text()
    assert "data.sources[1] (ext)" in log and "LEAKAGE CANNOT BE RULED OUT" in log


def test_report_has_per_source_figures(sources_run: Path) -> None:
    metrics = json.loads((sources_run / "oof_metrics.json").read_text())
    per_source = metrics["per_source"]
    assert set(per_source) == {"ham", "ext"}
    ext = per_source["ext"]
    assert ext["classes_present"] == ["bkl", "mel", "nv"] and set(ext["per_class"]) == set(EXT)
    assert 0 <= ext["balanced_accuracy"] <= 1
    assert ext["mel_auroc"] == ext["per_class"]["mel"]["auroc"]
    oof = pd.read_csv(sources_run / "oof_predictions.csv")
    assert ext["n"] == (oof["source"] == "ext").sum()
    report = (sources_run / "report.md").read_text()
    assert "Per source" in report
    assert any(line.startswith("| ext | ") for line in report.splitlines())
    assert any(line.startswith("| ham | ") for line in report.splitlines())


def test_model_card_names_the_sources(sources_run: Path, tmp_path: Path) -> None:
    assert (
        main(["package", str(sources_run), "--name", "two-sources", "--out-root", str(tmp_path)])
        == 0
    )
    card = json.loads((tmp_path / "two-sources" / "card.json").read_text())
    data = card["training_data"]
    assert data.startswith("2 sources: ham (ham10000 set ")
    assert "ext (csv set " in data and "classes akiec, bcc, bkl, df, mel, nv, vasc" in data


def _label_spaces(table: pd.DataFrame) -> np.ndarray:
    """Each cache row's label space, read from its source: HAM10000's 7 classes, ext's 3."""
    spaces = {"ham": np.ones(len(CLASSES), bool), "ext": np.isin(CLASSES, list(EXT))}
    out = np.ones((int(table["row"].max()) + 1, len(CLASSES)), bool)
    for row, source in zip(table["row"], table["source"], strict=True):
        out[row] = spaces[source]
    return out


def test_every_training_step_masks_each_image_to_its_source(spied_run: tuple[Path, Spies]) -> None:
    """The loss of every optimisation step gets a mask whose row for each image of the batch is
    the label space of that image's source, in the batch's order."""
    _, spies = spied_run
    assert spies.table is not None
    spaces = _label_spaces(spies.table)
    labels = spies.table.set_index("row")["label"]
    steps = [c for c in spies.losses if c["training"]]
    i = 0
    for epoch in spies.epochs:
        order, size = epoch["order"].numpy(), epoch["batch_size"]
        for start in range(0, len(order), size):
            rows = order[start : start + size]
            if len(rows) < 2:  # not trained on (BatchNorm)
                continue
            call = steps[i]
            i += 1
            assert call["mask"] is not None, f"step {i}: the loss got no mask"
            np.testing.assert_array_equal(call["mask"].numpy(), spaces[rows], err_msg=f"step {i}")
            assert call["target"].tolist() == labels.loc[rows].tolist()
    assert i == len(steps) > 0
    # Informative: the csv set's images were among those trained on, with their 3-class mask.
    trained = np.concatenate([e["order"].numpy() for e in spies.epochs])
    assert not spaces[trained].all()


def test_validation_loss_masks_each_image_to_its_source(spied_run: tuple[Path, Spies]) -> None:
    run, spies = spied_run
    folds = pd.read_csv(run / "folds.csv", dtype=str)
    val = folds[folds["fold"] == "0"]
    checks = [c for c in spies.losses if not c["training"]]
    assert len(checks) == len(spies.epochs)  # one selection loss per epoch
    for call in checks:
        assert call["mask"] is not None and len(call["mask"]) == len(val)
        partial = (~call["mask"].numpy()).any(1)
        assert partial.sum() == (val["source"] == "ext").sum() > 0


def test_the_sampler_draws_by_source_and_class(spied_run: tuple[Path, Spies]) -> None:
    """The weighted sampler gets each training image's source beside its class (it balances
    source x class), aligned image by image."""
    run, spies = spied_run
    folds = pd.read_csv(run / "folds.csv", dtype=str)
    train = folds[folds["fold"] != "0"]
    assert len(spies.draws) == len(spies.epochs) == 1
    for draw in spies.draws:
        assert draw["name"] == "weighted"
        assert draw.get("sources") is not None, "the sampler got no sources"
        got = zip(map(str, draw["sources"]), (CLASSES[i] for i in draw["labels"]), strict=True)
        assert sorted(got) == sorted(zip(train["source"], train["dx"], strict=True))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "data.sources[1] (ext): images: {missing} is not a folder"),
        (["train.scheme=linear_probe"], "train.scheme=linear_probe does not take data.sources"),
        (["data.root=x"], "data.root: describes one labelled set"),
    ],
)
def test_faults_fail_before_any_work(
    syn_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    missing = tmp_path / "missing"
    sources = (
        f"data.sources=[{{name: ham, format: ham10000, root: {syn_root}}}, "
        f"{{name: ext, format: csv, images: {missing}, labels: {tmp_path / 'l.csv'}}}]"
    )
    args = [sources, f"output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'c'}", *extra]
    assert train_cli(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("skinlesion train: error: ") == 1
    assert message.format(missing=missing) in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("{split: [trian]}", "no row has split 'trian'; did you mean train?"),
        ("{spilt: [train]}", "no column 'spilt'; did you mean split?"),
    ],
)
def test_a_where_typo_fails_with_its_close_match_before_any_folder(
    syn_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str, message: str
) -> None:
    images, labels = make_csv_source(tmp_path / "ext", EXT)
    sources = (
        f"data.sources=[{{name: ham, format: ham10000, root: {syn_root}}}, "
        f"{{name: ext, format: csv, images: {images}, labels: {labels}, where: {where}}}]"
    )
    args = [sources, f"output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'c'}"]
    assert train_cli([*args, *(f"{k}={v}" for k, v in FINETUNE.items())]) == 2
    err = capsys.readouterr().err
    assert message in err and "set data.columns" not in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "c").exists()

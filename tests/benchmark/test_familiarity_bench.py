"""``benchmark familiarity`` on a tiny model: its held-out images are the members' validation
folds, its figures are those of the predictions table, and the CLI prints and writes them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import attach_tiny_familiarity, make_tiny_packaged

import skinlesion
from skinlesion.benchmark.familiarity import _ham_table, bench_familiarity, heldout_images
from skinlesion.benchmark.tables import format_table
from skinlesion.cli import main


@pytest.fixture(scope="module")
def setup(
    synthetic_ham: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    """A synthetic HAM10000 folder and a tiny two-member model (folds 0 and 1) whose
    familiarity is fitted on its images."""
    root = synthetic_ham(5)
    table = _ham_table(root, None, 5, 42)
    folder = make_tiny_packaged(tmp_path_factory.mktemp("bench_zoo"), "benched")
    train = table.query("fold >= 2")["path"].tolist()
    attach_tiny_familiarity(folder, train, table.query("fold < 2")["path"].tolist())
    return root, folder


def test_figures_are_those_of_the_predictions_table(setup: tuple[Path, Path]) -> None:
    root, folder = setup
    r = bench_familiarity(str(folder), root, device="cpu")
    held, nonderm = r["sets"][0], r["sets"][-1]
    assert held["set"].startswith("HAM10000 held out: fold 0's validation images; fold 1's")
    assert held["auroc_vs_heldout"] is None and nonderm["auroc_vs_heldout"] > 0.5
    model = skinlesion.load_model(folder, device="cpu")
    table = _ham_table(root, None, 5, 42)
    paths, _ = heldout_images(model, table.assign(seed=42), 2000)
    assert sorted(paths) == sorted(table.query("fold in (0, 1)")["path"])
    expected = model.predict(paths)
    assert held["n"] == len(paths)
    assert held["unfamiliar"] == pytest.approx(np.mean(expected["unfamiliarity"] > 1))
    assert held["referred"] == pytest.approx(expected["refer"].astype(bool).mean())
    assert nonderm["n"] > 30 and nonderm["unfamiliar"] > held["unfamiliar"]
    text = format_table(r)
    assert "| not dermoscopy |" in text and "AUROC vs held out" in text


def test_command_prints_and_writes_json(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, folder = setup
    out = tmp_path / "fam.json"
    argv = ["benchmark", "familiarity", "--model", str(folder), "--data", str(root)]
    assert main([*argv, "--device", "cpu", "--max-images", "5", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["sets"][0]["n"] == 5
    assert "familiarity: benched (2 member(s)" in capsys.readouterr().out
    assert {"sets", "not_referred", "not_unfamiliar", "hardware"} <= set(result)

"""A run of sources: each image's label space reaches the loss as a mask, its source reaches the
sampler, and the recipe's held-out ISIC 2017 test split never reaches training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import ISIC_DIR, make_csv_source, requires_ham, requires_isic

from skinlesion.cli import main
from skinlesion.core.config import load_config
from skinlesion.core.labels import CLASSES
from skinlesion.data.folds import read_folds
from skinlesion.data.preprocess import PreprocessSpec
from skinlesion.training.run_data import (
    RunData,
    _folds_table,
    label_mask,
    table_sources,
    targets_by_row,
)

REPO = Path(__file__).parents[2]
RECIPE = REPO / "configs" / "ham10000_isic2017_cpu.yaml"


def run_data(sources: list[str], spaces: dict[str, tuple[str, ...]] | None) -> RunData:
    """Five cached rows (rows 3 and 4 of the cache hold nothing of the table, in reverse)."""
    table = pd.DataFrame(
        {
            "source": sources,
            "label": [0, 4, 5, 2][: len(sources)],
            "row": [4, 0, 2, 3][: len(sources)],
        }
    )
    spec = PreprocessSpec(32, (0.5,) * 3, (0.5,) * 3, class_names=CLASSES)
    return RunData(table, np.zeros((5, 2, 2, 3), np.uint8), spec, Path("."), {}, spaces)


def test_label_mask_of_a_three_class_source() -> None:
    data = run_data(["ham", "isic", "isic", "ham"], {"ham": CLASSES, "isic": ("bkl", "mel", "nv")})
    mask = label_mask(data, data.table)
    assert mask is not None and mask.shape == (4, 7)
    assert mask[0].all() and mask[3].all()
    assert [CLASSES[c] for c in np.flatnonzero(mask[1])] == ["bkl", "mel", "nv"]
    labels, masks = targets_by_row(data)
    assert labels.tolist() == [4, 0, 5, 2, 0]  # by cache row
    assert masks is not None
    assert torch.equal(masks[0], torch.from_numpy(mask[1])) and masks[4].all()
    assert masks[1].all()  # a row the table does not use keeps every class


@pytest.mark.parametrize(
    "spaces",
    [None, {"ham": CLASSES, "isic": CLASSES}],
    ids=["one set", "every source lists every class"],
)
def test_no_mask_where_every_label_space_is_full(spaces: dict | None) -> None:
    """No mask at all: the loss is computed exactly as in a run without sources."""
    data = run_data(["ham", "isic"], spaces)
    assert label_mask(data, data.table) is None
    assert targets_by_row(data)[1] is None


def test_table_sources() -> None:
    assert table_sources(pd.DataFrame({"dx": ["mel"]})) is None
    assert table_sources(pd.DataFrame({"source": ["a", "b"]})).tolist() == ["a", "b"]


# -- the held-out ISIC 2017 test split never reaches training --------------------------------------


def _recipe_on(tmp_path: Path, ham_root: Path, images: Path, labels: Path) -> Path:
    """The recipe with its sources' files replaced (its ``where`` kept)."""
    tree = yaml.safe_load(RECIPE.read_text())
    ham, isic = tree["data"]["sources"]
    ham["root"] = str(ham_root)
    isic.update(images=str(images), labels=str(labels))
    tree.update(output_dir=str(tmp_path / "run"))
    tree["data"]["cache_dir"] = str(tmp_path / "cache")
    tree["cv"]["n_folds"] = 2
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _assert_no_test_image(table: pd.DataFrame, folds_csv: Path, labels: Path) -> set[str]:
    all_labels = pd.read_csv(labels, dtype=str)
    held_out = set(all_labels.loc[all_labels["split"] == "test", "image_id"])
    assert held_out
    assert not held_out & set(table["image_id"])
    assert not held_out & set(read_folds(folds_csv)["image_id"])
    return held_out


def test_recipe_keeps_test_split_out_of_training_synthetic(
    syn_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The recipe's where-filter on a small csv source with train, val and test rows."""
    per_class = {"bkl": 5, "mel": 5, "nv": 6}
    images, labels = make_csv_source(tmp_path / "isic", per_class, "isic", held_out=2)
    marked = pd.read_csv(labels)
    marked.loc[marked.groupby("dx").cumcount() == 0, "split"] = "val"
    marked.to_csv(labels, index=False)
    path = _recipe_on(tmp_path, syn_root, images, labels)
    table = _folds_table(load_config(path), tmp_path / "folds.csv")
    _assert_no_test_image(table, tmp_path / "folds.csv", labels)
    kept = marked[marked["split"].isin(["train", "val"])]
    assert sorted(table.loc[table["source"] == "isic2017", "image_id"]) == sorted(kept["image_id"])
    # `skinlesion split --config` writes the same folds, with the source column.
    out = tmp_path / "split.csv"
    assert main(["split", "--config", str(path), "--out", str(out)]) == 0
    split = read_folds(out)
    assert list(split.columns) == ["image_id", "lesion_id", "dx", "fold", "source"]
    assert split.set_index("image_id")["fold"].equals(
        table.set_index("image_id")["fold"].loc[split["image_id"]]
    )
    _assert_no_test_image(table, out, labels)
    printed = capsys.readouterr().out
    assert "source ham10000:" in printed and "source isic2017: 10 images, 10 groups" in printed
    assert "(one image each)" not in printed  # ham10000 names its lesions


def test_split_writes_the_folds_a_run_makes_of_one_set(syn_root: Path, tmp_path: Path) -> None:
    """One set with ``data.max_images``: ``skinlesion split --config`` and a run read it
    through the same loader, so they make the same folds of the same subset."""
    path = tmp_path / "set.yaml"
    path.write_text(f"data:\n  root: {syn_root}\n  max_images: 20\ncv:\n  n_folds: 2\n")
    table = _folds_table(load_config(path), None)
    out = tmp_path / "split.csv"
    assert main(["split", "--config", str(path), "--out", str(out)]) == 0
    split = read_folds(out).set_index("image_id")["fold"]
    whole = pd.read_csv(syn_root / "HAM10000_metadata.csv")
    assert len(table) < len(whole) and sorted(split.index) == sorted(table["image_id"])
    assert split.loc[table["image_id"]].tolist() == table["fold"].tolist()


@requires_ham
@requires_isic
def test_recipe_keeps_isic2017_test_out_of_training_real(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """configs/ham10000_isic2017_cpu.yaml on the real data: none of ISIC 2017's 595 test
    images is in the training table or its folds.csv."""
    monkeypatch.chdir(REPO)  # the recipe's paths are relative to the repository
    cfg = load_config(RECIPE, [f"output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path}"])
    table = _folds_table(cfg, tmp_path / "folds.csv")
    held_out = _assert_no_test_image(table, tmp_path / "folds.csv", ISIC_DIR / "labels.csv")
    assert len(held_out) == 595
    assert (table["source"] == "isic2017").sum() == 2150  # train 2000 + val 150
    assert (table["source"] == "ham10000").sum() == 10015

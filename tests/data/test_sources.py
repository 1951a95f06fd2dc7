"""Several labelled sets in one table: a ``source`` column, lesion ids namespaced by source, the
union of the label spaces, and every fault named by its source."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_csv_source

from skinlesion.core.errors import DataError
from skinlesion.core.labels import CLASSES
from skinlesion.core.sources import SourceConfig
from skinlesion.data.ham10000 import read_labels
from skinlesion.data.sources import load_sources

EXT = {"bkl": 6, "mel": 6, "nv": 8}


def ham(root: Path) -> SourceConfig:
    return SourceConfig(name="ham", format="ham10000", root=str(root))


def ext(images: Path, labels: Path, **keys: object) -> SourceConfig:
    where = {"split": ["train"]}
    return SourceConfig.model_validate(
        {
            "name": "ext",
            "format": "csv",
            "images": str(images),
            "labels": str(labels),
            "where": where,
            **keys,
        }
    )


@pytest.fixture(scope="module")
def ext_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_csv_source(tmp_path_factory.mktemp("ext"), EXT)


def test_two_sources_in_one_table(syn_root: Path, ext_files: tuple[Path, Path]) -> None:
    s = load_sources([ham(syn_root), ext(*ext_files)], n_folds=2)
    t = s.table
    assert s.classes == CLASSES  # the sorted union
    assert sorted(t["source"].unique()) == ["ext", "ham"]
    ham_meta = read_labels(syn_root / "HAM10000_metadata.csv")
    own = t[t["source"] == "ham"].set_index("image_id").loc[ham_meta["image_id"]]
    assert (own["lesion_id"] == "ham:" + ham_meta["lesion_id"].to_numpy()).all()
    mine = t[t["source"] == "ext"]
    assert (mine["lesion_id"] == "ext:" + mine["image_id"]).all()  # no group column
    assert len(mine) == sum(EXT.values()) - len(EXT)  # the test split left out
    assert not mine["image_id"].str.endswith(("bkl5", "mel5", "nv7")).any()
    info = {i["name"]: i for i in s.info()["sources"]}
    assert info["ext"]["classes"] == ["bkl", "mel", "nv"] and info["ham"]["classes"] == list(
        CLASSES
    )
    assert (info["ham"]["grouped"], info["ext"]["grouped"], s.grouped) == (True, False, False)
    assert info["ext"]["n_images"] == len(mine)


def test_a_source_may_list_classes_it_has_no_images_of(
    syn_root: Path, ext_files: tuple[Path, Path]
) -> None:
    s = load_sources([ham(syn_root), ext(*ext_files, classes=list(CLASSES))], n_folds=2)
    assert s.info()["sources"][1]["classes"] == list(CLASSES)


def test_a_label_outside_the_source_classes_names_it(
    syn_root: Path, ext_files: tuple[Path, Path]
) -> None:
    with pytest.raises(DataError, match=r"data.sources\[1\] \(ext\)") as info:
        load_sources([ham(syn_root), ext(*ext_files, classes=["mel", "nv"])], n_folds=2)
    assert "bkl" in str(info.value)
    with pytest.raises(DataError, match=r"data.sources\[0\] \(ham\): labels outside") as info:
        load_sources([ham(syn_root).model_copy(update={"classes": ["mel", "nv"]})], n_folds=2)
    assert "'akiec'" in str(info.value)


def test_an_image_in_two_sources_is_an_error(syn_root: Path, ext_files: tuple[Path, Path]) -> None:
    twin = ext(*ext_files).model_copy(update={"name": "twin"})
    with pytest.raises(DataError, match="an image in two sources") as info:
        load_sources([ham(syn_root), ext(*ext_files), twin], n_folds=2)
    assert "image ext_bkl0 is in data.sources[1] (ext) and data.sources[2] (twin)" in str(
        info.value
    )


def test_a_fault_of_a_source_names_it(
    syn_root: Path, ext_files: tuple[Path, Path], tmp_path: Path
) -> None:
    with pytest.raises(DataError, match=r"^data.sources\[1\] \(ext\): ") as info:
        load_sources([ham(syn_root), ext(tmp_path / "nowhere", ext_files[1])], n_folds=2)
    assert "does not exist" in str(info.value)


def test_classes_need_groups_for_every_fold_over_all_sources(
    syn_root: Path, ext_files: tuple[Path, Path]
) -> None:
    # 5 lesions a class in ham; ext adds 5-7 single images to bkl, mel, nv: with 6 folds only
    # the classes ext lacks are short.
    with pytest.raises(DataError, match="too few groups") as info:
        load_sources([ham(syn_root), ext(*ext_files)], n_folds=6)
    short = [c for c in CLASSES if f"class '{c}' has 5 image group(s)" in str(info.value)]
    assert short == ["akiec", "bcc", "df", "vasc"]


def test_max_images_applies_to_its_source(syn_root: Path, ext_files: tuple[Path, Path]) -> None:
    whole = load_sources([ham(syn_root), ext(*ext_files)], n_folds=2).table
    s = load_sources([ham(syn_root), ext(*ext_files, max_images=10)], n_folds=2, seed=0)
    counts = s.table["source"].value_counts()
    assert counts["ham"] == (whole["source"] == "ham").sum()
    assert 8 <= counts["ext"] <= 12 < (whole["source"] == "ext").sum()

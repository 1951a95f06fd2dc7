"""The one loader of labelled sets: one set, or several in one table (a ``source`` column,
lesion ids namespaced by source, the union of the label spaces, every fault named by its
source)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_csv_source

from skinlesion.core.config import build_config, load_config
from skinlesion.core.errors import ConfigError, DataError
from skinlesion.core.labels import CLASSES
from skinlesion.core.sources import SourceConfig
from skinlesion.data.ham10000 import read_labels, subset_by_lesion
from skinlesion.data.sources import check_data_paths, load_labelled, load_sources

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
    assert f"images: {tmp_path / 'nowhere'} is not a folder" in str(info.value)


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


# -- one set at the top of data: the same loader --------------------------------------------------


def test_the_top_set_is_read_as_the_same_set_in_a_source(syn_root: Path) -> None:
    """The same images, labels and groups; only a source adds its column and its lesion
    namespace."""
    one = load_labelled(load_config(None, [f"data.root={syn_root}", "cv.n_folds=2"]))
    assert "source" not in one.table.columns and not one.sources
    assert (one.classes, one.grouped, one.source) == (CLASSES, True, str(syn_root))
    two = load_sources([ham(syn_root)], n_folds=2).table
    assert one.table["image_id"].tolist() == two["image_id"].tolist()
    assert one.table["dx"].tolist() == two["dx"].tolist()
    assert ("ham:" + one.table["lesion_id"]).tolist() == two["lesion_id"].tolist()


def test_max_images_applies_to_the_top_set(syn_root: Path) -> None:
    full = load_labelled(load_config(None, [f"data.root={syn_root}"])).table
    cut = load_labelled(
        load_config(None, [f"data.root={syn_root}", "data.max_images=12", "cv.seed=3"])
    ).table
    assert cut.equals(subset_by_lesion(full, 12, seed=3))
    assert len(cut) < len(full)


def test_classes_at_the_top_hold_ham10000_to_them(syn_root: Path) -> None:
    cfg = load_config(None, [f"data.root={syn_root}", "data.classes=[mel, nv]"])
    with pytest.raises(DataError, match=r"labels outside data.classes \['mel', 'nv'\]") as info:
        load_labelled(cfg)
    assert "'akiec'" in str(info.value)


@pytest.mark.parametrize(
    "entry",
    [
        {"format": "ham10000", "root": "{missing}"},
        {"format": "csv", "images": "{here}", "labels": "{missing}"},
        {"format": "csv", "images": "{missing}", "labels": "{here}/l.csv"},
    ],
)
def test_paths_are_checked_alike_at_the_top_and_in_a_source(tmp_path: Path, entry: dict) -> None:
    (tmp_path / "l.csv").write_text("image_id,dx\n")
    where = {"missing": tmp_path / "missing", "here": tmp_path}
    entry = {k: v.format(**where) for k, v in entry.items()}
    messages = []
    for tree in ({"data": entry}, {"data": {"sources": [{"name": "s", **entry}]}}):
        cfg = build_config(tree)
        with pytest.raises(DataError) as info:
            check_data_paths(cfg.data)
        messages.append(str(info.value))
    top, in_source = messages
    assert top.startswith("data.") and in_source.startswith("data.sources[0] (s): ")
    assert top.removeprefix("data.") == in_source.removeprefix("data.sources[0] (s): ")


def test_an_unset_root_at_the_top_is_named() -> None:
    cfg = load_config(None, [])
    with pytest.raises(ConfigError, match="data.root is not set: point it at a HAM10000 folder"):
        check_data_paths(cfg.data)
    with pytest.raises(ConfigError, match="data.root is not set"):
        load_labelled(cfg)

"""The steps every labelled table goes through: one filter, one wording per fault, one image
lookup interface with two strategies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from skinlesion.core.errors import DataError
from skinlesion.data.labelled_table import (
    FolderImages,
    IndexedImages,
    apply_label_map,
    attach_images,
    check_columns,
    duplicate_images,
    empty_cells,
    keep_rows,
    number_lines,
    unknown_labels,
)


def table(**columns: list[str]) -> pd.DataFrame:
    return number_lines(pd.DataFrame(columns))


def test_lines_are_the_files_and_survive_the_filter() -> None:
    df = table(image_id=["a", "b", "c"], split=["train", " test ", "test"])
    kept = keep_rows(df, {"split": "test"}, "f.csv")  # a string is the one value, stripped
    assert kept["line"].tolist() == [3, 4]
    assert keep_rows(df, {"split": ["train", "test"]}, "f.csv")["line"].tolist() == [2, 3, 4]
    assert keep_rows(df, None, "f.csv") is df


def test_filter_that_keeps_nothing_names_it() -> None:
    df = table(image_id=["a", "b"], split=["train", "val"], site=["x", "y"])
    with pytest.raises(DataError, match=r"no row matches --where \{'split': 'val', 'site': 'x'\}"):
        keep_rows(df, {"split": "val", "site": "x"}, "f.csv", "--where")


def test_a_filter_typo_is_named_with_its_close_match() -> None:
    df = table(image_id=["a", "b"], split=["train", "val"])
    with pytest.raises(DataError) as info:
        keep_rows(df, {"split": ["trian", "val"]}, "f.csv", "where")
    (problem,) = info.value.problems
    assert "no row has split 'trian'; did you mean train?" in problem
    with pytest.raises(DataError) as info:
        keep_rows(df, {"spilt": "val"}, "f.csv", "where")
    assert "no column 'spilt'; did you mean split?" in info.value.problems[0]


def test_missing_columns_are_named_with_what_was_found() -> None:
    df = pd.DataFrame({"image_id": ["a"]})
    with pytest.raises(DataError) as info:
        check_columns(df, ["image_id", "dx", "dx"], "f.csv", "expected image_id, dx")
    assert info.value.title == "f.csv: wrong columns"
    assert info.value.problems == [
        "missing column(s) ['dx']; found ['image_id']; expected image_id, dx"
    ]


def test_one_wording_per_fault() -> None:
    df = table(image_id=["a", "", "a", "b"], dx=["mel", "nv", "", "cancer"])
    assert empty_cells(df, {"image_id": "image", "dx": "label"}, "f.csv") == [
        "f.csv line 3: empty image",
        "f.csv line 4: empty label",
    ]
    assert unknown_labels(df, ["mel", "nv"], "f.csv", " (use --label-map)") == [
        "f.csv line 5 (image b): unknown label 'cancer', expected one of ['mel', 'nv'] "
        "(use --label-map)"
    ]
    assert duplicate_images(df, "f.csv") == ["f.csv: image_id a on lines 2, 4"]


def test_label_map_maps_keeps_and_drops() -> None:
    df = table(image_id=["a", "b", "c"], dx=["melanoma", "nv", "other"])
    out = apply_label_map(df, {"melanoma": "mel", "other": "drop"}, ["mel", "nv"])
    assert out["dx"].tolist() == ["mel", "nv"]
    assert out["line"].tolist() == [2, 3]


def _jpeg(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)
    return path


def test_folder_lookup_by_id_or_relative_path(tmp_path: Path) -> None:
    a = _jpeg(tmp_path / "a.jpg")
    b = _jpeg(tmp_path / "sub" / "b.PNG")
    lookup = FolderImages(tmp_path)
    assert lookup.find("a") == a
    assert lookup.find("sub/b.PNG") == b
    assert lookup.find("b") is None  # an id is looked for in the folder itself only
    df, problems = attach_images(table(image=["a", "ghost"]), lookup, "f.csv")
    assert df["path"].tolist() == [str(a), ""]
    assert problems == [f"f.csv line 3: no image 'ghost' (.jpg/.png/...) in {tmp_path}"]


def test_indexed_lookup_finds_any_sub_folder_and_refuses_twins(tmp_path: Path) -> None:
    b = _jpeg(tmp_path / "part_2" / "b.jpg")
    lookup = IndexedImages(tmp_path)
    assert lookup.find("b") == b
    df, problems = attach_images(table(image_id=["b", "c"]), lookup, "m.csv", column="image_id")
    assert df["path"].tolist() == [str(b), ""]
    assert problems == [f"m.csv line 3: no image 'c' (.jpg/.png/...) under {tmp_path}"]
    _jpeg(tmp_path / "part_1" / "b.jpg")
    with pytest.raises(DataError, match="the same image id in several files"):
        IndexedImages(tmp_path).find("b")


def test_unreadable_image_is_named_with_its_line(tmp_path: Path) -> None:
    (tmp_path / "bad.jpg").write_text("not a JPEG")
    _, problems = attach_images(table(image=["bad"]), FolderImages(tmp_path), "f.csv")
    assert len(problems) == 1
    assert problems[0].startswith("f.csv line 2: ") and "not a readable image" in problems[0]

"""Reading and validating a HAM10000 folder: every fault is reported at once."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import requires_ham
from PIL import Image

from skinlesion.core.labels import CLASSES
from skinlesion.data.ham10000 import (
    DataError,
    find_labels_file,
    load_ham10000,
    read_labels,
    subset_by_lesion,
    validate_labels,
)

HEADER = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
ROWS = [
    ["HAM_0000001", "ISIC_0000001", "nv", "histo", "45.0", "male", "back"],
    ["HAM_0000001", "ISIC_0000002", "nv", "histo", "45.0", "male", "back"],
    ["HAM_0000002", "ISIC_0000003", "mel", "histo", "60.0", "female", "face"],
    ["HAM_0000003", "ISIC_0000004", "bkl", "consensus", "", "unknown", "trunk"],
    ["HAM_0000004", "ISIC_0000005", "bcc", "histo", "70.0", "male", "scalp"],
    ["HAM_0000005", "ISIC_0000006", "df", "follow_up", "30.0", "female", "lower extremity"],
]


def _jpeg(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(15, 20, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, "JPEG")


def make_ham(
    root: Path, rows: list[list[str]] = ROWS, header: list[str] = HEADER, tab: bool = False
) -> Path:
    """A tiny HAM10000 release: metadata plus images split over the two official folders."""
    parts = [root / "HAM10000_images_part_1", root / "HAM10000_images_part_2"]
    for part in parts:
        part.mkdir(parents=True, exist_ok=True)
    id_col = header.index("image_id") if "image_id" in header else 1
    for i, row in enumerate(rows):
        _jpeg(parts[i % 2] / f"{row[id_col]}.jpg", seed=i)
    write_table(root / ("HAM10000_metadata.tab" if tab else "HAM10000_metadata.csv"), rows, header)
    return root


def write_table(path: Path, rows: list[list[str]], header: list[str] = HEADER) -> Path:
    if path.suffix == ".tab":
        # What Dataverse serves: tab-separated, every string quoted.
        with path.open("w", newline="") as f:
            csv.writer(f, delimiter="\t", quoting=csv.QUOTE_ALL).writerows([header, *rows])
    else:
        with path.open("w", newline="") as f:
            csv.writer(f).writerows([header, *rows])
    return path


def test_happy_path_adds_paths(tmp_path: Path) -> None:
    root = make_ham(tmp_path)
    df = load_ham10000(root)
    assert len(df) == len(ROWS)
    assert list(df.columns[:3]) == ["lesion_id", "image_id", "dx"]
    assert df["image_id"].tolist() == [r[1] for r in ROWS]
    for image_id, path in zip(df["image_id"], df["path"], strict=True):
        assert Path(path).is_file()
        assert Path(path).name == f"{image_id}.jpg"
    # Images come from both official folders.
    assert {Path(p).parent.name for p in df["path"]} == {
        "HAM10000_images_part_1",
        "HAM10000_images_part_2",
    }
    assert df.loc[3, "age"] == ""  # optional columns are kept as text, empty stays empty


def test_tab_reads_like_csv(tmp_path: Path) -> None:
    csv_df = read_labels(write_table(tmp_path / "m.csv", ROWS))
    tab_path = write_table(tmp_path / "m.tab", ROWS)
    assert tab_path.read_text().startswith('"lesion_id"\t"image_id"')
    tab_df = read_labels(tab_path)
    pd.testing.assert_frame_equal(csv_df, tab_df)


def test_tab_only_folder_is_found_and_loaded(tmp_path: Path) -> None:
    root = make_ham(tmp_path, tab=True)
    assert find_labels_file(root).name == "HAM10000_metadata.tab"
    assert load_ham10000(root)["image_id"].tolist() == [r[1] for r in ROWS]


def test_csv_preferred_over_tab(tmp_path: Path) -> None:
    root = make_ham(tmp_path, tab=True)
    write_table(root / "HAM10000_metadata.csv", ROWS)
    assert find_labels_file(root).name == "HAM10000_metadata.csv"


def test_no_metadata_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="skinlesion download"):
        find_labels_file(tmp_path)


def test_missing_column_named_with_found_columns(tmp_path: Path) -> None:
    header = [h for h in HEADER if h != "dx"]
    rows = [[v for h, v in zip(HEADER, r, strict=True) if h != "dx"] for r in ROWS]
    path = write_table(tmp_path / "m.csv", rows, header)
    with pytest.raises(DataError) as info:
        read_labels(path)
    msg = str(info.value)
    assert "'dx'" in msg
    assert "found" in msg
    for col in header:
        assert col in msg


def test_unknown_dx_on_two_rows_one_error(tmp_path: Path) -> None:
    rows = [list(r) for r in ROWS]
    rows[1][2] = "melanoma"  # line 3
    rows[4][2] = "NV?"  # line 6
    with pytest.raises(DataError) as info:
        read_labels(write_table(tmp_path / "m.csv", rows))
    err = info.value
    assert len(err.problems) == 2
    assert "line 3" in err.problems[0] and "melanoma" in err.problems[0]
    assert "line 6" in err.problems[1] and "NV?" in err.problems[1]
    assert "2 problem(s)" in str(err)


def test_empty_values_are_reported(tmp_path: Path) -> None:
    rows = [list(r) for r in ROWS]
    rows[0][0] = ""  # line 2: empty lesion_id
    rows[2][2] = "  "  # line 4: blank dx
    with pytest.raises(DataError) as info:
        read_labels(path := write_table(tmp_path / "m.csv", rows))
    problems = info.value.problems
    assert f"{path} line 2: empty lesion_id" in problems
    assert f"{path} line 4: empty dx" in problems


def test_whitespace_around_values_is_stripped(tmp_path: Path) -> None:
    rows = [list(r) for r in ROWS]
    rows[0][2] = " nv "
    df = read_labels(write_table(tmp_path / "m.csv", rows))
    assert df.loc[0, "dx"] == "nv"


def test_duplicate_image_id(tmp_path: Path) -> None:
    rows = [list(r) for r in ROWS]
    rows[4][1] = "ISIC_0000002"  # lines 3 and 6
    with pytest.raises(DataError) as info:
        read_labels(write_table(tmp_path / "m.csv", rows))
    assert any("ISIC_0000002" in p and "3, 6" in p for p in info.value.problems)


def test_duplicate_lines_use_file_lines_whatever_the_index() -> None:
    df = pd.DataFrame([r[:3] for r in ROWS], columns=HEADER[:3], index=range(10, 16))
    df.iloc[4, 1] = "ISIC_0000002"
    with pytest.raises(DataError) as info:
        validate_labels(df, "frame")
    assert any("lines 3, 6" in p for p in info.value.problems)


def test_lesion_with_two_diagnoses(tmp_path: Path) -> None:
    rows = [list(r) for r in ROWS]
    rows[1][2] = "mel"  # HAM_0000001 is now nv and mel
    with pytest.raises(DataError) as info:
        read_labels(write_table(tmp_path / "m.csv", rows))
    assert len(info.value.problems) == 1
    assert "HAM_0000001" in info.value.problems[0]
    assert "['mel', 'nv']" in info.value.problems[0]


def test_missing_and_corrupt_images_reported_together(tmp_path: Path) -> None:
    root = make_ham(tmp_path)
    part1 = root / "HAM10000_images_part_1"
    part2 = root / "HAM10000_images_part_2"
    (part1 / "ISIC_0000001.jpg").unlink()
    (part2 / "ISIC_0000004.jpg").unlink()
    (part1 / "ISIC_0000005.jpg").write_text("this is not a JPEG\n")
    with pytest.raises(DataError) as info:
        load_ham10000(root)
    err = info.value
    assert len(err.problems) == 3
    msg = str(err)
    assert f"line 2: no image 'ISIC_0000001' (.jpg/.png/...) under {root}" in msg
    assert f"line 5: no image 'ISIC_0000004' (.jpg/.png/...) under {root}" in msg
    assert "ISIC_0000005.jpg" in msg and "not a readable image" in msg


def test_without_verify_a_corrupt_image_passes(tmp_path: Path) -> None:
    root = make_ham(tmp_path)
    (root / "HAM10000_images_part_1" / "ISIC_0000005.jpg").write_bytes(b"\x00" * 64)
    assert len(load_ham10000(root, verify=False)) == len(ROWS)


def test_same_image_twice_on_disk(tmp_path: Path) -> None:
    root = make_ham(tmp_path)
    _jpeg(root / "HAM10000_images_part_2" / "ISIC_0000001.jpg", seed=99)
    with pytest.raises(DataError, match="ISIC_0000001"):
        load_ham10000(root)


def test_missing_data_folder_mentions_download(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="skinlesion download") as info:
        load_ham10000(tmp_path / "nowhere")
    assert "nowhere" in str(info.value)


def test_explicit_labels_file_path(tmp_path: Path) -> None:
    root = make_ham(tmp_path / "data")
    meta = write_table(tmp_path / "elsewhere.csv", ROWS[:3])
    assert load_ham10000(root, labels=meta)["image_id"].tolist() == [r[1] for r in ROWS[:3]]


# -- subset_by_lesion ------------------------------------------------------------------------


def _synthetic_frame(n_lesions: int = 800, seed: int = 0) -> pd.DataFrame:
    """Imbalanced classes (like HAM10000), lesions with 1-4 images."""
    rng = np.random.default_rng(seed)
    shares = np.array([0.033, 0.051, 0.11, 0.012, 0.111, 0.669, 0.014])
    rows = []
    for lesion in range(n_lesions):
        dx = CLASSES[rng.choice(len(CLASSES), p=shares / shares.sum())]
        for _ in range(rng.integers(1, 5)):
            rows.append((f"HAM_{lesion:07d}", f"ISIC_{len(rows):07d}", dx))
    return pd.DataFrame(rows, columns=["lesion_id", "image_id", "dx"])


def test_subset_keeps_whole_lesions_and_classes() -> None:
    df = _synthetic_frame()
    sub = subset_by_lesion(df, 300, seed=3)
    # Whole lesions: every lesion in the subset has all its images.
    full = df.groupby("lesion_id").size()
    kept = sub.groupby("lesion_id").size()
    assert (kept == full[kept.index]).all()
    assert abs(len(sub) - 300) <= 60
    assert set(sub["dx"]) == set(CLASSES)
    assert sub.index.tolist() == list(range(len(sub)))


def test_subset_keeps_a_rare_class() -> None:
    df = _synthetic_frame()
    rare = df[df["dx"] == "df"]["lesion_id"].iloc[0]
    df = df[(df["dx"] != "df") | (df["lesion_id"] == rare)]
    sub = subset_by_lesion(df, 100, seed=0)
    assert "df" in set(sub["dx"])


def test_subset_deterministic_for_a_seed() -> None:
    df = _synthetic_frame()
    a = subset_by_lesion(df, 200, seed=7)
    b = subset_by_lesion(df, 200, seed=7)
    c = subset_by_lesion(df, 200, seed=8)
    pd.testing.assert_frame_equal(a, b)
    assert set(a["lesion_id"]) != set(c["lesion_id"])


def test_subset_none_or_large_is_everything() -> None:
    df = _synthetic_frame(50)
    assert subset_by_lesion(df, None, seed=0) is df
    assert len(subset_by_lesion(df, len(df) + 10, seed=0)) == len(df)


@requires_ham
def test_real_metadata_is_valid(ham_dir: Path) -> None:
    df = read_labels(find_labels_file(ham_dir))
    assert len(df) == 10015
    assert df["lesion_id"].nunique() == 7470
    assert set(df["dx"]) == set(CLASSES)
    sub = subset_by_lesion(df, 1000, seed=42)
    assert 900 <= len(sub) <= 1100
    assert set(sub["dx"]) == set(CLASSES)

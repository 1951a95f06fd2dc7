"""Folds: stratified by diagnosis, never splitting a lesion, deterministic, saved as data."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import requires_ham

from skinlesion.cli import main
from skinlesion.core.labels import CLASSES
from skinlesion.data.folds import (
    FOLD_COLUMNS,
    align_folds,
    check_folds,
    fold_balance,
    make_folds,
    read_folds,
    save_folds,
    source_balance,
)
from skinlesion.data.ham10000 import DataError, find_labels_file, read_labels

# Lesions per class, imbalanced like HAM10000 but with >= 5 lesions in every class.
LESIONS_PER_CLASS = {"akiec": 10, "bcc": 14, "bkl": 26, "df": 6, "mel": 27, "nv": 150, "vasc": 7}


@pytest.fixture(scope="module")
def meta() -> pd.DataFrame:
    """About 600 images; each lesion has 1-4 images; rows in no particular order."""
    rng = np.random.default_rng(0)
    rows = []
    lesion = 0
    for dx, n in LESIONS_PER_CLASS.items():
        for _ in range(n):
            for _ in range(rng.integers(1, 5)):
                rows.append((f"HAM_{lesion:07d}", f"ISIC_{rng.integers(10**7):07d}", dx))
            lesion += 1
    df = pd.DataFrame(rows, columns=["lesion_id", "image_id", "dx"])
    df = df.drop_duplicates("image_id")
    return df.sample(frac=1, random_state=1).reset_index(drop=True)


def test_synthetic_metadata_shape(meta: pd.DataFrame) -> None:
    assert 500 <= len(meta) <= 700
    assert meta.groupby("lesion_id").size().max() > 1


def test_every_image_in_exactly_one_fold(meta: pd.DataFrame) -> None:
    folds = make_folds(meta, n_folds=5, seed=42)
    assert list(folds.columns) == list(FOLD_COLUMNS)
    assert len(folds) == len(meta)
    assert sorted(folds["image_id"]) == sorted(meta["image_id"])
    assert not folds["image_id"].duplicated().any()
    assert set(folds["fold"]) == set(range(5))
    # Each fold gets roughly a fifth of the images.
    sizes = folds["fold"].value_counts()
    assert sizes.min() >= 0.15 * len(meta) and sizes.max() <= 0.25 * len(meta)
    # Every class has a member in every fold (each class has >= 5 lesions).
    assert (folds.groupby("dx")["fold"].nunique() == 5).all()


def test_no_lesion_in_two_folds(meta: pd.DataFrame) -> None:
    folds = make_folds(meta, n_folds=5, seed=42)
    assert folds.groupby("lesion_id")["fold"].nunique().max() == 1
    check_folds(folds)
    # Labels are carried over unchanged.
    merged = folds.merge(meta, on="image_id", suffixes=("", "_meta"))
    assert (merged["dx"] == merged["dx_meta"]).all()
    assert (merged["lesion_id"] == merged["lesion_id_meta"]).all()


def test_check_folds_catches_a_leak() -> None:
    leaking = pd.DataFrame(
        {
            "image_id": ["a", "b", "c", "d"],
            "lesion_id": ["L1", "L1", "L2", "L3"],
            "dx": ["nv", "nv", "mel", "bcc"],
            "fold": [0, 1, 0, 1],
        }
    )
    with pytest.raises(DataError, match=r"lesion L1 is in folds \[0, 1\]"):
        check_folds(leaking)


def test_check_folds_catches_missing_fold_and_duplicates() -> None:
    bad = pd.DataFrame(
        {
            "image_id": ["a", "a", "c"],
            "lesion_id": ["L1", "L1", "L2"],
            "dx": ["nv", "nv", "mel"],
            "fold": [0, 0, -1],
        }
    )
    with pytest.raises(DataError) as info:
        check_folds(bad)
    assert "1 image(s) without a fold" in info.value.problems
    assert "duplicate image_id rows" in info.value.problems


def test_image_level_folds_leak(meta: pd.DataFrame) -> None:
    # The ungrouped variant exists only for the leakage audit; it does split lesions.
    folds = make_folds(meta, n_folds=5, seed=42, grouped=False)
    assert sorted(folds["image_id"]) == sorted(meta["image_id"])
    with pytest.raises(DataError, match="leak"):
        check_folds(folds)


def test_same_seed_same_folds_other_seed_different(meta: pd.DataFrame) -> None:
    a = make_folds(meta, n_folds=5, seed=42)
    b = make_folds(meta, n_folds=5, seed=42)
    c = make_folds(meta, n_folds=5, seed=7)
    pd.testing.assert_frame_equal(a, b)
    assert (a["fold"] != c["fold"]).mean() > 0.3


def test_independent_of_row_order(meta: pd.DataFrame) -> None:
    a = make_folds(meta, n_folds=5, seed=42)
    shuffled = meta.sample(frac=1, random_state=123)
    b = make_folds(shuffled, n_folds=5, seed=42)
    reversed_ = make_folds(meta.iloc[::-1], n_folds=5, seed=42)
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(a, reversed_)


def test_too_few_folds(meta: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="n_folds"):
        make_folds(meta, n_folds=1)


def test_fold_balance_known_values() -> None:
    folds = pd.DataFrame(
        {
            "image_id": list("abcdefgh"),
            "lesion_id": list("abcdefgh"),
            "dx": ["nv", "nv", "nv", "mel", "nv", "mel", "mel", "mel"],
            "fold": [0, 0, 0, 0, 1, 1, 1, 1],
        }
    )
    bal = fold_balance(folds)
    # Overall 50% nv; fold 0 is 75% nv, fold 1 is 25% nv.
    assert bal.loc[0, "nv"] == pytest.approx(25.0)
    assert bal.loc[1, "nv"] == pytest.approx(-25.0)
    assert bal.loc[0, "mel"] == pytest.approx(-25.0)


def test_save_read_round_trip(meta: pd.DataFrame, tmp_path: Path) -> None:
    folds = make_folds(meta, n_folds=5, seed=42)
    path = tmp_path / "sub" / "folds.csv"
    save_folds(folds, path)
    assert path.read_text().splitlines()[0] == "image_id,lesion_id,dx,fold"
    again = read_folds(path)
    pd.testing.assert_frame_equal(again, folds)


def test_read_folds_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "folds.csv"
    path.write_text("image_id,lesion_id,fold\na,L1,0\n")
    with pytest.raises(DataError, match=r"missing \['dx'\]") as info:
        read_folds(path)
    assert "found ['image_id', 'lesion_id', 'fold']" in str(info.value)


def test_read_folds_non_integer_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "folds.csv"
    path.write_text(
        "image_id,lesion_id,dx,fold\na,L1,nv,0\nb,L2,nv,one\nc,L3,mel,2\nd,L4,nv,1.5\ne,L5,nv,\n"
    )
    with pytest.raises(DataError) as info:
        read_folds(path)
    assert info.value.problems == [
        "line 3: fold 'one' is not an integer",
        "line 5: fold '1.5' is not an integer",
        "line 6: fold '' is not an integer",
    ]


@pytest.mark.parametrize("value", ["--1", "1-", "²", " "])
def test_read_folds_odd_integers_are_data_errors(tmp_path: Path, value: str) -> None:
    path = tmp_path / "folds.csv"
    path.write_text(f"image_id,lesion_id,dx,fold\na,L1,nv,0\nb,L2,nv,{value}\n")
    with pytest.raises(DataError, match="line 3"):
        read_folds(path)


def test_align_folds(meta: pd.DataFrame) -> None:
    folds = make_folds(meta, n_folds=5, seed=42)
    part = meta.iloc[:50]
    aligned = align_folds(part, folds, "folds.csv")
    assert aligned["image_id"].tolist() == part["image_id"].tolist()
    expected = folds.set_index("image_id").loc[part["image_id"], "fold"].to_numpy()
    assert np.array_equal(aligned["fold"].to_numpy(), expected)


def test_align_folds_images_without_fold(meta: pd.DataFrame) -> None:
    folds = make_folds(meta, n_folds=5, seed=42)
    extra = pd.DataFrame(
        {"lesion_id": ["HAM_X1", "HAM_X2"], "image_id": ["ISIC_X1", "ISIC_X2"], "dx": ["nv", "nv"]}
    )
    with pytest.raises(DataError, match="images without a fold") as info:
        align_folds(pd.concat([meta, extra], ignore_index=True), folds, "folds.csv")
    assert info.value.problems == ["image ISIC_X1", "image ISIC_X2"]


def test_align_folds_lesion_mismatch(meta: pd.DataFrame) -> None:
    folds = make_folds(meta, n_folds=5, seed=42)
    changed = meta.copy()
    changed.loc[0, "lesion_id"] = "HAM_OTHER"
    with pytest.raises(DataError, match="lesion ids differ") as info:
        align_folds(changed, folds, "folds.csv")
    assert info.value.problems == [f"image {meta.loc[0, 'image_id']}"]


def test_align_folds_duplicate_rows_in_folds_file(meta: pd.DataFrame) -> None:
    folds = make_folds(meta, n_folds=5, seed=42)
    doubled = pd.concat([folds, folds.iloc[[3]].assign(fold=(folds["fold"].iloc[3] + 1) % 5)])
    with pytest.raises(DataError, match="several fold rows") as info:
        align_folds(meta, doubled, "folds.csv")
    assert info.value.problems == [f"image {folds['image_id'].iloc[3]}"]


def test_cli_split(meta: pd.DataFrame, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    metadata = tmp_path / "meta.csv"
    meta.to_csv(metadata, index=False)
    out = tmp_path / "out" / "folds.csv"
    args = ["split", "--labels", str(metadata), "--folds", "5", "--seed", "42"]
    assert main([*args, "--out", str(out)]) == 0
    assert out.read_text().splitlines()[0] == "image_id,lesion_id,dx,fold"
    written = read_folds(out)
    pd.testing.assert_frame_equal(written, make_folds(meta, 5, 42))
    assert f"{len(meta)} images" in capsys.readouterr().out


def test_cli_split_bad_metadata(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    metadata = tmp_path / "meta.csv"
    metadata.write_text("lesion_id,image_id,dx\nL1,a,cancer\n")
    out = tmp_path / "folds.csv"
    assert main(["split", "--labels", str(metadata), "--out", str(out)]) == 2
    assert "unknown label 'cancer'" in capsys.readouterr().err
    assert not out.exists()


# -- the real HAM10000 metadata (skipped where ../shared is absent) ------------------------------


@requires_ham
def test_real_folds(ham_dir: Path, tmp_path: Path) -> None:
    df = read_labels(find_labels_file(ham_dir))
    folds = make_folds(df, n_folds=5, seed=42)
    assert len(folds) == len(df) == 10015
    assert sorted(folds["image_id"]) == sorted(df["image_id"])
    assert not folds["image_id"].duplicated().any()
    assert folds.groupby("lesion_id")["fold"].nunique().max() == 1
    check_folds(folds)
    balance = fold_balance(folds)
    assert list(balance.columns) == sorted(CLASSES)
    assert balance.abs().to_numpy().max() <= 1.5
    # The CLI with seed 42 writes exactly the same folds again.
    out = tmp_path / "folds.csv"
    assert main(["split", "--labels", str(find_labels_file(ham_dir)), "--out", str(out)]) == 0
    pd.testing.assert_frame_equal(read_folds(out), folds)


def test_check_folds_names_each_leaking_lesion_and_its_folds() -> None:
    # L1 is in folds 0 and 1, the other lesions sit in folds 2 and 3: only L1's folds are listed.
    folds = pd.DataFrame(
        {
            "image_id": ["a", "b", "c", "d"],
            "lesion_id": ["L1", "L1", "L2", "L3"],
            "dx": ["nv", "nv", "mel", "bcc"],
            "fold": [0, 1, 2, 3],
        }
    )
    with pytest.raises(DataError, match=r"^folds leak or are incomplete: 1 problem") as info:
        check_folds(folds)
    assert info.value.problems == ["lesion L1 is in folds [0, 1]"]


def test_check_folds_lists_at_most_50_lesions() -> None:
    lesions = [f"L{i:03d}" for i in range(60)]
    folds = pd.DataFrame(
        {
            "image_id": [f"{lesion}_{k}" for lesion in lesions for k in (0, 1)],
            "lesion_id": [lesion for lesion in lesions for _ in (0, 1)],
            "dx": "nv",
            "fold": [0, 1] * 60,
        }
    )
    with pytest.raises(DataError) as info:
        check_folds(folds)
    assert info.value.problems == [f"lesion {lesion} is in folds [0, 1]" for lesion in lesions[:50]]


def test_save_folds_makes_nested_folders_and_overwrites(tmp_path: Path) -> None:
    folds = pd.DataFrame(
        {"image_id": ["a", "b"], "lesion_id": ["L1", "L2"], "dx": ["nv", "mel"], "fold": [0, 1]}
    )
    path = tmp_path / "runs" / "new" / "folds.csv"
    save_folds(folds, path)
    save_folds(folds.assign(fold=[1, 0]), path)  # again, into the folder that now exists
    assert path.read_text() == "image_id,lesion_id,dx,fold\na,L1,nv,1\nb,L2,mel,0\n"


def test_read_folds_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "folds.csv"
    path.write_text("image_id,lesion_id,fold\na,L1,0\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: wrong columns: 1 problem"):
        read_folds(path)
    path.write_text("image_id,lesion_id,dx,fold\na,L1,nv,x\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: invalid folds: 1 problem"):
        read_folds(path)


def test_fold_balance_class_missing_from_a_fold() -> None:
    # df appears only in fold 0: in fold 1 its share is 0, i.e. 25 points below its 25% overall.
    folds = pd.DataFrame(
        {
            "image_id": list("abcd"),
            "lesion_id": list("abcd"),
            "dx": ["df", "nv", "nv", "nv"],
            "fold": [0, 0, 1, 1],
        }
    )
    bal = fold_balance(folds)
    assert bal.loc[0, "df"] == pytest.approx(25.0)
    assert bal.loc[1, "df"] == pytest.approx(-25.0)
    assert bal.loc[1, "nv"] == pytest.approx(25.0)


def test_make_folds_defaults_and_two_folds(meta: pd.DataFrame) -> None:
    folds = make_folds(meta)
    pd.testing.assert_frame_equal(folds, make_folds(meta, n_folds=5, seed=42))
    assert folds["fold"].dtype.kind == "i"  # written as 0..4, not 0.0..4.0
    two = make_folds(meta, n_folds=2, seed=42)
    assert sorted(two["fold"].unique()) == [0, 1]
    check_folds(two)
    with pytest.raises(ValueError, match=r"^n_folds must be >= 2, got 1$"):
        make_folds(meta, n_folds=1)


@pytest.mark.parametrize("rare_images", [3, 1])
def test_image_level_folds_are_seeded_and_use_n_folds(rare_images: int) -> None:
    # Ungrouped folds (leakage audit only): stratified while every class has >= n_folds images
    # (exactly 3 here), plain shuffled KFold once a class has fewer (1 here).
    dx = ["nv"] * 30 + ["mel"] * 9 + ["df"] * rare_images
    meta = pd.DataFrame(
        {"image_id": [f"I{i:03d}" for i in range(len(dx))], "lesion_id": "L", "dx": dx}
    )
    folds = make_folds(meta, n_folds=3, seed=1, grouped=False)
    pd.testing.assert_frame_equal(folds, make_folds(meta, n_folds=3, seed=1, grouped=False))
    assert not folds.equals(make_folds(meta, n_folds=3, seed=2, grouped=False))
    assert sorted(folds["fold"].unique()) == [0, 1, 2]
    per_fold = folds.groupby("fold")["dx"].value_counts().unstack(fill_value=0)
    if rare_images == 3:  # stratified: every class split evenly
        assert (per_fold["nv"] == 10).all() and (per_fold["df"] == 1).all()
    else:  # shuffled, not in file order
        assert folds["fold"].tolist() != sorted(folds["fold"].tolist())


# -- several sources: stratified by source x diagnosis, grouped by namespaced lesion --------------


def two_sources(meta: pd.DataFrame) -> pd.DataFrame:
    """``meta`` as source ``ham`` (lesions of 1-4 images) plus a 3-class source ``ext`` of
    single-image groups, whose raw lesion ids repeat ham's (``HAM_0000000``...): only the
    namespace tells them apart."""
    ham = meta.assign(source="ham", lesion_id="ham:" + meta["lesion_id"])
    dx = np.repeat(["bkl", "mel", "nv"], [40, 60, 200])
    ext = pd.DataFrame(
        {
            "lesion_id": [f"ext:HAM_{i:07d}" for i in range(len(dx))],
            "image_id": [f"EXT_{i:05d}" for i in range(len(dx))],
            "dx": dx,
            "source": "ext",
        }
    )
    return pd.concat([ham, ext], ignore_index=True).sample(frac=1, random_state=2)


def _deviation(folds: pd.DataFrame, source: str, n_folds: int) -> float:
    """Largest gap, in images, between a (source, dx) stratum's count in a fold and its share."""
    part = folds[folds["source"] == source]
    counts = part.groupby(["dx", "fold"]).size().unstack(fill_value=0).to_numpy()
    return float(np.abs(counts - counts.sum(1, keepdims=True) / n_folds).max())


@pytest.mark.parametrize("seed", [0, 2, 4])
def test_sources_folds_stratified_by_source_x_dx(meta: pd.DataFrame, seed: int) -> None:
    table = two_sources(meta)
    folds = make_folds(table, 5, seed)
    assert list(folds.columns) == [*FOLD_COLUMNS, "source"]
    check_folds(folds)
    # ext's single-image groups split exactly by source x dx; by dx alone they drift by 2-5
    # images a fold (the same seeds), as the mix of sources within a class is left to chance.
    assert _deviation(folds, "ext", 5) <= 1
    by_dx = make_folds(table.drop(columns="source"), 5, seed).merge(table[["image_id", "source"]])
    assert _deviation(by_dx, "ext", 5) >= 2
    assert _deviation(folds, "ham", 5) <= 2


def test_sources_folds_group_by_namespaced_lesion(meta: pd.DataFrame) -> None:
    folds = make_folds(two_sources(meta), 5, 0)
    assert folds.groupby("lesion_id")["fold"].nunique().max() == 1
    # ham:HAM_x and ext:HAM_x are two lesions: they are not pulled into one fold.
    raw = folds.assign(raw=folds["lesion_id"].str.split(":").str[1])
    shared = raw.groupby("raw").filter(lambda g: g["source"].nunique() == 2)
    assert shared.groupby("raw")["fold"].nunique().max() == 2


def test_one_source_folds_are_the_folds_without_sources(meta: pd.DataFrame) -> None:
    one = meta.assign(source="ham", lesion_id="ham:" + meta["lesion_id"])
    np.testing.assert_array_equal(make_folds(one, 5, 42)["fold"], make_folds(meta, 5, 42)["fold"])


def test_sources_folds_round_trip_and_align(meta: pd.DataFrame, tmp_path: Path) -> None:
    table = two_sources(meta)
    folds = make_folds(table, 5, 0)
    path = tmp_path / "folds.csv"
    save_folds(folds, path)
    assert path.read_text().splitlines()[0] == "image_id,lesion_id,dx,fold,source"
    read = read_folds(path)
    pd.testing.assert_frame_equal(read, folds.reset_index(drop=True), check_dtype=False)
    aligned = align_folds(table, read, str(path))
    assert (
        aligned["fold"].to_numpy() == read.set_index("image_id").loc[table["image_id"], "fold"]
    ).all()
    moved = table.assign(source=np.where(table["image_id"] == "EXT_00000", "ham", table["source"]))
    with pytest.raises(DataError, match="sources differ") as info:
        align_folds(moved, read, str(path))
    assert "EXT_00000" in str(info.value)


def test_source_balance_is_per_source(meta: pd.DataFrame) -> None:
    folds = make_folds(two_sources(meta), 5, 0)
    balance = source_balance(folds)
    assert list(balance) == ["ext", "ham"]
    assert balance["ext"] == pytest.approx(0.0, abs=1e-9)  # 40/60/200 split exactly in 5
    assert balance["ham"] == pytest.approx(
        fold_balance(folds[folds["source"] == "ham"]).abs().to_numpy().max()
    )
    assert source_balance(make_folds(meta, 5, 0)) == {}

"""Labelled sets beyond HAM10000: the generic CSV format and the ISIC 2019 layout, built small in
a temporary folder."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from skinlesion.core.config import load_config
from skinlesion.core.errors import ConfigError, DataError
from skinlesion.core.sources import ColumnsConfig
from skinlesion.data.datasets import (
    ISIC2019_CLASSES,
    ISIC2019_GROUND_TRUTH,
    ISIC2019_IMAGES,
    ISIC2019_METADATA,
    canonical_metadata,
    load_csv_set,
    load_isic2019,
)
from skinlesion.data.sources import load_labelled_set


def _image(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(path)


def _csv_set(tmp_path: Path, rows: list[dict[str, str]], ext: str = ".png") -> tuple[Path, Path]:
    """``images/<id><ext>`` for every row's ``image_id`` (ids only; paths are made by callers)."""
    images = tmp_path / "images"
    for i, row in enumerate(rows):
        name = row.get("image_id", "")
        if name and not Path(name).suffix:
            _image(images / f"{name}{ext}", i)
    labels = tmp_path / "labels.csv"
    pd.DataFrame(rows).to_csv(labels, index=False)
    return images, labels


def _rows(per_class: dict[str, int], **extra: str) -> list[dict[str, str]]:
    rows = []
    for dx, n in per_class.items():
        rows += [{"image_id": f"{dx}_{i:02d}", "dx": dx, **extra} for i in range(n)]
    return rows


def test_csv_set_without_group_column_makes_each_image_its_own_group(tmp_path: Path) -> None:
    images, labels = _csv_set(tmp_path, _rows({"nv": 3, "bkl": 2, "mel": 2}))
    s = load_csv_set(images, labels, n_folds=2)
    assert s.classes == ("bkl", "mel", "nv")  # sorted, from the data
    assert s.grouped is False
    assert (s.table["lesion_id"] == s.table["image_id"]).all()
    assert s.table["path"].map(lambda p: Path(p).name).tolist() == [
        f"{i}.png" for i in s.table["image_id"]
    ]
    assert s.info()["n_groups"] == 7


def test_csv_set_takes_lesion_id_when_present_and_files_named_by_path(tmp_path: Path) -> None:
    rows = [
        {"file": f"sub/{dx}{i}.jpg", "diagnosis": dx, "patient": f"P{i}", "age_approx": "45"}
        for dx in ("a", "b")
        for i in range(2)
    ]
    images = tmp_path / "images"
    for i, r in enumerate(rows):
        _image(images / r["file"], i)
    labels = tmp_path / "labels.csv"
    pd.DataFrame(rows).to_csv(labels, index=False)
    columns = ColumnsConfig(image="file", label="diagnosis", group="patient", age="age_approx")
    s = load_csv_set(images, labels, columns, n_folds=2)
    assert s.grouped is True
    assert s.table["image_id"].tolist() == ["sub/a0", "sub/a1", "sub/b0", "sub/b1"]
    # A patient group may hold several diagnoses.
    assert s.table["lesion_id"].tolist() == ["P0", "P1", "P0", "P1"]
    assert s.table["age"].tolist() == [45.0] * 4


def test_csv_set_default_group_column_lesion_id(tmp_path: Path) -> None:
    rows = _rows({"x": 2, "y": 2})
    for i, r in enumerate(rows):
        r["lesion_id"] = f"L{i}"
    images, labels = _csv_set(tmp_path, rows)
    s = load_csv_set(images, labels, n_folds=2)
    assert s.grouped is True and s.table["lesion_id"].tolist() == ["L0", "L1", "L2", "L3"]


def test_csv_set_metadata_becomes_canonical_and_unknown_is_nan(tmp_path: Path) -> None:
    rows = _rows({"x": 2, "y": 2})
    ages, sexes, sites = ["30", "", "55.5", "x"], ["male", "unknown", "", "female"], ["back", ""]
    for r, age, sex, site in zip(rows, ages, sexes, [*sites, "face", "-"], strict=True):
        r.update(age=age, sex=sex, localization=site)
    images, labels = _csv_set(tmp_path, rows)
    t = load_csv_set(images, labels, n_folds=2).table
    assert t["age"].dtype == np.float64
    assert t["age"].tolist()[0] == 30.0 and t["age"].tolist()[2] == 55.5
    assert math.isnan(t["age"][1]) and math.isnan(t["age"][3])
    assert t["sex"].isna().tolist() == [False, True, True, False]
    assert t["localization"].tolist()[:1] == ["back"] and pd.isna(t["localization"][1])


def test_canonical_metadata_leaves_other_columns() -> None:
    df = pd.DataFrame({"age": ["40.0", ""], "sex": ["female", "unknown"], "dx": ["nv", "mel"]})
    out = canonical_metadata(df)
    assert out["age"].iloc[0] == 40.0 and math.isnan(out["age"].iloc[1])
    assert out["sex"].iloc[0] == "female" and pd.isna(out["sex"].iloc[1])
    assert out["dx"].tolist() == ["nv", "mel"]


def test_where_keeps_matching_rows_and_line_numbers_of_the_file(tmp_path: Path) -> None:
    rows = _rows({"x": 3, "y": 3})
    for i, r in enumerate(rows):
        r["split"] = "test" if i % 3 == 0 else "train"
    images, labels = _csv_set(tmp_path, rows)
    s = load_csv_set(images, labels, where={"split": ["train"]}, n_folds=2)
    assert len(s.table) == 4 and set(s.table["split"]) == {"train"}
    assert s.table["line"].tolist() == [3, 4, 6, 7]


def test_every_fault_is_reported_with_file_and_line(tmp_path: Path) -> None:
    rows = _rows({"nv": 3, "mel": 3})
    rows.append({"image_id": "ghost", "dx": "nv"})  # line 8: no image
    rows.append({"image_id": "nv_00", "dx": "nv"})  # line 9: duplicate
    rows.append({"image_id": "odd_0", "dx": "scc"})  # line 10: unknown label
    images, labels = _csv_set(tmp_path, rows)
    (images / "mel_01.png").write_bytes(b"not a png")  # line 6: unreadable
    (images / "ghost.png").unlink()
    with pytest.raises(DataError) as err:
        load_csv_set(images, labels, classes=["mel", "nv"], n_folds=2)
    text = str(err.value)
    assert f"{labels} line 8: no image 'ghost'" in text
    assert "image_id nv_00 on lines 2, 9" in text
    assert f"{labels} line 10 (image odd_0): unknown label 'scc'" in text
    assert f"{labels} line 6:" in text and "not a readable image" in text
    assert len(err.value.problems) == 4


def test_label_with_fewer_groups_than_folds_is_an_error(tmp_path: Path) -> None:
    images, labels = _csv_set(tmp_path, _rows({"nv": 5, "df": 2}))
    with pytest.raises(DataError, match=r"label 'df' has 2 image group\(s\), fewer than the 3"):
        load_csv_set(images, labels, n_folds=3)
    assert load_csv_set(images, labels, n_folds=2).classes == ("df", "nv")


def test_a_given_class_without_images_is_an_error(tmp_path: Path) -> None:
    images, labels = _csv_set(tmp_path, _rows({"nv": 2, "mel": 2}))
    with pytest.raises(DataError, match="label 'bcc' has 0 image group"):
        load_csv_set(images, labels, classes=["bcc", "mel", "nv"], n_folds=2)
    # The given order is the output order.
    assert load_csv_set(images, labels, classes=["nv", "mel"], n_folds=2).classes == ("nv", "mel")


def test_missing_columns_are_named(tmp_path: Path) -> None:
    images, labels = _csv_set(tmp_path, _rows({"nv": 2}))
    with pytest.raises(DataError, match=r"missing column\(s\) \['diagnosis'\]"):
        load_csv_set(images, labels, ColumnsConfig(label="diagnosis"), where={"split": ["a"]})
    # A where column the file lacks is a filter typo, named as such (not "set data.columns").
    with pytest.raises(DataError, match=r"where: no column 'split'"):
        load_csv_set(images, labels, where={"split": ["a"]})


def test_config_checks_the_format_keys() -> None:
    with pytest.raises(ConfigError, match="needs data.images"):
        load_config(None, ["data.format=csv", "data.labels=x.csv"])
    with pytest.raises(ConfigError, match="data.images: not a key of data.format=ham10000"):
        load_config(None, ["data.images=i"])
    cfg = load_config(
        None, ["data.format=csv", "data.images=i", "data.labels=l", "data.where={split: test}"]
    )
    assert cfg.data.where == {"split": ["test"]}
    assert load_config(None, []).data.format == "ham10000"


# -- ISIC 2019 layout ------------------------------------------------------------------------


def _isic2019(root: Path, per_class: int = 2, unk: int = 1) -> list[str]:
    """A tiny ISIC 2019 release: ``per_class`` images a diagnosis, ``unk`` UNK rows, lesion ids
    for all but the last image of each class; the image ids in file order."""
    gt, meta = [], []
    n = 0
    for code in [*ISIC2019_CLASSES, *(["UNK"] * unk)]:
        for i in range(per_class if code != "UNK" else 1):
            image = f"ISIC_{n:07d}"
            n += 1
            gt.append({"image": image, **{c: 0.0 for c in [*ISIC2019_CLASSES, "UNK"]}, code: 1.0})
            lesion = f"BCN_{n:07d}" if i < per_class - 1 else ""
            meta.append(
                {
                    "image": image,
                    "age_approx": "" if n % 4 == 0 else 5 * n,
                    "anatom_site_general": "anterior torso",
                    "lesion_id": lesion,
                    "sex": "female" if n % 2 else "male",
                }
            )
            _image(root / ISIC2019_IMAGES / f"{image}.jpg", n)
    pd.DataFrame(gt).to_csv(root / ISIC2019_GROUND_TRUTH, index=False)
    pd.DataFrame(meta).to_csv(root / ISIC2019_METADATA, index=False)
    return [r["image"] for r in gt]


def test_isic2019_layout(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ids = _isic2019(tmp_path, per_class=3)
    with caplog.at_level("INFO"):
        s = load_isic2019(tmp_path, n_folds=3)
    assert s.classes == ("akiec", "bcc", "bkl", "df", "mel", "nv", "scc", "vasc")
    t = s.table
    assert len(t) == 24 and ids[-1] not in set(t["image_id"])  # the UNK row is dropped
    assert t.set_index("image_id")["dx"][ids[0]] == "mel"
    assert t.set_index("image_id")["dx"][ids[9]] == "akiec"  # AK is the 4th column
    assert s.grouped is True
    own = t["lesion_id"] == t["image_id"]
    assert own.sum() == 8  # the last image of each class has no lesion_id
    assert t["localization"].unique().tolist() == ["anterior torso"]
    assert t["age"].dtype == np.float64 and t["age"].isna().sum() == 6
    assert (
        "UNK column is ignored" in caplog.text and "1 image(s) labelled UNK dropped" in caplog.text
    )
    assert any("8 of 24 image(s) have no lesion_id" in n for n in s.notes)


def test_isic2019_faults_are_collected(tmp_path: Path) -> None:
    ids = _isic2019(tmp_path, per_class=2, unk=0)
    gt = pd.read_csv(tmp_path / ISIC2019_GROUND_TRUTH)
    gt.loc[1, "NV"] = 1.0  # line 3: two diagnoses
    gt.to_csv(tmp_path / ISIC2019_GROUND_TRUTH, index=False)
    (tmp_path / ISIC2019_IMAGES / f"{ids[4]}.jpg").unlink()  # line 6
    with pytest.raises(DataError) as err:
        load_isic2019(tmp_path, n_folds=2)
    text = str(err.value)
    assert f"line 3 (image {ids[1]}): 2 diagnoses marked, expected one" in text
    assert f"line 6: no image '{ids[4]}'" in text


def test_isic2019_missing_files_are_listed(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_isic2019(tmp_path)
    assert len(err.value.problems) == 3


def test_load_labelled_set_dispatches_on_format(tmp_path: Path) -> None:
    _isic2019(tmp_path, per_class=2, unk=0)
    cfg = load_config(None, ["data.format=isic2019", f"data.root={tmp_path}"])
    assert len(load_labelled_set(cfg.data, n_folds=2).table) == 16


def test_cli_split_any_labelled_set_from_a_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    from skinlesion.cli import main
    from skinlesion.data.folds import make_folds, read_folds

    rows = _rows({"nv": 6, "bkl": 4, "mel": 4})
    for i, row in enumerate(rows):
        row["patient"] = f"P{i // 2}"  # two images a patient
    images, labels = _csv_set(tmp_path, rows)
    config = tmp_path / "set.yaml"
    config.write_text(f"data:\n  format: csv\n  images: {images}\n  labels: {labels}\n")
    out = tmp_path / "folds.csv"
    base = ["split", "--config", str(config), "--out", str(out), "--folds", "2"]
    assert main([*base, "data.columns.group=patient"]) == 0
    assert "14 images, 7 lesions, 2 folds" in capsys.readouterr().out
    folds = read_folds(out)
    assert folds.groupby("lesion_id")["fold"].nunique().max() == 1
    grouped = load_csv_set(images, labels, ColumnsConfig(group="patient"), n_folds=2)
    expected = make_folds(grouped.table, 2)
    pd.testing.assert_frame_equal(folds, expected)
    # Without a group column every image is its own group, and the command says so.
    assert main(base) == 0
    assert "14 images, 14 groups (one image each)" in capsys.readouterr().out
    assert "LEAKAGE CANNOT BE RULED OUT" in caplog.text
    # Overrides need a config.
    assert main(["split", "--labels", str(labels), "--out", str(out), "cv.seed=1"]) == 2
    assert "key=value overrides ['cv.seed=1'] need --config" in capsys.readouterr().err

"""The labelled prediction files: written and read back unchanged, the class columns found by one
rule, and a broken file refused naming the file and the column or line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from skinlesion.core.errors import DataError
from skinlesion.core.labels import CLASSES
from skinlesion.evaluation.prediction_files import (
    class_columns,
    labelled_predictions,
    read_holdout_unfamiliarity,
    read_predictions,
    write_holdout_unfamiliarity,
    write_predictions,
)

K = len(CLASSES)


def _probs(n: int, seed: int = 0) -> np.ndarray:
    """Probabilities spread over the classes (no row near one-hot), with many digits."""
    logits = np.random.default_rng(seed).normal(0, 1.5, (n, K))
    e = np.exp(logits)
    return e / e.sum(1, keepdims=True)


def _keys(n: int) -> pd.DataFrame:
    """A run's image columns; ids that pandas would read as numbers without dtypes."""
    return pd.DataFrame(
        {
            "image_id": [f"{i:04d}" for i in range(n)],
            "lesion_id": [f"{i // 2}e5" for i in range(n)],
            "dx": [CLASSES[i % K] for i in range(n)],
            "source": ["ham10000"] * n,
            "site": ["rosendahl" if i % 3 else "vidir_modern" for i in range(n)],
            "fold": np.arange(n) % 2,
        }
    )


def test_round_trip_keeps_ids_classes_and_probabilities(tmp_path: Path) -> None:
    n = 21
    probs, raw = _probs(n), _probs(n, seed=1)
    table = labelled_predictions(_keys(n), probs, CLASSES, raw=raw)
    path = tmp_path / "val_predictions.csv"
    write_predictions(table, path)
    saved = read_predictions(path)
    assert saved.path == path and saved.classes == CLASSES
    assert saved.table["image_id"].tolist() == [f"{i:04d}" for i in range(n)]
    assert saved.table["lesion_id"].tolist() == [f"{i // 2}e5" for i in range(n)]
    assert saved.table["fold"].tolist() == (np.arange(n) % 2).tolist()
    assert saved.labels().tolist() == [i % K for i in range(n)]
    np.testing.assert_allclose(saved.probabilities(), probs, rtol=1e-7)
    assert saved.has_raw
    np.testing.assert_allclose(saved.probabilities("raw_"), raw, rtol=1e-7)
    assert saved.table["prediction"].tolist() == [CLASSES[i] for i in probs.argmax(1)]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_written_bytes_are_the_eight_digit_csv(tmp_path: Path) -> None:
    """The format every writer used before the files had one owner, so files stay identical."""
    table = labelled_predictions(_keys(9), _probs(9), CLASSES, unfamiliarity=np.linspace(0, 2, 9))
    path = tmp_path / "predictions.csv"
    path.write_text("an older file\n")  # replaced whole
    write_predictions(table, path)
    expected = table.to_csv(index=False, float_format="%.8g")
    assert path.read_text() == expected
    saved = read_predictions(path)
    write_predictions(saved.table, tmp_path / "again.csv")
    assert (tmp_path / "again.csv").read_bytes() == path.read_bytes()


def test_class_columns_are_those_before_prediction_that_describe_no_image() -> None:
    evaluation = ["image_id", "dx", "source", *CLASSES, "prediction"]
    assert class_columns(evaluation, "x") == list(CLASSES)
    run = ["image_id", "lesion_id", "dx", "source", "fold", "mel", "nv", "prediction"]
    assert class_columns(run, "x") == ["mel", "nv"]
    crowded = [
        "image_id",
        "path",
        "lesion_id",
        "dx",
        "age",
        "sex",
        "localization",
        "site",
        "fold",
        "bkl",
        "mel",
        "nv",
        "prediction",
        "prob_mel",
        "melanoma_flag",
        "unfamiliarity",
        "refer",
        "refer_reasons",
        "raw_bkl",
    ]
    assert class_columns(crowded, "x") == ["bkl", "mel", "nv"]


def test_extra_columns_after_prediction_are_read_but_not_classes(tmp_path: Path) -> None:
    n = 12
    probs = _probs(n)[:, [2, 4, 5]]
    probs /= probs.sum(1, keepdims=True)
    classes = ("bkl", "mel", "nv")  # ISIC 2017's three
    keys = _keys(n)[["image_id", "dx"]].assign(dx=[classes[i % 3] for i in range(n)])
    keys.insert(1, "age", np.arange(n) * 5.0)
    table = labelled_predictions(keys, probs, classes, unfamiliarity=np.linspace(0, 2, n))
    table["prob_mel"] = probs[:, 1]
    table["melanoma_flag"] = probs[:, 1] > 0.3
    table["refer"] = probs.max(1) < 0.5
    path = tmp_path / "predictions.csv"
    write_predictions(table, path)
    saved = read_predictions(path)
    assert saved.classes == classes
    assert not saved.has_raw
    assert saved.labels().tolist() == [i % 3 for i in range(n)]
    assert "unfamiliarity" in saved.table.columns


def _broken(tmp_path: Path, edit: str) -> Path:
    table = labelled_predictions(_keys(8), _probs(8), CLASSES)
    if edit == "no prediction":
        table = table.drop(columns="prediction")
    elif edit == "no class":
        table = table[["image_id", "lesion_id", "dx", "fold", "prediction"]]
    elif edit == "text probability":
        table["mel"] = table["mel"].astype(object)
        table.loc[3, "mel"] = "high"
    elif edit == "probability above 1":
        table.loc[5, "nv"] = 1.5
    elif edit == "unknown label":
        table.loc[2, "dx"] = "melanoma"
    elif edit == "fractional fold":
        table["fold"] = table["fold"].astype(float)
        table.loc[1, "fold"] = 0.5
    path = tmp_path / "oof_predictions.csv"
    table.to_csv(path, index=False)
    return path


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        ("no prediction", "missing column(s) ['prediction']"),
        ("no class", "no class column before prediction"),
        ("text probability", "line 5: column mel: 'high' is not a probability"),
        ("probability above 1", "line 7: column nv: 1.5 is not a probability"),
        ("unknown label", "line 4: column dx: 'melanoma' is not one of the classes"),
        ("fractional fold", "line 3: column fold: 0.5 is not an integer"),
    ],
)
def test_a_malformed_file_is_refused_naming_file_and_fault(
    tmp_path: Path, edit: str, named: str
) -> None:
    path = _broken(tmp_path, edit)
    with pytest.raises(DataError) as err:
        read_predictions(path)
    assert str(path) in str(err.value)
    assert named in str(err.value)


def test_a_missing_or_empty_file_is_refused_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "fold_0" / "val_predictions.csv"
    with pytest.raises(DataError, match="val_predictions.csv: file not found"):
        read_predictions(missing)
    empty = tmp_path / "predictions.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="predictions.csv: the file is empty"):
        read_predictions(empty)


def test_every_fault_of_a_file_is_listed_at_once(tmp_path: Path) -> None:
    table = labelled_predictions(_keys(8), _probs(8), CLASSES)
    table.loc[0, "dx"] = "?"
    table.loc[6, "bcc"] = -0.1
    path = tmp_path / "oof_predictions.csv"
    table.to_csv(path, index=False)
    with pytest.raises(DataError) as err:
        read_predictions(path)
    assert err.value.problems == [
        "line 8: column bcc: -0.1 is not a probability",
        f"line 2: column dx: '?' is not one of the classes {list(CLASSES)}",
    ]


def test_a_long_run_of_faults_is_counted_not_listed(tmp_path: Path) -> None:
    table = labelled_predictions(_keys(8), _probs(8), CLASSES)
    table["dx"] = "unknown"
    path = tmp_path / "oof_predictions.csv"
    table.to_csv(path, index=False)
    with pytest.raises(DataError) as err:
        read_predictions(path)
    assert len(err.value.problems) == 6
    assert err.value.problems[-1] == "column dx: 3 more such line(s)"


def test_held_out_unfamiliarity_round_trips_with_text_ids(tmp_path: Path) -> None:
    path = tmp_path / "holdout_unfamiliarity.csv"
    scores = np.array([0.123456789, 2.5, 1e-4])
    write_holdout_unfamiliarity(["0012", "ISIC_1", "7"], scores, path)
    table = read_holdout_unfamiliarity(path)
    assert table["image_id"].tolist() == ["0012", "ISIC_1", "7"]
    np.testing.assert_allclose(table["unfamiliarity"], scores, rtol=1e-7)
    assert not list(tmp_path.glob(".*tmp"))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("image_id,score\na,1\n", r"missing column\(s\) \['unfamiliarity'\]"),
        ("image_id,unfamiliarity\n", "no rows"),
        ("image_id,unfamiliarity\na,1\nb,nan\n", "line 3 is not a finite number"),
        ("image_id,unfamiliarity\na,x\n", "line 2 is not a finite number"),
    ],
)
def test_a_broken_held_out_unfamiliarity_file_is_named(
    tmp_path: Path, text: str, match: str
) -> None:
    path = tmp_path / "holdout_unfamiliarity.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=match) as err:
        read_holdout_unfamiliarity(path)
    assert str(path) in str(err.value)

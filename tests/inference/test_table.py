"""The predictions table: one builder, the same rows from every entry point (``skinlesion predict``
with either backend, ``load_model().predict``, the service's JSON), the melanoma flag at the
card's threshold, failed rows empty, and the columns of a model without a threshold."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import BATCH_ATOL
from fastapi.testclient import TestClient

import skinlesion
from skinlesion.cli import main
from skinlesion.core.labels import CLASSES
from skinlesion.inference.onnx_export import export_onnx
from skinlesion.inference.refer import refer_decision
from skinlesion.inference.table import (
    DECISION_COLUMNS,
    Decisions,
    prediction_rows,
    predictions_table,
    table_columns,
)
from skinlesion.serving.app import create_app

RULES = {"confidence_threshold": 0.5, "ood_threshold": 1.0, "ood_quantile": 0.95}


def _cli_table(argv: list[str], out: Path) -> pd.DataFrame:
    assert main(["predict", "--no-progress", *argv, "--output", str(out)]) == 0
    return pd.read_csv(out, keep_default_na=False, dtype=str)


def _flags(column: pd.Series) -> list[bool]:
    return [{"True": True, "False": False}[v] for v in column]


def test_every_entry_point_flags_the_same_rows_at_the_cards_threshold(
    spread_folder: Path, spread_imgs: list[Path], tmp_path: Path
) -> None:
    spread, images = spread_folder, spread_imgs
    threshold = json.loads((spread / "card.json").read_text())["melanoma_threshold"]
    assert threshold != 0.5
    paths = [str(p) for p in images]
    model = skinlesion.load_model(spread, device="cpu")
    api = model.predict(paths)
    cli = _cli_table(["--model", str(spread), "--device", "cpu", *paths], tmp_path / "t.csv")
    export_onnx(model, tmp_path / "onnx")
    onnx = _cli_table(
        ["--backend", "onnx", "--model", str(tmp_path / "onnx"), *paths], tmp_path / "o.csv"
    )
    with TestClient(create_app(model)) as client:
        answers = [
            client.post("/predict", files={"file": (p.name, p.read_bytes(), "image/png")}).json()
            for p in images
        ]
    assert list(api.columns) == list(cli.columns) == list(onnx.columns) == table_columns(CLASSES)
    p_mel = api["mel"].to_numpy()
    expected = (p_mel >= threshold).tolist()
    # The images spread across the threshold, and some lie between it and 0.5.
    assert any(expected) and not all(expected)
    assert expected != (p_mel >= 0.5).tolist()
    assert api["melanoma_flag"].tolist() == expected
    assert _flags(cli["melanoma_flag"]) == expected
    assert _flags(onnx["melanoma_flag"]) == expected
    assert [a["melanoma_flag"] for a in answers] == expected
    assert [a["melanoma"]["flag"] for a in answers] == expected
    assert {a["melanoma"]["threshold"] for a in answers} == {threshold}
    # The refer decision and the prediction agree too, row by row.
    refer = api["refer"].tolist()
    assert any(refer) and not all(refer)
    assert _flags(cli["refer"]) == _flags(onnx["refer"]) == refer
    assert [a["refer"] for a in answers] == refer
    assert [a["refer_reasons"] for a in answers] == [
        r.split("; ") if r else [] for r in api["refer_reasons"]
    ]
    assert cli["refer_reasons"].tolist() == api["refer_reasons"].tolist()
    for table in (cli, onnx):
        assert table["prediction"].tolist() == api["prediction"].tolist()
        assert (table["error"] == "").all()
    assert [a["prediction"] for a in answers] == api["prediction"].tolist()
    # The service's answer carries the table's keys, its class columns under probabilities.
    assert set(DECISION_COLUMNS) | {"image"} <= set(answers[0])
    assert [a["image"] for a in answers] == [p.name for p in images]
    got = np.array([[a["probabilities"][c] for c in CLASSES] for a in answers])
    np.testing.assert_allclose(got, api[list(CLASSES)].to_numpy(), atol=BATCH_ATOL)


def _decisions(threshold: float | None = 0.3) -> Decisions:
    return Decisions(tuple(CLASSES), threshold, RULES)


def _probs() -> np.ndarray:
    mel = CLASSES.index("mel")
    sure_nv = np.full(7, 0.01)
    sure_nv[CLASSES.index("nv")] = 0.94
    unsure = np.full(7, 0.6 / 6)
    unsure[mel] = 0.4
    return np.stack([sure_nv, np.full(7, np.nan), unsure])


def test_rows_by_hand() -> None:
    df = predictions_table(
        ["a.jpg", "b.jpg", "c.jpg"], _probs(), {1: "b.jpg: not an image"}, _decisions()
    )
    assert list(df.columns) == ["image", *CLASSES, *DECISION_COLUMNS]
    assert df["prediction"].tolist() == ["nv", "", "mel"]
    # p(mel) 0.01 and 0.4 against the threshold 0.3; the failed row undecided.
    assert df["melanoma_flag"].tolist()[0] is False and df["melanoma_flag"][2]
    assert pd.isna(df["melanoma_flag"][1]) and pd.isna(df["refer"][1])
    # c: top 0.4 < 0.5 and entropy of (0.4, 6 x 0.1) = 1.75 > 1.0: both reasons, joined.
    assert df["refer"].tolist()[0] is False and df["refer"][2]
    reasons = df["refer_reasons"][2].split("; ")
    assert reasons == refer_decision(_probs()[2], RULES)[1] and len(reasons) == 2
    assert df["refer_reasons"][0] == df["refer_reasons"][1] == ""
    assert np.isnan(df.loc[1, list(CLASSES)].to_numpy(dtype=float)).all()
    assert df["error"].tolist() == ["", "b.jpg: not an image", ""]


def test_a_failed_row_is_never_given_probabilities() -> None:
    probs = _probs()
    probs[1] = 1.0 / 7  # a made-up uniform answer for an image that could not be read
    with pytest.raises(ValueError, match="row 1 failed"):
        prediction_rows(["a", "b", "c"], probs, {1: "b: not an image"}, _decisions())
    with pytest.raises(ValueError, match="row 1 has no error"):
        prediction_rows(["a", "b", "c"], _probs(), {}, _decisions())


def test_without_threshold_or_rules_the_columns_stay_and_are_empty(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        decisions = Decisions.of(CLASSES, None, "runs/x/fold_0/best.pt")
    assert "runs/x/fold_0/best.pt: no melanoma threshold" in caplog.text
    assert "no refer rules" in caplog.text
    probs = _probs()[[0, 2]]
    df = predictions_table(["a", "c"], probs, {}, decisions)
    assert list(df.columns) == table_columns(CLASSES)
    assert df["melanoma_flag"].isna().all() and df["refer"].isna().all()
    assert df["prediction"].tolist() == ["nv", "mel"]
    # A label set without mel: no flag whatever the reference says.
    three = Decisions.of(("bkl", "nv", "vasc"), {"mel_threshold": 0.2}, "isic-3")
    assert three.mel_threshold is None
    # An older reference with only the domain's confidence threshold still refers.
    old = Decisions.of(
        CLASSES, {"mel_threshold": 0.2, "domain": {"confidence_threshold": 0.5}}, "x"
    )
    assert old.rules == {"confidence_threshold": 0.5} and old.mel_threshold == 0.2


def test_unfamiliarity_column_and_its_refer_reason_by_hand() -> None:
    probs = np.vstack([_probs(), _probs()[0]])  # a, b (failed), c, d: sure nv again
    u = np.array([0.42, np.nan, 0.97, 2.345])
    df = predictions_table(["a", "b", "c", "d"], probs, {1: "b: not an image"}, _decisions(), u)
    assert list(df.columns) == table_columns(CLASSES)
    assert DECISION_COLUMNS.index("unfamiliarity") < DECISION_COLUMNS.index("refer")
    np.testing.assert_allclose(df["unfamiliarity"], [0.42, np.nan, 0.97, 2.345])
    # d is as sure as a (no other rule fires): referred for its features alone.
    assert df["refer"].tolist()[0] is False and df["refer"][3]
    assert df["refer_reasons"][3] == (
        "unlike the training images: feature distance 2.35 is beyond the held-out 99th "
        "percentile (1.00)"
    )
    # c: 0.97 is below 1, so its two reasons are the other rules'.
    assert "unlike the training images" not in df["refer_reasons"][2]
    assert len(df["refer_reasons"][2].split("; ")) == 2
    assert pd.isna(df["refer"][1]) and df["error"][1] == "b: not an image"
    with pytest.raises(ValueError, match="unfamiliarity of shape"):
        predictions_table(["a", "b", "c", "d"], probs, {1: "x"}, _decisions(), u[:3])


def test_without_rules_the_familiarity_alone_decides_refer() -> None:
    probs = _probs()[[0, 2]]
    bare = Decisions(tuple(CLASSES), None, {})
    df = predictions_table(["a", "c"], probs, {}, bare, np.array([0.5, 1.5]))
    assert df["refer"].tolist() == [False, True]
    assert df["refer_reasons"][1].startswith("unlike the training images: ")
    # Neither rules nor a familiarity: refer and unfamiliarity are empty.
    df = predictions_table(["a", "c"], probs, {}, bare)
    assert df["refer"].isna().all() and df["unfamiliarity"].isna().all()

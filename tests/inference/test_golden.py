"""The shipped default model against its golden outputs (``zoo/NAME/golden.json``, written by
``tools/golden_outputs.py`` when it was packaged): 16 real HAM10000 images, every class, and for a
fused model metadata at the edges. The CLI on both backends, ``load_model().predict`` and the
service must give the stored probabilities, melanoma flag, unfamiliarity and refer decision. A
wrong encoding shared by training and prediction would pass a train-then-predict test; not this."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import HAM_DIR, requires_ham
from fastapi.testclient import TestClient

import skinlesion
from skinlesion.cli import main
from skinlesion.core.runtime import resolve_runtime
from skinlesion.inference import packaged
from skinlesion.serving.app import create_app
from skinlesion.serving.settings import ServeSettings

ATOL = 1e-4


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    name = packaged.default_name()
    assert name, "no default packaged model"
    path = packaged.zoo_dir() / name / "golden.json"
    assert path.is_file(), f"{path} missing: run tools/golden_outputs.py {name}"
    data = json.loads(path.read_text())
    assert data["model"] == name and len(data["images"]) == 16
    return data


@pytest.fixture(scope="module")
def paths(golden: dict[str, Any]) -> list[Path]:
    found = {p.stem: p for p in HAM_DIR.rglob("*.jpg")}
    return [found[g["image_id"]] for g in golden["images"]]


def _metadata(golden: dict[str, Any]) -> list[dict[str, Any]] | None:
    records = [g["metadata"] for g in golden["images"]]
    return None if records[0] is None else records


def _check(table: pd.DataFrame, golden: dict[str, Any], classes: list[str]) -> None:
    want = np.array([[g["probabilities"][c] for c in classes] for g in golden["images"]])
    got = table[classes].to_numpy(np.float64)
    np.testing.assert_allclose(got, want, atol=ATOL)
    # Informative: the images spread across classes, so a swap of two would be seen.
    assert len(set(want.argmax(1))) >= 3 and want.max() < 0.999
    flags = [g["melanoma_flag"] for g in golden["images"]]
    assert [None if pd.isna(v) else bool(v) for v in table["melanoma_flag"]] == flags
    assert [bool(v) for v in table["refer"]] == [g["refer"] for g in golden["images"]]
    unfamiliar = [g["unfamiliarity"] for g in golden["images"]]
    if unfamiliar[0] is not None:
        np.testing.assert_allclose(table["unfamiliarity"].to_numpy(float), unfamiliar, atol=ATOL)


@requires_ham
@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_load_model_predict_gives_the_golden_outputs(
    golden: dict[str, Any], paths: list[Path], backend: str
) -> None:
    model = skinlesion.load_model(device="cpu", backend=backend)
    table = model.predict(paths, metadata=_metadata(golden))
    _check(table, golden, model.class_names)


@requires_ham
@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_predict_command_gives_the_golden_outputs(
    golden: dict[str, Any], paths: list[Path], backend: str, tmp_path: Path
) -> None:
    out = tmp_path / "p.csv"
    args = ["predict", "--no-progress", "--device", "cpu", "--backend", backend]
    records = _metadata(golden)
    if records is not None:
        meta = pd.DataFrame(records).assign(image_id=[p.stem for p in paths])
        meta.to_csv(tmp_path / "meta.csv", index=False)
        args += ["--metadata", str(tmp_path / "meta.csv")]
    assert main([*args, *map(str, paths), "--output", str(out)]) == 0
    table = pd.read_csv(out)
    _check(table, golden, list(golden["images"][0]["probabilities"]))


@requires_ham
def test_the_service_gives_the_golden_outputs(golden: dict[str, Any], paths: list[Path]) -> None:
    model = packaged.resolve_model(None, resolve_runtime("cpu"))
    classes = model.class_names
    rows = []
    with TestClient(create_app(model, ServeSettings())) as client:
        for path, g in zip(paths, golden["images"], strict=True):
            form = {k: str(v) for k, v in (g["metadata"] or {}).items() if v is not None}
            files = {"file": (path.name, path.read_bytes(), "image/jpeg")}
            answer = client.post("/predict", files=files, data=form).json()
            rows.append(
                {
                    **answer["probabilities"],
                    "melanoma_flag": answer["melanoma"]["flag"],
                    "refer": answer["refer"],
                    "unfamiliarity": answer.get("unfamiliarity"),
                }
            )
    _check(pd.DataFrame(rows), golden, classes)

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
from skinlesion.inference import packaged, resolve
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


def _check(table: pd.DataFrame, golden: dict[str, Any], classes: list[str], key: str) -> None:
    """``table`` gives the golden answers ``key`` (``given`` metadata, or ``image_only``)."""
    answers = [g[key] for g in golden["images"]]
    want = np.array([[a["probabilities"][c] for c in classes] for a in answers])
    got = table[classes].to_numpy(np.float64)
    np.testing.assert_allclose(got, want, atol=ATOL)
    # Informative: the images spread across classes, so a swap of two would be seen.
    assert len(set(want.argmax(1))) >= 3 and (want.max(1) < 0.99).sum() >= 12
    flags = [None if pd.isna(v) else bool(v) for v in table["melanoma_flag"]]
    assert flags == [a["melanoma_flag"] for a in answers]
    assert [bool(v) for v in table["refer"]] == [a["refer"] for a in answers]
    unfamiliar = [a["unfamiliarity"] for a in answers]
    if unfamiliar[0] is not None:
        np.testing.assert_allclose(table["unfamiliarity"].to_numpy(float), unfamiliar, atol=ATOL)


def _plan(golden: dict[str, Any], backend: str) -> tuple[list[dict[str, Any]] | None, str]:
    """The metadata to give and the answers to expect: the ONNX graph takes images alone."""
    records = _metadata(golden)
    if records is None or backend == "onnx":
        return None, "image_only"
    return records, "given"


@requires_ham
@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_load_model_predict_gives_the_golden_outputs(
    golden: dict[str, Any], paths: list[Path], backend: str
) -> None:
    model = skinlesion.load_model(device="cpu", backend=backend)
    records, key = _plan(golden, backend)
    _check(model.predict(paths, metadata=records), golden, model.class_names, key)


@requires_ham
@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_predict_command_gives_the_golden_outputs(
    golden: dict[str, Any], paths: list[Path], backend: str, tmp_path: Path
) -> None:
    out = tmp_path / "p.csv"
    args = ["predict", "--no-progress", "--device", "cpu", "--backend", backend]
    records, key = _plan(golden, backend)
    if records is not None:
        meta = pd.DataFrame(records).assign(image_id=[p.stem for p in paths])
        meta.to_csv(tmp_path / "meta.csv", index=False)
        args += ["--metadata", str(tmp_path / "meta.csv")]
    assert main([*args, *map(str, paths), "--output", str(out)]) == 0
    table = pd.read_csv(out)
    _check(table, golden, list(golden["images"][0][key]["probabilities"]), key)


@requires_ham
def test_the_service_gives_the_golden_outputs(golden: dict[str, Any], paths: list[Path]) -> None:
    model = resolve.resolve_model(None, resolve_runtime("cpu"))
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
    _check(pd.DataFrame(rows), golden, classes, "given")


@requires_ham
def test_a_large_copy_is_seen_at_the_training_detail(paths: list[Path]) -> None:
    """The default matches detail: a 4x larger copy of a HAM10000 thumbnail (800x600) is reduced
    to the thumbnails' detail, so it gets nearly the thumbnail's probabilities (measured: at
    most 0.032 apart, 0.0027 on average)."""
    from PIL import Image

    model = skinlesion.load_model(device="cpu", backend="torch")
    detail = model.members[0].spec.detail
    assert detail is not None and detail.side == 200 and detail.jpeg_quality == 75
    large = [
        Image.open(p).convert("RGB").resize((800, 600), Image.Resampling.BICUBIC) for p in paths
    ]
    small, errors = model.predict_proba([str(p) for p in paths])
    reduced, errors_large = model.predict_proba(large)
    assert not errors and not errors_large
    diff = np.abs(reduced - small)
    assert diff.max() < 0.06 and diff.mean() < 0.006, (diff.max(), diff.mean())

"""The one resolver: an export folder works wherever a model is named. ``load_model``,
``evaluate`` and the service run its graph (equal to the PyTorch model within 1e-4); ``explain``
takes the model it was exported from when that is found and the same, and otherwise says in one
line which model it needs."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import BATCH_ATOL, check_not_saturated, make_spread_packaged, spread_images
from fastapi.testclient import TestClient
from PIL import Image

import skinlesion
from skinlesion.cli import main
from skinlesion.core.errors import ConfigError
from skinlesion.core.runtime import resolve_runtime
from skinlesion.evaluation.external import evaluate_external
from skinlesion.inference import packaged
from skinlesion.inference.onnx_model import OnnxModel
from skinlesion.inference.packaged import LoadedModel
from skinlesion.inference.resolve import Predictor, resolve_model, resolve_torch_model
from skinlesion.serving.app import create_app

CPU = resolve_runtime("cpu")


@pytest.fixture(scope="module")
def spread(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[Path]]:
    """A packaged model whose p(mel) spreads across its threshold on ``images``, and its export
    folder (TTA 2)."""
    root = tmp_path_factory.mktemp("resolve")
    images = spread_images(root / "lesions", 10)
    folder = make_spread_packaged(root / "zoo", images)
    export = root / "export"
    assert main(["export", "--model", str(folder), "--output", str(export)]) == 0
    return folder, export, images


def _changed_export(export: Path, to: Path, **changes: object) -> Path:
    """A copy of ``export`` whose ``spec.json`` has ``changes``; a change to ``None`` deletes
    the members' ``weights_sha256`` (an export written before they were recorded)."""
    folder = Path(shutil.copytree(export, to))
    meta = json.loads((folder / "spec.json").read_text())
    for key, value in changes.items():
        if key == "weights_sha256" and value is None:
            for m in meta["members"]:
                del m["weights_sha256"]
        elif key == "weights_sha256":
            meta["members"][0]["weights_sha256"] = value
        else:
            meta[key] = value
    (folder / "spec.json").write_text(json.dumps(meta))
    return folder


def test_load_model_of_an_export_folder_runs_its_graph(spread) -> None:
    folder, export, images = spread
    graph = skinlesion.load_model(export)
    eager = skinlesion.load_model(folder, device="cpu", backend="torch")
    assert isinstance(graph, OnnxModel) and isinstance(eager, LoadedModel)
    # Both offer every member of the declared interface.
    members = [n for n in vars(Predictor) if not n.startswith("_")]
    assert len(members) >= 8
    for name in members:
        assert hasattr(graph, name) and hasattr(eager, name), name
    got, want = graph.predict(images), eager.predict(images)
    classes = eager.class_names
    check_not_saturated(want[classes].to_numpy())
    np.testing.assert_allclose(got[classes].to_numpy(), want[classes].to_numpy(), atol=1e-4)
    flags = want["melanoma_flag"].tolist()
    assert True in flags and False in flags  # the threshold splits the images
    for column in ("image", "prediction", "melanoma_flag", "refer", "refer_reasons"):
        assert got[column].tolist() == want[column].tolist(), column
    # An in-memory array, as LoadedModel takes it.
    array = np.asarray(Image.open(images[7]).convert("RGB"))
    probs, errors = graph.predict_proba([array, images[7]], tta=graph.tta)
    assert not errors
    np.testing.assert_allclose(probs[0], probs[1], atol=BATCH_ATOL)
    assert graph.predict([array])["image"].tolist() == ["<image 0>"]


def test_an_export_refuses_what_its_graph_cannot_do(spread, capsys) -> None:
    folder, export, images = spread
    assert resolve_model(export, CPU, "onnx", tta=2).tta == 2
    with pytest.raises(ConfigError, match="--tta 1: .* 2 TTA view"):
        resolve_model(export, CPU, tta=1)
    with pytest.raises(ConfigError, match=r"--backend torch: .*exported from \(spread\)"):
        resolve_model(export, CPU, "torch")
    with pytest.raises(ConfigError, match="fp32 graph"):
        resolve_model(export, CPU, "onnx-int8")
    graph = resolve_model(export, CPU)
    with pytest.raises(ConfigError, match="takes images only"):
        graph.predict(images[:1], metadata=[{"age": 60}])
    with pytest.raises(ConfigError, match="--tta 4"):
        graph.predict(images[:1], tta=4)
    assert resolve_model(export, CPU, detail="off").specs[0].detail is None
    meta = export.parent / "meta.csv"
    pd.DataFrame({"image_id": ["lesion_00"], "age": [60]}).to_csv(meta, index=False)
    argv = ["predict", "--model", str(export), "--metadata", str(meta), str(images[0])]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--metadata: " in err and "takes images only" in err


def test_evaluate_an_export_folder(spread, tmp_path: Path, caplog) -> None:
    folder, export, images = spread
    labels = tmp_path / "labels.csv"
    ids = [p.stem for p in images]
    dx = ["nv"] * 5 + ["mel"] * 5  # pale to dark
    table = pd.DataFrame({"image_id": ids, "lesion_id": ids, "dx": dx, "age": 50, "sex": "male"})
    table.to_csv(labels, index=False)
    base = ["evaluate", "--labels", str(labels), "--images", str(images[0].parent)]
    base += ["--n-boot", "20", "--no-progress"]
    with caplog.at_level(logging.INFO):
        assert main([*base, "--model", str(export), "--output", str(tmp_path / "onnx")]) == 0
    assert "['age', 'sex'] not used: an ONNX graph takes images only" in caplog.text
    args = ["--model", str(folder), "--backend", "torch", "--device", "cpu"]
    assert main([*base, *args, "--output", str(tmp_path / "torch")]) == 0
    got, want = (pd.read_csv(tmp_path / d / "predictions.csv") for d in ("onnx", "torch"))
    classes = list(skinlesion.CLASSES)
    np.testing.assert_allclose(got[classes].to_numpy(), want[classes].to_numpy(), atol=1e-4)
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("onnx", "torch"))
    assert (a["backend"], b["backend"]) == ("onnx", "torch")
    assert a["model"] == str(export) and a["tta"] == 2
    assert a["metadata"] == "not used: the ONNX graph takes images only"
    assert a["mel_threshold"] == b["mel_threshold"] is not None
    assert a["point"]["macro_auroc"] == pytest.approx(b["point"]["macro_auroc"], abs=1e-3)
    assert a["point"]["confusion_matrix"] == b["point"]["confusion_matrix"]
    # What the graph cannot do: one line each.
    assert main([*base, "--model", str(export), "--tta", "1", "--output", str(tmp_path / "x")]) == 2
    with pytest.raises(ConfigError, match="use_metadata=True: .* takes images only"):
        evaluate_external(export, labels, images[0].parent, tmp_path / "y", use_metadata=True)


def test_serve_an_export_folder(spread) -> None:
    folder, export, images = spread
    graph = resolve_model(export, CPU)
    eager = resolve_model(folder, CPU, "torch")
    want, _ = eager.predict_proba(images)
    with TestClient(create_app(graph)) as client:
        for i in (0, 5, 9):
            files = {"file": (images[i].name, images[i].read_bytes(), "image/png")}
            answer = client.post("/predict?explain=true", files=files).json()
            got = np.array([answer["probabilities"][c] for c in graph.class_names])
            np.testing.assert_allclose(got, want[i], atol=1e-4)
            assert answer["model"] == {"name": "spread", "version": "0.0-test"}
            assert answer["explanation"] is None
            assert "Grad-CAM needs the PyTorch weights" in answer["explanation_unavailable"]
            assert answer["metadata_used"] is None
        assert client.get("/model").json()["name"] == "spread"
        assert client.get("/health").json()["images"] == 3


def test_explain_an_export_explains_the_model_it_was_exported_from(
    spread, tmp_path: Path, caplog, monkeypatch
) -> None:
    folder, export, images = spread
    picks = [str(p) for p in images[::3]]

    def explain(model: Path, out: str) -> int:
        return main(["explain", "--model", str(model), "--output", str(tmp_path / out), *picks])

    with caplog.at_level(logging.INFO):
        assert explain(export, "a") == 0
    assert f"explain uses spread ({folder.resolve()})" in caplog.text
    assert explain(folder, "b") == 0
    got, want = (pd.read_csv(tmp_path / d / "explanations.csv") for d in ("a", "b"))
    pd.testing.assert_frame_equal(got, want)
    # Moved away from the recorded path: found again as the packaged model of its name.
    moved = _changed_export(export, tmp_path / "moved", exported_from=str(tmp_path / "gone"))
    monkeypatch.setattr(packaged, "zoo_dir", lambda: folder.parent)
    assert resolve_torch_model(moved, CPU, "explain").origin == folder


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        (
            {"exported_from": "/nowhere/spread", "name": "gone"},
            "not at /nowhere/spread, not packaged",
        ),
        ({"exported_from": None, "source": "/old/key", "name": "gone"}, "not at /old/key,"),
        ({"weights_sha256": "0" * 64}, "has other weights"),
        ({"weights_sha256": None}, "records no weights' SHA-256"),
    ],
    ids=["not-found", "older-export", "other-weights", "not-recorded"],
)
def test_explain_an_export_of_a_model_not_at_hand_names_it(
    spread, tmp_path: Path, capsys, changes: dict[str, object], why: str
) -> None:
    _, export, images = spread
    copy = _changed_export(export, tmp_path / "export", **changes)
    argv = ["explain", "--model", str(copy), "--output", str(tmp_path / "cams"), str(images[0])]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("skinlesion explain: error: ") and "\n" not in err, err
    assert "explain needs the PyTorch model this ONNX graph was exported from" in err
    assert why in err and "pass --model with that model" in err
    assert not (tmp_path / "cams" / "explanations.csv").exists()

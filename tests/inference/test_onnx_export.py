"""ONNX export: one graph with dynamic batch whose probabilities (and unfamiliarity) equal
PyTorch's within 1e-4, and `predict --backend onnx`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import (
    BATCH_ATOL,
    attach_tiny_familiarity,
    check_not_saturated,
    make_spread_packaged,
    make_tiny_packaged,
    spread_images,
)

from skinlesion.cli import main
from skinlesion.core.runtime import resolve_runtime
from skinlesion.data.augment import tta_views
from skinlesion.data.preprocess import prepare_with_spec
from skinlesion.inference.onnx_export import _view, export_onnx
from skinlesion.inference.onnx_model import OnnxModel
from skinlesion.inference.resolve import resolve_model


@pytest.fixture(scope="module")
def exported(tiny_packaged: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx")
    export_onnx(resolve_model(tiny_packaged, resolve_runtime("cpu")), out)
    return out


def test_graph_views_are_the_tta_views() -> None:
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    for k, view in enumerate(tta_views(x, 8)):
        torch.testing.assert_close(_view(x, k), view, rtol=0, atol=0)
    # A non-square input: the 4 shape-keeping views.
    y = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    for k, view in enumerate(tta_views(y, 4)):
        torch.testing.assert_close(_view(y, k), view, rtol=0, atol=0)


@pytest.fixture(scope="module")
def spread(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A model whose outputs move across images (so a swap of rows, views or classes shows),
    and the images they move on."""
    root = tmp_path_factory.mktemp("spread")
    images = spread_images(root / "images", n=12)
    return make_spread_packaged(root / "zoo", images), images


def test_parity_with_pytorch(spread: tuple[Path, list[Path]], tmp_path: Path) -> None:
    folder, images = spread
    model = resolve_model(folder, resolve_runtime("cpu"), backend="torch")
    expected, errors = model.predict_proba(images)
    export_onnx(model, tmp_path / "onnx")
    onnx_model = OnnxModel(tmp_path / "onnx", threads=1)
    got, onnx_errors = onnx_model.predict_proba(images, batch_size=4)
    assert not errors and not onnx_errors
    check_not_saturated(expected)
    assert np.abs(got - expected).max() <= 1e-4
    assert (got.argmax(1) == expected.argmax(1)).all() and len(set(expected.argmax(1))) > 1
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)
    # The dynamic batch axis: one batch of all images equals each image alone, row by row.
    arrays = np.stack([prepare_with_spec(p, onnx_model.spec) for p in images])
    together = onnx_model.run(arrays)
    one_by_one = np.concatenate([onnx_model.run(arrays[i : i + 1]) for i in range(len(arrays))])
    np.testing.assert_allclose(together, one_by_one, atol=BATCH_ATOL)
    assert np.abs(np.diff(together, axis=0)).max() > 100 * BATCH_ATOL  # rows that differ


def test_saved_spec(exported: Path, tiny_packaged: Path) -> None:
    meta = json.loads((exported / "spec.json").read_text())
    source = json.loads((tiny_packaged / "model.json").read_text())
    assert meta["tta"] == 2 and meta["preprocessing"] == source["preprocessing"]
    assert [m["temperature"] for m in meta["members"]] == [1.0, 1.5]
    # What recognises the model it came from (explain needs it): its path and weights' hash.
    assert meta["exported_from"] == str(tiny_packaged.resolve())
    assert [m["weights_sha256"] for m in meta["members"]] == [source["weights_sha256"]] * 2
    assert meta["reference"] == source["reference"]
    assert json.loads((exported / "card.json").read_text())["name"] == "tiny"


def test_export_and_onnx_backend_commands(spread: tuple[Path, list[Path]], tmp_path: Path) -> None:
    folder, paths = spread
    images = [str(p) for p in paths]
    out = tmp_path / "export"
    assert main(["export", "--model", str(folder), "--format", "onnx", "--output", str(out)]) == 0
    a, b = tmp_path / "torch.csv", tmp_path / "onnx.csv"
    common = ["predict", "--no-progress", *images]
    assert main([*common, "--model", str(folder), "--backend", "torch", "--output", str(a)]) == 0
    assert main([*common, "--backend", "onnx", "--model", str(out), "--output", str(b)]) == 0
    ta, tb = pd.read_csv(a), pd.read_csv(b)
    classes = json.loads((out / "spec.json").read_text())["class_names"]
    check_not_saturated(ta[classes].to_numpy())
    assert np.abs(ta[classes].to_numpy() - tb[classes].to_numpy()).max() <= 1e-4
    assert (ta["prediction"] == tb["prediction"]).all() and ta["prediction"].nunique() > 1
    assert (ta["melanoma_flag"] == tb["melanoma_flag"]).all() and ta["melanoma_flag"].nunique() > 1


def test_torch_backend_refuses_an_export_folder(exported: Path, capsys) -> None:
    assert main(["predict", "--backend", "torch", "--model", str(exported), "x.jpg"]) == 2
    assert "is an ONNX export" in capsys.readouterr().err


def test_unfamiliarity_output_equals_eager(tmp_path: Path) -> None:
    """The familiarity hooks run while the graph is traced: its second output is the eager
    unfamiliarity, on images like the training ones and on others."""
    from skinlesion.data.nondermoscopy import write_nondermoscopy

    lesions = spread_images(tmp_path / "lesions", n=30)
    folder = make_tiny_packaged(tmp_path / "zoo", "familiar", tta=4)
    attach_tiny_familiarity(folder, lesions[::2], lesions[1::4])
    other = write_nondermoscopy(tmp_path / "nd", photos=False, screenshots=2, noise=1, flat=1)
    images = [*lesions[3::4], *other]
    model = resolve_model(folder, resolve_runtime("cpu"), backend="torch")
    export_onnx(model, tmp_path / "onnx")
    eager = model.predict(images)
    onnx_model = OnnxModel(tmp_path / "onnx")
    assert onnx_model.has_familiarity
    got = onnx_model.predict(images, batch_size=3)
    u = eager["unfamiliarity"].to_numpy()
    assert (u < 1).any() and (u > 1).any()  # the images spread across the threshold
    np.testing.assert_allclose(got["unfamiliarity"].to_numpy(), u, rtol=1e-4, atol=1e-4)
    assert got["refer_reasons"].tolist() == eager["refer_reasons"].tolist()
    outputs = json.loads((tmp_path / "onnx" / "spec.json").read_text())["outputs"]
    assert [o["name"] for o in outputs] == ["probabilities", "unfamiliarity"]

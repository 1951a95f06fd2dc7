"""The service and the Python API with a model fused with patient metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import lesion_images, make_tiny_packaged
from fastapi.testclient import TestClient

from skinlesion.core.runtime import resolve_runtime
from skinlesion.inference.resolve import resolve_model
from skinlesion.serving.app import create_app

FIELDS = {"age": "70", "sex": "female", "localization": "face"}


@pytest.fixture(scope="module")
def fused(tmp_path_factory: pytest.TempPathFactory):
    folder = make_tiny_packaged(tmp_path_factory.mktemp("zoo"), "fused", metadata=True)
    return resolve_model(folder, resolve_runtime("cpu"))


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lesion_images(tmp_path_factory.mktemp("imgs"), 1)[0]


def _probs(answer: dict) -> np.ndarray:
    return np.array(list(answer["probabilities"].values()))


def test_form_fields_reach_the_fused_model(fused, image: Path) -> None:
    assert fused.uses_metadata
    data = image.read_bytes()
    files = {"file": ("x.jpg", data, "application/octet-stream")}
    with TestClient(create_app(fused)) as client:
        plain = client.post("/predict", files=files).json()
        told = client.post("/predict", files=files, data=FIELDS).json()
        partial = client.post("/predict", files=files, data={"sex": "female"}).json()
        bad = client.post("/predict", files=files, data={"age": "-4"})
    assert bad.status_code == 422
    for answer in (plain, told, partial):
        assert _probs(answer).sum() == pytest.approx(1.0, abs=1e-6)
    assert plain["metadata_used"] == {}
    assert told["metadata_used"] == {"age": 70.0, "sex": "female", "localization": "face"}
    assert not np.allclose(_probs(plain), _probs(told), atol=1e-4)
    # The same answer as the Python API with the same metadata, and without it.
    api = fused.predict_proba([data], metadata=[{**FIELDS, "age": 70.0}])[0][0]
    assert np.allclose(api, _probs(told), atol=1e-6)
    assert np.allclose(fused.predict_proba([data])[0][0], _probs(plain), atol=1e-6)


def test_image_only_model_ignores_the_fields(tiny_packaged: Path, image: Path) -> None:
    model = resolve_model(tiny_packaged, resolve_runtime("cpu"))
    files = {"file": ("x.jpg", image.read_bytes(), "application/octet-stream")}
    with TestClient(create_app(model)) as client:
        plain = client.post("/predict", files=files).json()
        told = client.post("/predict", files=files, data=FIELDS).json()
    assert told["metadata_used"] is None
    assert np.allclose(_probs(plain), _probs(told))


def test_predict_table_takes_records_per_image(fused, image: Path) -> None:
    df = fused.predict([str(image), str(image)], metadata=[FIELDS, None])
    probs = df[fused.class_names].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-6)
    assert not np.allclose(probs[0], probs[1], atol=1e-4)
    with pytest.raises(ValueError, match="1 rows for 2 images"):
        fused.predict([str(image), str(image)], metadata=[FIELDS])


def test_model_endpoint_lists_what_a_fused_model_reads(fused, tiny_packaged: Path) -> None:
    with TestClient(create_app(fused)) as client:
        meta = client.get("/model").json()["metadata"]
    assert meta["fields"] == ["age", "sex", "localization"]
    assert meta["sites"] == "general"
    # The union of the members' training vocabularies, sites as ISIC's general sites.
    vocab = [m.metadata.vocabulary for m in fused.members]
    assert meta["choices"]["sex"] == sorted({v for d in vocab for v in d["sex"]})
    assert meta["choices"]["localization"] == sorted({v for d in vocab for v in d["localization"]})
    assert "back" not in meta["choices"]["localization"]
    plain = resolve_model(tiny_packaged, resolve_runtime("cpu"))
    with TestClient(create_app(plain)) as client:
        assert client.get("/model").json()["metadata"] is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"age": "500"}, "invalid request: form field 'age': age 500 is over 120"),
        ({"age": "-4"}, "invalid request: form field 'age': age -4 is negative"),
        ({"age": "sixty"}, "invalid request: form field 'age': age 'sixty' is not a number"),
        # Words a table reads as missing are not numbers here: an unknown age is left out.
        (
            {"age": "nan"},
            "invalid request: form field 'age': age 'nan' is not a number; leave the field "
            "empty when the age is unknown",
        ),
        ({"age": "unknown"}, "invalid request: form field 'age': age 'unknown' is not a number;"),
        ({"sex": "x" * 40}, "invalid request: form field 'sex': String should have at most 32"),
    ],
)
def test_a_bad_form_field_is_named_with_its_problem(
    fused, image: Path, fields: dict, message: str
) -> None:
    files = {"file": ("x.jpg", image.read_bytes(), "application/octet-stream")}
    with TestClient(create_app(fused)) as client:
        r = client.post("/predict", files=files, data=fields)
    assert r.status_code == 422
    assert r.json()["error"].startswith(message) and "multipart field 'file'" not in r.text


def test_values_the_model_never_saw_are_reported_in_metadata_used(fused, image: Path) -> None:
    files = {"file": ("x.jpg", image.read_bytes(), "application/octet-stream")}
    with TestClient(create_app(fused)) as client:
        answer = client.post("/predict", files=files, data={**FIELDS, "sex": "other"}).json()
    assert answer["metadata_used"] == {
        "age": 70.0,
        "sex": "other (never seen in training: read as unknown)",
        "localization": "face",
    }

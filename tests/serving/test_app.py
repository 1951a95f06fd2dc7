"""The HTTP service: answers equal `skinlesion predict`'s, bad input gets a JSON 4xx and the
service keeps serving, requests can send bytes only, concurrent requests share batches.

Numbers, flags and refer decisions are checked on a spread model (outputs that move across the
images, flags and refer split), where a swapped row or class would show; mechanics run on the
tiny model."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import (
    BATCH_ATOL,
    check_not_saturated,
    lesion_images,
    png_bytes,
    png_header,
)
from fastapi.testclient import TestClient
from PIL import Image

from skinlesion.cli import main
from skinlesion.core.runtime import resolve_runtime
from skinlesion.inference.refer import entropy, reason_kind
from skinlesion.inference.resolve import resolve_model
from skinlesion.serving.app import _MULTIPART_SLACK, ServeSettings, create_app
from skinlesion.serving.uploads import UploadLimits

MAX_BYTES, MAX_PIXELS = 200_000, 4_000_000  # the client's limits
BOUNDARY = "skinlesion-test-boundary"


@pytest.fixture(scope="module")
def model(tiny_packaged: Path):
    return resolve_model(tiny_packaged, resolve_runtime("cpu"))


@pytest.fixture(scope="module")
def client(model):
    settings = ServeSettings(UploadLimits(max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS))
    with TestClient(create_app(model, settings)) as c:
        yield c


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return lesion_images(tmp_path_factory.mktemp("imgs"), 3)


@pytest.fixture(scope="module")
def spread_model(spread_folder: Path):
    return resolve_model(spread_folder, resolve_runtime("cpu"))


@pytest.fixture(scope="module")
def spread_client(spread_model):
    with TestClient(create_app(spread_model, ServeSettings())) as c:
        yield c


def _post(client: TestClient, data: bytes, name: str = "x.jpg", explain: bool = False):
    url = "/predict?explain=true" if explain else "/predict"
    return client.post(url, files={"file": (name, data, "application/octet-stream")})


def test_probabilities_equal_the_predict_command(
    spread_client: TestClient, spread_model, spread_imgs: list[Path], spread_folder: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    out = tmp_path / "p.csv"
    args = ["predict", "--no-progress", "--device", "cpu", "--model", str(spread_folder)]
    assert main([*args, *map(str, spread_imgs), "--output", str(out)]) == 0
    expected = pd.read_csv(out)
    classes = spread_model.class_names
    direct, errors = spread_model.predict_proba(spread_imgs)
    assert not errors
    check_not_saturated(direct)
    card = spread_client.get("/model").json()
    threshold = card["card"]["melanoma_threshold"]
    answers = []
    for i, path in enumerate(spread_imgs):
        # A misleading file name: the content decides.
        answer = _post(spread_client, path.read_bytes(), name="notes.txt").json()
        answers.append(answer)
        got = np.array([answer["probabilities"][c] for c in classes])
        np.testing.assert_allclose(got, direct[i], atol=BATCH_ATOL)
        np.testing.assert_allclose(got, expected[classes].to_numpy()[i], atol=1e-4)
        assert answer["prediction"] == expected["prediction"][i] == classes[int(got.argmax())]
        assert answer["confidence"] == pytest.approx(got.max())
        assert answer["model"]["name"] == "spread"
        mel = answer["melanoma"]
        assert mel["threshold"] == pytest.approx(threshold)
        assert (
            mel["flag"] == (mel["probability"] >= threshold) == bool(expected["melanoma_flag"][i])
        )
        assert answer["refer"] == bool(answer["refer_reasons"]) == bool(expected["refer"][i])
    # The images tell the classes, the flags and the refer decisions apart.
    assert len({a["prediction"] for a in answers}) > 1
    assert {a["melanoma"]["flag"] for a in answers} == {True, False}
    assert {a["refer"] for a in answers} == {True, False}


def test_refer_flag_follows_the_models_rules(
    spread_client: TestClient, spread_imgs: list[Path]
) -> None:
    rules = spread_client.get("/model").json()["reference"]["refer"]
    kinds = set()
    for path in spread_imgs:
        answer = _post(spread_client, path.read_bytes()).json()
        p = np.array(list(answer["probabilities"].values()))
        reasons = {reason_kind(r) for r in answer["refer_reasons"]}
        assert ("low confidence" in reasons) == bool(p.max() < rules["confidence_threshold"])
        assert ("out of distribution" in reasons) == bool(entropy(p) > rules["ood_threshold"])
        assert answer["refer"] == bool(reasons)
        kinds |= reasons
    assert {"low confidence", "out of distribution"} <= kinds


@pytest.mark.parametrize(
    ("data", "status", "words"),
    [
        (b"", 400, "empty upload"),
        (b"name,dx\nISIC_1,mel\n", 415, "not an image"),
        (png_bytes(300, 300) + b"\0" * 250_000, 413, "over the limit"),
        (png_header(3000, 3000), 413, "9000000 pixels is over the limit of 4000000"),
        # A decompression bomb PIL itself refuses: the service's limit is named, not PIL's.
        (png_header(20000, 20000), 413, "400000000 pixels is over the limit of 4000000 pixels"),
        (png_bytes(60, 60)[:80], 422, "cannot be decoded"),
    ],
)
def test_bad_uploads_get_a_json_error_and_the_service_goes_on(
    client: TestClient, data: bytes, status: int, words: str, images: list[Path]
) -> None:
    r = _post(client, data, name="lesion.jpg")
    assert r.status_code == status
    body = r.json()
    assert body["status"] == status and words in body["error"]
    assert _post(client, images[0].read_bytes()).status_code == 200


def test_over_size_body_is_refused_from_its_header(client: TestClient) -> None:
    r = client.post("/predict", content=b"x" * 10, headers={"content-length": "999999999"})
    assert r.status_code == 413 and "over the limit" in r.json()["error"]


def _multipart(image: bytes, pad: int) -> bytes:
    """A multipart body: ``image`` as the field ``file``, then a field ``pad`` of ``pad`` bytes
    that the service ignores (so the body's size can be set without touching the image)."""
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    mid = f'\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name="pad"\r\n\r\n'.encode()
    return head + image + mid + b"x" * pad + f"\r\n--{BOUNDARY}--\r\n".encode()


def _post_body(client: TestClient, image: bytes, size: int):
    """POST a multipart body of exactly ``size`` bytes carrying ``image``."""
    body = _multipart(image, 0)
    body = _multipart(image, size - len(body))
    assert len(body) == size
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    return client.post("/predict", content=body, headers=headers)


def test_request_body_limit_at_the_boundary(client: TestClient, images: list[Path]) -> None:
    # The body may carry the image limit plus room for the multipart envelope, not a byte more.
    limit = MAX_BYTES + _MULTIPART_SLACK
    image = images[0].read_bytes()
    r = _post_body(client, image, limit)
    assert r.status_code == 200 and "probabilities" in r.json()
    r = _post_body(client, image, limit + 1)
    assert r.status_code == 413
    expected = f"request body of {limit + 1} bytes is over the limit of {MAX_BYTES} bytes"
    assert expected in r.json()["error"]


def test_image_byte_limit_at_the_boundary(client: TestClient) -> None:
    # Trailing bytes after the PNG's end are ignored by the decoder: the size alone decides.
    png = png_bytes(300, 300)
    r = _post(client, png + b"\0" * (MAX_BYTES - len(png)))
    assert r.status_code == 200 and "probabilities" in r.json()
    r = _post(client, png + b"\0" * (MAX_BYTES + 1 - len(png)))
    assert r.status_code == 413
    expected = f"upload of {MAX_BYTES + 1} bytes is over the limit of {MAX_BYTES} bytes"
    assert expected in r.json()["error"]


def test_image_pixel_limit_at_the_boundary(client: TestClient) -> None:
    side = int(MAX_PIXELS**0.5)
    assert side * side == MAX_PIXELS
    r = _post(client, png_bytes(side, side))
    assert r.status_code == 200 and "probabilities" in r.json()
    # One pixel over (41 x 97561), refused from the header before any decoding.
    w, h = 41, 97561
    assert w * h == MAX_PIXELS + 1
    r = _post(client, png_header(w, h))
    assert r.status_code == 413
    assert f"{MAX_PIXELS + 1} pixels is over the limit of {MAX_PIXELS}" in r.json()["error"]


def test_serve_command_uses_the_documented_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    # docs/serving.md: --max-upload-mb 10, --max-pixels 40000000.
    documented = UploadLimits(max_bytes=10 * 1024 * 1024, max_pixels=40_000_000)
    assert UploadLimits() == documented and ServeSettings().limits == documented
    seen = {}
    monkeypatch.setattr(
        "skinlesion.serving.server.serve", lambda *a, **kw: seen.update(settings=a[3])
    )
    assert main(["serve"]) == 0
    assert seen["settings"].limits == documented


def test_no_request_can_name_a_server_path(client: TestClient, tiny_packaged: Path) -> None:
    target = str(tiny_packaged / "model.json")
    for form in ({"file": target}, {"path": target}, {"image": target}):
        r = client.post("/predict", data=form)
        assert r.status_code == 422
        assert "multipart field 'file'" in r.json()["error"]
    r = client.post("/predict", files={"file": ("model.json", target.encode(), "text/plain")})
    assert r.status_code == 415


def test_explain_adds_an_overlay_of_the_image_size(client: TestClient, images: list[Path]) -> None:
    answer = _post(client, images[0].read_bytes(), explain=True).json()
    ex = answer["explanation"]
    assert ex["class_explained"] == answer["prediction"]
    overlay = Image.open(io.BytesIO(base64.b64decode(ex["overlay_png_base64"])))
    assert overlay.format == "PNG" and overlay.size == Image.open(images[0]).size


def test_health_model_card_and_schema(client: TestClient) -> None:
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny"
    card = client.get("/model").json()
    assert "Not a medical device" in card["intended_use"] and card["known_limits"]
    assert card["reference"]["refer"]["confidence_threshold"] == 0.2
    schema = client.get("/openapi.json").json()
    assert {"/predict", "/health", "/model"} <= set(schema["paths"])
    assert "multipart/form-data" in schema["paths"]["/predict"]["post"]["requestBody"]["content"]


def test_concurrent_requests_share_batches(spread_model, spread_imgs: list[Path]) -> None:
    """Each request gets its own image's answer back from a shared batch: three images whose
    answers lie far apart, so an answer handed to the wrong request would show."""
    picked = spread_imgs[::4]
    settings = ServeSettings(max_batch=8, max_wait_ms=50)
    data = [p.read_bytes() for p in picked]
    direct, _ = spread_model.predict_proba(picked)
    assert min(np.abs(direct[i] - direct[j]).max() for i, j in ((0, 1), (0, 2), (1, 2))) > 0.05
    with TestClient(create_app(spread_model, settings)) as c:
        before = c.get("/health").json()["batches"]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: _post(c, data[i % 3]).json(), range(16)))
        health = c.get("/health").json()
    for i, a in enumerate(answers):
        got = np.array([a["probabilities"][k] for k in spread_model.class_names])
        np.testing.assert_allclose(got, direct[i % 3], atol=1e-5)
    assert health["images"] == 16 and health["batches"] - before < 16

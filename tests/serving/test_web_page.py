"""The web page at ``/``: served with a file input, and end to end in a real headless Chromium
(Debian's ``chromium`` driven by Playwright): upload an image, see the classes and the Grad-CAM
overlay. The browser test skips where Chromium or Playwright is absent; ``.ci/run`` installs
Chromium."""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import attach_tiny_familiarity, lesion_images, make_tiny_packaged, spread_images
from fastapi.testclient import TestClient
from PIL import Image

from skinlesion.core.runtime import resolve_runtime
from skinlesion.data.nondermoscopy import write_nondermoscopy
from skinlesion.inference.resolve import resolve_model
from skinlesion.serving.app import create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def app(tiny_packaged: Path):
    return create_app(resolve_model(tiny_packaged, resolve_runtime("cpu")))


def test_page_has_a_file_input_and_the_disclaimer(app) -> None:
    with TestClient(app) as c:
        r = c.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert '<input id="file" type="file"' in r.text
    assert "Not a diagnostic device" in r.text


def test_favicon_is_served(app) -> None:
    # Browsers ask for /favicon.ico whatever the page says; the page links the same icon.
    with TestClient(app) as c:
        page = c.get("/").text
        icon = c.get("/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")
    assert icon.text.lstrip().startswith("<svg") and '<link rel="icon"' in page


@contextlib.contextmanager
def _serving(app) -> Iterator[str]:
    """``app`` served by uvicorn on a free local port; yields its URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # up to a minute on a busy machine
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            pytest.fail("the server did not start")
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def server_url(app) -> Iterator[str]:
    with _serving(app) as url:
        yield url


@contextlib.contextmanager
def _browser_page() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            yield browser.new_page(viewport={"width": 1280, "height": 900})
        finally:
            browser.close()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_upload_in_a_real_browser(server_url: str, tmp_path: Path) -> None:
    image = lesion_images(tmp_path / "imgs", 1)[0]
    with _browser_page() as page:
        page.goto(server_url + "/")
        page.wait_for_selector("text=What it is for", timeout=60_000)
        # An image-only model shows no patient form.
        assert page.is_hidden("#patient")
        page.set_input_files("#file", str(image))
        page.wait_for_selector("#classes .row", timeout=120_000)
        page.wait_for_selector("#fig-overlay:not([hidden])", timeout=120_000)
        rows = page.locator("#classes .row")
        classes = [rows.nth(i).get_attribute("data-class") for i in range(rows.count())]
        overlay_width = page.eval_on_selector("#overlay", "img => img.naturalWidth")
        refer = page.inner_text("#refer")
        shot = tmp_path / "web_page.png"
        page.screenshot(path=str(shot), full_page=True)
    assert sorted(classes) == sorted(["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"])
    assert overlay_width == Image.open(image).size[0]
    assert refer in ("Refer to a clinician", "No refer flag")
    assert Image.open(shot).size[0] >= 1280


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_patient_details_in_a_real_browser(tmp_path: Path) -> None:
    folder = make_tiny_packaged(tmp_path / "zoo", "fused", metadata=True)
    fused = resolve_model(folder, resolve_runtime("cpu"))
    choices = fused.metadata_inputs["choices"]
    image = lesion_images(tmp_path / "imgs", 1)[0]
    with _serving(create_app(fused)) as url, _browser_page() as page:
        page.goto(url + "/")
        page.wait_for_selector("#patient:not([hidden])", timeout=60_000)
        sites = page.eval_on_selector_all("#meta-localization option", "os => os.map(o => o.value)")
        page.set_input_files("#file", str(image))
        page.wait_for_selector("#metadata-used", timeout=120_000)
        before = page.inner_text("#metadata-used")
        # Changing a detail predicts the same image again with it.
        page.fill("#meta-age", "70")
        page.select_option("#meta-sex", "female")
        page.select_option("#meta-localization", choices["localization"][0])
        page.wait_for_function(
            "() => document.querySelector('#metadata-used').textContent.includes('localization')",
            timeout=120_000,
        )
        after = page.inner_text("#metadata-used")
        shot = tmp_path / "web_page_patient.png"
        page.screenshot(path=str(shot), full_page=True)
    assert sites == ["", *choices["localization"]]
    assert before == "Patient details used: none (image only)"
    assert after == (
        f"Patient details used: age 70, sex female, localization {choices['localization'][0]}"
    )


@pytest.fixture(scope="module")
def familiar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny packaged model with a familiarity fitted on synthetic lesions: an image of noise
    is unlike them (referred, with an unfamiliarity over 1)."""
    lesions = spread_images(tmp_path_factory.mktemp("lesions"), n=36)
    folder = make_tiny_packaged(tmp_path_factory.mktemp("zoo"), "familiar")
    return attach_tiny_familiarity(folder, lesions[::2], lesions[1::4])


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_refer_leads_and_a_failed_upload_clears_the_result(familiar: Path, tmp_path: Path) -> None:
    model = resolve_model(familiar, resolve_runtime("cpu"), "torch")
    (noise,) = write_nondermoscopy(tmp_path / "other", photos=False, screenshots=0, noise=1, flat=0)
    text = tmp_path / "notes.jpg"
    text.write_text("name,dx\nISIC_1,mel\n")
    with _serving(create_app(model)) as url, _browser_page() as page:
        answer = httpx.post(f"{url}/predict", files={"file": noise.read_bytes()}, timeout=60).json()
        missing: list[str] = []
        page.on("response", lambda r: missing.append(r.url) if r.status == 404 else None)
        page.goto(url + "/")
        page.wait_for_selector("text=What it is for", timeout=60_000)
        page.set_input_files("#file", str(noise))
        page.wait_for_selector("#classes .row", timeout=120_000)
        result = page.inner_text("#result")
        unfamiliarity = page.inner_text("#unfamiliarity")
        body = page.inner_text("body")
        page.screenshot(path=str(tmp_path / "page_ok.png"), full_page=True)
        page.set_input_files("#file", str(text))
        page.wait_for_selector("#error:has-text('not an image')", timeout=120_000)
        after = {k: page.locator(k).count() for k in ("#classes", "#refer", "#unfamiliarity")}
        after_text = page.inner_text("#result")
        overlay_hidden = page.is_hidden("#fig-overlay")
        page.screenshot(path=str(tmp_path / "page_fail.png"), full_page=True)
    assert answer["refer"] and answer["unfamiliarity"] > 1
    # The decision leads, then its reasons, then the class, which is no answer to act on.
    assert result.startswith("Refer to a clinician")
    reasons = [result.index(r) for r in answer["refer_reasons"]]
    assert min(reasons) > 0 and max(reasons) < result.index(answer["prediction"] + " (")
    assert f"{answer['unfamiliarity']:.2f}" in unfamiliarity
    assert "familiar 0.0-test" not in result and "done" not in body.split()
    # A refused upload leaves no trace of the previous image's result.
    assert after == {"#classes": 0, "#refer": 0, "#unfamiliarity": 0} and overlay_hidden
    assert answer["prediction"] not in after_text
    assert missing == []

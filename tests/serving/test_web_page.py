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
from conftest import lesion_images, make_tiny_packaged
from fastapi.testclient import TestClient
from PIL import Image

from skinlesion.core.runtime import resolve_runtime
from skinlesion.inference.packaged import resolve_model
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

"""The web page of diffguide serve, driven in headless Chromium (Debian's chromium, Playwright):
submit a job, see progress events and the image, open its manifest, compare two runs.

Screenshots go to the test's folder; with DIFFGUIDE_UPDATE_SCREENSHOTS=1 they are copied to
docs/images/ (the ones docs/service.md shows were taken so)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from service_support import live_server

from diffguide.service.config import ServiceConfig
from diffguide.service.models import ModelCache, find_models

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update"]  # fmt: skip
DOCS_IMAGES = Path(__file__).resolve().parents[1] / "docs" / "images"

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the browser extra (playwright) is not installed"
)
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no Chromium at {CHROMIUM} (Debian's chromium package)", allow_module_level=True)


@pytest.fixture
def server(tmp_path) -> Iterator[str]:
    """A real uvicorn on loopback in this process (API key on)."""
    config = ServiceConfig(tmp_path / "data", threads=1, api_key="page-key", preview_every=1)
    with live_server(config, ModelCache(find_models((), True), 4096.0)) as url:
        yield url


def test_page_submits_shows_progress_image_manifest_and_compares(server, tmp_path):
    shots = tmp_path / "shots"
    shots.mkdir()
    sync_api.expect.set_options(timeout=30_000)  # a loaded shared machine: generous waits
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        assert page.goto(server + "/").status == 401  # no key, no page
        page.goto(server + "/?api_key=page-key")
        sync_api.expect(page.locator("#model")).to_have_value("tiny-sd", timeout=60_000)
        sync_api.expect(page.locator("#pag-layers option").first).to_have_text("preset (mid)", timeout=60_000)
        page.fill("#prompt", "a handwritten digit 7")
        page.fill("#steps", "12")
        page.fill("#seed", "3")
        page.locator("#pag").fill("2")
        page.evaluate(
            "steps = []; new MutationObserver(() => steps.push(document.getElementById('progress-text')"
            ".textContent)).observe(document.getElementById('progress-text'), {childList: true})"
        )
        page.click("#submit")
        sync_api.expect(page.locator("#progress-text")).to_have_text("succeeded", timeout=60_000)
        seen = page.evaluate("steps")
        assert "step 12 of 12" in seen and len([s for s in seen if s.startswith("step ")]) >= 2
        sync_api.expect(page.locator("#preview")).to_be_visible()
        sync_api.expect(page.locator("#gallery img")).to_have_count(1)
        sync_api.expect(page.locator("#manifest")).to_contain_text('"seed": 3')
        assert page.evaluate("document.querySelector('#gallery img').naturalWidth") == 32
        page.screenshot(path=str(shots / "service-page.png"), full_page=True)

        assert page.evaluate("document.getElementById('preview').naturalWidth") == 64  # latents, upscaled

        page.fill("#seed", "4")
        page.check("#vae-preview")  # previews decoded by the VAE: the image's own 32 pixels
        page.click("#submit")
        sync_api.expect(page.locator("#gallery img")).to_have_count(2, timeout=60_000)
        assert page.evaluate("document.getElementById('preview').naturalWidth") == 32
        page.locator("#gallery img").first.click()
        sync_api.expect(page.locator("#manifest")).to_contain_text('"seed": 3')
        sync_api.expect(page.locator("#manifest")).to_contain_text('"pag"')
        page.click("#compare")
        sync_api.expect(page.locator("#report")).to_contain_text("max_abs_err")
        sync_api.expect(page.locator("#report")).to_contain_text("identical")
        page.wait_for_function("document.getElementById('heatmap').naturalWidth > 0")
        assert page.evaluate("document.getElementById('heatmap').naturalWidth") == 256
        assert "false" in page.inner_text("#report")
        page.locator("#compare-panel").screenshot(path=str(shots / "service-compare.png"))
        browser.close()
    assert errors == []
    assert sorted(p.name for p in shots.iterdir()) == ["service-compare.png", "service-page.png"]
    if os.environ.get("DIFFGUIDE_UPDATE_SCREENSHOTS") == "1":
        for shot in shots.iterdir():
            shutil.copy(shot, DOCS_IMAGES / shot.name)

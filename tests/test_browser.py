"""The demo in headless Chromium (Playwright): upload, generate, explain, review, screenshots.

Needs Debian's chromium (`apt-get install -y chromium`); `.ci/run` installs it and sets
MRG_REQUIRE_BROWSER=1 so a missing browser fails there instead of skipping. Full-page
screenshots are written to test-artifacts/ (not committed).
"""

import os
import shutil
from pathlib import Path

import pytest
from conftest import DICOM, AppProcess

pytestmark = [pytest.mark.slow, pytest.mark.browser]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        message = "Chromium not installed (apt-get install -y chromium)"
        if os.environ.get("MRG_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        yield browser
        browser.close()


def test_upload_generate_explain_and_review(browser, tiny_checkpoints, tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    server = AppProcess(tiny_checkpoints / "ckpt", tmp_path / "data")
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(server.url)
        page.get_by_text("Research demo, not for diagnosis").wait_for(timeout=30_000)

        page.locator("#frontal-upload input[type=file]").set_input_files(DICOM)
        page.locator("#load-upload").click()
        page.get_by_text("Study loaded from upload").wait_for(timeout=60_000)
        page.get_by_text("MONOCHROME1 inverted").wait_for()

        page.locator("#generate").click()
        page.get_by_text("first token after").wait_for(timeout=120_000)
        findings = page.locator("#findings textarea").input_value()
        assert findings.strip()

        page.locator("#explain").click()
        page.locator("#overlay-frontal img").wait_for(timeout=120_000)

        page.locator("#verdict").get_by_text("minor error").click()
        page.locator("#reviewer textarea, #reviewer input").first.fill("Dr Browser")
        page.locator("#save-review").click()
        page.get_by_text("Saved: minor error").wait_for(timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "demo-full-page.png"), full_page=True)
    finally:
        server.stop()
    from mrg.review import ReviewStore

    reviews = ReviewStore(tmp_path / "data" / "reviews.sqlite").reviews()
    assert [(r.reviewer, r.verdict) for r in reviews] == [("Dr Browser", "minor error")]

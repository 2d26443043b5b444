"""The reading room in headless Chromium (Playwright) at 1440×900: the reading row, upload,
window/level, Grad-CAM, the findings panel, blinded A/B review, the keyboard-driven queue and
the summary.

Needs Debian's chromium (`apt-get install -y chromium`); `.ci/run` installs it and sets
MRG_REQUIRE_BROWSER=1 so a missing browser fails there instead of skipping. Screenshots are
written to test-artifacts/ (not committed).
"""

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import DICOM, AppProcess

from mrg.config import DEFAULT_CHECKPOINTS
from mrg.review import Review, ReviewStore
from mrg.text.anatomy import unaddressed
from mrg.text.states import lead_sentences
from mrg.text.taxonomy import finding_named
from mrg.ui import SHIPPED_EXAMPLES

pytestmark = [pytest.mark.slow, pytest.mark.browser]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
VIEWPORT = {"width": 1440, "height": 900}
QUEUE = ["00003350_000.png", "00015044_000.png", "00028558_000.png"]
# the README's gallery: a normal film, cardiomegaly and an effusion (NIH labels)
GALLERY = ["00004934_000.png", "00003350_000.png", "00015044_000.png"]
# The mean of every pixel of the frontal view's image, as the browser draws it.
SHOWN_MEAN = """() => {
  const img = document.querySelector('#frontal-view img');
  if (!img || !img.complete || img.naturalWidth === 0) return null;  // still loading
  const canvas = document.createElement('canvas');
  canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
  const context = canvas.getContext('2d');
  context.drawImage(img, 0, 0);
  const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
  let sum = 0;
  for (let i = 0; i < data.length; i += 4) sum += data[i];
  return sum / (data.length / 4);
}"""


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


@pytest.fixture(scope="module")
def server(tiny_checkpoints, tmp_path_factory):
    """The app over the tiny checkpoints and a findings head beside them (ImageNet weights, a
    random classifier), with a folder of three radiographs as its queue."""
    import torch

    from mrg.model.findings import FindingsHead

    torch.manual_seed(0)
    FindingsHead().save_pretrained(tiny_checkpoints / "ckpt" / "findings")
    root = tmp_path_factory.mktemp("reading-room")
    cases = root / "cases"
    cases.mkdir()
    for name in QUEUE:
        shutil.copy(SHIPPED_EXAMPLES / name, cases / name)
    app = AppProcess(
        tiny_checkpoints / "ckpt", root / "data", flags=["--dataset-images", str(cases)]
    )
    app.data = root / "data"
    yield app
    app.stop()


def open_page(browser, server, session: str):
    page = browser.new_page(viewport=VIEWPORT)
    page.goto(server.url)
    page.get_by_text("Research demo, not for diagnosis").wait_for(timeout=30_000)
    page.get_by_text("device: cpu").wait_for(timeout=60_000)  # the models are in
    field = page.get_by_label("Review session")
    field.fill(session)
    field.blur()
    return page


def generate(page):
    page.locator("#generate").click()
    page.get_by_text("first token after").wait_for(timeout=120_000)


def within_viewport(page, selector: str) -> bool:
    box = page.locator(selector).first.bounding_box()
    return box is not None and box["y"] >= 0 and box["y"] + box["height"] <= VIEWPORT["height"]


def test_upload_alone_loads_and_the_reading_row_fits_the_screen(browser, server):
    ARTIFACTS.mkdir(exist_ok=True)
    page = open_page(browser, server, "row")
    page.locator("#frontal-upload input[type=file]").set_input_files(DICOM)
    page.get_by_text("Study loaded from upload").wait_for(timeout=60_000)  # no extra click
    generate(page)
    assert page.locator("#findings textarea").input_value().strip()
    assert page.evaluate("window.scrollY") == 0
    page.locator("#findings-check", has_text="Report and findings").wait_for(timeout=60_000)
    for part in ("#frontal-view", "#findings", "#impression", "#compare-metrics", "#findings-head"):
        assert within_viewport(page, part), part
    page.screenshot(path=str(ARTIFACTS / "reading-row-1440x900.png"))

    before = page.evaluate(SHOWN_MEAN)
    page.locator("#show-cam input").check()
    page.get_by_text("Grad-CAM of the whole of Report A").wait_for(timeout=120_000)
    page.screenshot(path=str(ARTIFACTS / "grad-cam-1440x900.png"))
    page.locator("#verdict-a").get_by_text("minor error").click()
    page.locator("#reviewer textarea, #reviewer input").first.fill("Dr Browser")
    page.locator("#save-review").click()
    page.get_by_text("Saved: minor error").wait_for(timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "demo-full-page.png"), full_page=True)
    assert before > 0
    reviews = ReviewStore(server.data / "reviews.sqlite").reviews("row")
    assert [(r.reviewer, r.verdict) for r in reviews] == [("Dr Browser", "minor error")]


def test_the_findings_panel_reads_the_study_and_a_click_shows_that_findings_grad_cam(
    browser, server
):
    page = open_page(browser, server, "findings")
    page.locator("#frontal-upload input[type=file]").set_input_files(DICOM)
    page.get_by_text("Study loaded from upload").wait_for(timeout=60_000)
    rows = page.locator("#findings-head .confidence-set")
    rows.first.wait_for(timeout=60_000)  # read after the study is shown
    assert rows.count() == 14
    shown = [text.split(" · ")[1] for text in rows.all_inner_texts()]  # each row: name · state
    assert all(s.startswith(("present", "possible", "absent", "not stated")) for s in shown)
    page.evaluate("window.scrollTo(0, 0)")  # filling the review session scrolled down to it
    assert within_viewport(page, "#findings-head")
    page.get_by_text("Calibrated probabilities; the report states").wait_for()
    page.wait_for_function(f"({SHOWN_MEAN})() !== null", timeout=30_000)
    plain = page.evaluate(SHOWN_MEAN)
    chosen = rows.nth(1).inner_text().split(" · ")[0]
    rows.nth(1).click()
    page.get_by_text(f"Grad-CAM of the findings head's {chosen}").wait_for(timeout=120_000)
    page.wait_for_function(f"![null, {plain}].includes(({SHOWN_MEAN})())", timeout=30_000)
    assert page.locator("#show-cam input").is_checked()
    page.screenshot(path=str(ARTIFACTS / "findings-panel-1440x900.png"))


# Each window/level bound's text lies inside every box that clips it, up to the slider block.
BOUNDS_SHOWN = """() => ["#level", "#window"].flatMap(id => [".min_value", ".max_value"].map(cls => {
  const el = document.querySelector(id + " " + cls);
  const range = document.createRange();
  range.selectNodeContents(el);
  const text = range.getBoundingClientRect();
  let shown = text.width > 0;
  for (let box = el; box && shown; box = box.parentElement) {
    const style = getComputedStyle(box);
    if (style.overflow !== "visible" || style.overflowX !== "visible" || box.matches(id)) {
      const r = box.getBoundingClientRect();
      shown = text.left >= r.left - 1 && text.right <= r.right + 1;
    }
    if (box.matches(id)) break;
  }
  return {id, cls, text: el.textContent.trim(), shown};
}))"""


def test_window_level_changes_the_shown_pixels_of_a_16_bit_dicom(browser, server):
    page = open_page(browser, server, "window")
    page.locator("#frontal-upload input[type=file]").set_input_files(DICOM)
    page.get_by_text("Study loaded from upload").wait_for(timeout=60_000)
    level, window = (
        page.locator("#level input[type=number]"),
        page.locator("#window input[type=number]"),
    )
    assert (level.input_value(), window.input_value()) == ("15000", "30000")  # the file's own
    for bound in page.evaluate(BOUNDS_SHOWN):  # each slider's min and max read whole
        assert bound["shown"] and bound["text"].replace(".", "").isdigit(), bound
    stored = page.evaluate(SHOWN_MEAN)
    page.locator("#window-preset input").click()
    page.get_by_role("option", name="bone").click()
    page.wait_for_function(f"![null, {stored}].includes(({SHOWN_MEAN})())", timeout=30_000)
    bone = page.evaluate(SHOWN_MEAN)
    page.locator("#invert input").check()
    page.wait_for_function(f"![null, {bone}].includes(({SHOWN_MEAN})())", timeout=30_000)
    inverted = page.evaluate(SHOWN_MEAN)
    assert abs(stored - bone) > 5 and abs((255 - bone) - inverted) < 2
    page.screenshot(path=str(ARTIFACTS / "window-bone-inverted.png"))


def test_a_blinded_session_names_no_mode_and_the_export_does(browser, server):
    page = open_page(browser, server, "blind")
    page.locator("#blinded input").check()
    page.locator("#next-unreviewed").click()
    page.get_by_text("loaded.").wait_for(timeout=60_000)
    generate(page)
    page.locator("#stats", has_text="Report B:").wait_for(timeout=120_000)
    text = page.locator("body").inner_text()
    assert "Report A" in text and "Report B" in text
    hidden_too = page.evaluate("document.querySelector('.gradio-container').textContent")
    for name in ("prompt-wise", "promptbook-wise"):
        assert name not in text and name not in hidden_too, name
    page.screenshot(path=str(ARTIFACTS / "blinded-1440x900.png"), full_page=True)

    page.locator("#reviewer textarea, #reviewer input").first.fill("Dr Blind")
    page.locator("#verdict-a").get_by_text("acceptable").click()
    page.locator("#verdict-b").get_by_text("major error").click()
    page.locator("#preference").get_by_text("A", exact=True).click()
    page.locator("#save-review").click()
    page.get_by_text("preferred A").wait_for(timeout=30_000)
    assert "prompt-wise" not in page.locator("body").inner_text()

    page.get_by_text("Session summary and export").click()
    page.locator("#export-json").click()
    link = page.locator("#export-file a").first
    link.wait_for(timeout=30_000)
    exported = json.loads(page.request.get(link.get_attribute("href")).text())
    (preference,) = exported["preferences"]
    assert {preference["report_a"], preference["report_b"]} == {"prompt-wise", "promptbook-wise"}
    verdicts = {r["mode"]: r["verdict"] for r in exported["reviews"]}
    assert verdicts[preference["report_a"]] == "acceptable"
    assert verdicts[preference["report_b"]] == "major error"


def test_keyboard_review_of_three_cases_moves_the_progress_counter(browser, server):
    page = open_page(browser, server, "keys")
    page.locator("#reviewer textarea, #reviewer input").first.fill("Dr Keys")
    page.get_by_text("0 of 3 reviewed").wait_for()
    for done in (1, 2, 3):
        page.locator("#banner").click()  # focus leaves the text fields: keys are shortcuts
        page.keyboard.press("u")
        page.get_by_text(f"Case {QUEUE[done - 1][:-4]} loaded.").wait_for(timeout=60_000)
        page.keyboard.press("g")
        page.get_by_text("first token after").wait_for(timeout=120_000)
        assert page.locator("#verdict-a input:checked").count() == 0  # not the last case's
        page.keyboard.press("2")
        page.keyboard.press("s")
        page.get_by_text(f"{done} of 3 reviewed").wait_for(timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "keyboard-queue.png"), full_page=True)
    reviews = ReviewStore(server.data / "reviews.sqlite").reviews("keys")
    assert sorted(r.case_key.split(":")[-1] for r in reviews) == [q[:-4] for q in QUEUE]
    assert {r.verdict for r in reviews} == {"minor error"}


def test_the_summary_shows_kappa_for_two_reviewers(browser, server):
    # κ by hand: p_o = 3/5, p_e = 0.28, κ = 0.32 / 0.72 = 0.44
    x = ["acceptable", "acceptable", "minor error", "major error", "acceptable"]
    y = ["acceptable", "minor error", "minor error", "major error", "major error"]
    store = ReviewStore(server.data / "reviews.sqlite")
    for reviewer, verdicts in (("Dr X", x), ("Dr Y", y)):
        for i, verdict in enumerate(verdicts):
            store.save(Review("kappa", f"case{i}", "prompt-wise", reviewer, verdict))
    page = open_page(browser, server, "kappa")
    page.get_by_text("Session summary and export").click()
    page.locator("#summarize").click()
    row = page.locator("#summary tr", has_text="Dr X & Dr Y")
    row.wait_for(timeout=60_000)
    assert row.inner_text().split("\t")[1:] == ["5", "0.60", "0.44"]
    page.screenshot(path=str(ARTIFACTS / "summary.png"), full_page=True)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """The app over the shipped checkpoints, as `make demo` starts it."""
    app = AppProcess(DEFAULT_CHECKPOINTS, tmp_path_factory.mktemp("shipped") / "data")
    yield app
    app.stop()


@pytest.mark.parametrize("name", GALLERY)
def test_the_gallery_films_panel_states_are_the_ones_the_report_states(browser, shipped, name):
    """A normal film, cardiomegaly and an effusion on the shipped checkpoints: each finding the
    panel calls present or possible has its sentence after the heart's (first, where one speaks
    for the heart) and before the lungs', the rest are not named as found, and the consistency
    line says whether the labeler reads the same states back."""
    page = open_page(browser, shipped, f"gallery-{name}")
    page.locator("#frontal-upload input[type=file]").set_input_files(SHIPPED_EXAMPLES / name)
    page.get_by_text("Study loaded from upload").wait_for(timeout=60_000)
    rows = page.locator("#findings-head .confidence-set")
    rows.first.wait_for(timeout=60_000)
    states = {}
    for text in rows.all_inner_texts():
        label, state = (part.strip() for part in text.split("\n")[0].split(" · "))
        if state != "not stated":
            states[finding_named(label)] = state
    generate(page)
    page.locator("#findings-check", has_text="Report and states").wait_for(timeout=60_000)
    findings = page.locator("#findings textarea").input_value().strip()
    impression = page.locator("#impression textarea").input_value().strip()
    lead = lead_sentences(states)
    # the states' sentences follow the heart's (or open the findings, where they speak for
    # it), the next sentence opens on the lungs, and they make the impression
    before, _, after = findings.partition(lead)
    assert lead in findings and impression == (lead or impression), (states, findings, impression)
    if lead:
        assert "heart" not in unaddressed(before + lead) and after.startswith(" The lungs are")
    page.screenshot(path=str(ARTIFACTS / f"gallery-{name[:-4]}.png"))

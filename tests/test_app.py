"""The demo: handlers directly, then the real app in another process driven by gradio_client."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from conftest import DICOM, AppProcess, shared_path, tiny_model_config

from mrg.model import MRGModel
from mrg.review import ReviewStore
from mrg.service import ReportService, ServiceInfo
from mrg.ui import COMPARE_BOTH, WHOLE_REPORT, DemoApp, DemoState, banner, default_examples
from mrg.ui.comparison import COMPARED
from mrg.ui.explanation import EXPLAINED
from mrg.ui.findings import FINDING_SHOWN, NO_HEAD, READ, consistency
from mrg.ui.generation import GENERATED
from mrg.ui.review import REVIEW_COLUMNS, SAVED
from mrg.ui.viewer import FILE_WINDOW, LOADED

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def demo(tiny_llm, tokenizer, tmp_path):
    models = {}
    for seed, mode in enumerate(("prompt-wise", "promptbook-wise")):
        torch.manual_seed(seed)
        models[mode] = MRGModel(tiny_model_config(mode), tiny_llm, tokenizer).eval()
    service = ReportService(models, ServiceInfo("tiny", "cpu", list(models), {}, trained=False))
    return DemoApp(service, ReviewStore(tmp_path / "reviews.sqlite"), default_examples())


@pytest.fixture(scope="module")
def findings_head():
    """ImageNet weights, a random classifier; Cardiomegaly always present, every other
    finding never named, Effusion stated absent (real reports negate it)."""
    from mrg.model.findings import FindingsHead
    from mrg.text.taxonomy import FINDINGS14

    torch.manual_seed(0)
    head = FindingsHead().eval()
    head.threshold.fill_(1.01)
    head.threshold[FINDINGS14.index("Cardiomegaly")] = 0.0
    head.possible_threshold.copy_(head.threshold)
    head.present_threshold[FINDINGS14.index("Cardiomegaly")] = 0.0
    head.negated_share[FINDINGS14.index("Effusion")] = 0.7
    return head


@pytest.fixture
def head_demo(demo, findings_head):
    """The demo with a findings head loaded beside its (unconditioned) modes."""
    demo.service.findings_head = findings_head
    return demo


def conditioned_demo(demo, tiny_llm, tokenizer) -> DemoApp:
    """The demo whose prompt-wise model writes from the findings (their words in the prompt)."""
    config = tiny_model_config("prompt-wise")
    config.findings_prompt = "words"
    torch.manual_seed(0)
    demo.service.models["prompt-wise"] = MRGModel(config, tiny_llm, tokenizer).eval()
    return demo


def named(outputs, names) -> dict:
    return dict(zip(names, outputs, strict=True))


def load(handler, *args) -> dict:
    """A loading handler's outputs, by name."""
    return named(handler(*args), LOADED)


def run_generate(demo, state, mode="prompt-wise", tokens=8, blinded=False) -> list[dict]:
    """Every update of a greedy generation, by output name."""
    updates = demo.generate(state, mode, "greedy", tokens, 1.2, 0.7, 0.9, blinded, "s")
    return [named(u, GENERATED) for u in updates]


def pixels(path: str) -> np.ndarray:
    """What a viewer slider's PNG file holds."""
    from PIL import Image

    return np.asarray(Image.open(path))


def first_example(demo) -> DemoState:
    return load(demo.load_example, DemoState(), next(iter(demo.examples)))["state"]


def test_upload_dicom_shows_the_windowed_image_and_no_phi(demo):
    loaded = load(demo.load_upload, DemoState(), DICOM, None)
    state, (shown, same) = loaded["state"], loaded["frontal_view"]
    assert state.study is not None and state.case_key.startswith("sha256:")
    # the viewer's copy: the long side at 1024 px, the file's own window, no overlay yet: one
    # lossless PNG for both sides of the slider
    assert pixels(shown).dtype == np.uint8 and pixels(shown).shape == (1024, 964) and same == shown
    assert loaded["lateral_view"]["visible"] is False and loaded["preset"] == FILE_WINDOW
    assert loaded["center"]["value"] == 15000 and loaded["width"]["value"] == 30000
    assert "MONOCHROME1 inverted" in loaded["meta"] and "CR" in loaded["meta"]
    assert "CompressedSamples" not in loaded["meta"] + loaded["load_status"]  # patient name


def test_window_level_works_on_the_modality_values(demo):
    state = load(demo.load_upload, DemoState(), DICOM, None)["state"]
    stored = pixels(demo.render(state, FILE_WINDOW, 0, 1, False, False, 0)[0][0])
    # the file's window 15000/30000 set by hand gives the file's picture back
    by_hand = pixels(demo.set_window(state, 15000, 30000, False, False, 0)[1][0])
    assert np.abs(by_hand.astype(int) - stored.astype(int)).max() <= 1
    center, width, (bone, _), _ = demo.choose_preset(state, "bone", 0, 1, False, False, 0)
    bone = pixels(bone)
    assert width < 30000 and not np.array_equal(bone, stored)
    inverted = pixels(demo.render(state, "bone", center, width, True, False, 0)[0][0])
    assert np.array_equal(inverted, 255 - bone)


def test_bad_uploads_give_a_clear_message_and_keep_the_state(demo, tmp_path):
    state = load(demo.load_upload, DemoState(), DICOM, None)["state"]
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(Path(DICOM).read_bytes()[:3000])
    failed = load(demo.load_upload, state, str(bad), None)
    status = failed["load_status"]
    assert "Could not load" in status and ("damaged" in status or "could not be decoded" in status)
    assert failed["state"].study is state.study
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert "empty" in load(demo.load_upload, DemoState(), str(empty), None)["load_status"]
    assert "upload a frontal" in load(demo.load_upload, DemoState(), None, None)["load_status"]


def test_generate_streams_and_offers_sentences(demo):
    state = first_example(demo)
    updates = run_generate(demo, state)
    assert len(updates) >= 3
    assert "tokens" in updates[-1]["stats"] and "first token" in updates[-1]["stats"]
    assert updates[-1]["sentence"]["choices"][0] == WHOLE_REPORT
    assert state.generated["prompt-wise"] and state.shown == ["prompt-wise"]
    assert updates[-1]["header_a"] == "**prompt-wise**" and not updates[-1]["report_b"]["visible"]


def test_compare_both_fills_both_columns(demo):
    state = first_example(demo)
    final = run_generate(demo, state, COMPARE_BOTH)[-1]
    assert set(state.generated) == {"prompt-wise", "promptbook-wise"}
    assert "prompt-wise" in final["stats"] and "promptbook-wise" in final["stats"]
    assert final["report_b"]["visible"] and final["header_b"] == "**promptbook-wise**"


def test_a_blinded_session_names_no_mode_and_keeps_its_order(demo):
    state = first_example(demo)
    final = run_generate(demo, state, "prompt-wise", blinded=True)[-1]
    shown = [final[k] for k in ("header_a", "header_b", "stats")]
    assert final["header_a"] == "**Report A**" and final["header_b"] == "**Report B**"
    assert not any("prompt" in text for text in shown)
    order = [state.blinding.report_a, state.blinding.report_b]
    assert sorted(order) == ["prompt-wise", "promptbook-wise"] and state.shown == order
    again = first_example(demo)
    run_generate(demo, again, blinded=True)
    assert again.blinding == state.blinding  # stored: the same case, the same order


def test_generate_before_loading_is_a_message(demo):
    (update,) = run_generate(demo, DemoState())
    assert "Load a study first" in update["stats"]


def test_grad_cam_is_an_overlay_on_the_viewer_image(demo):
    state = first_example(demo)
    explain = (FILE_WINDOW, 0, 1, False)
    off = named(demo.explain(state, False, WHOLE_REPORT, *explain, 0.5), EXPLAINED)
    assert off["frontal_view"][1] == off["frontal_view"][0]  # no overlay: one file
    early = named(demo.explain(state, True, WHOLE_REPORT, *explain, 0.5), EXPLAINED)
    assert "Generate a report first" in early["explain_status"]
    run_generate(demo, state)
    shown = named(demo.explain(state, True, WHOLE_REPORT, *explain, 0.5), EXPLAINED)
    overlay, image = map(pixels, shown["frontal_view"])  # the overlay first: whole until slid
    assert overlay.shape == (1024, 964, 3) and image.shape == (1024, 964)  # colour over grey
    assert not np.array_equal(overlay[..., 0], image)
    assert shown["lateral_view"] is None and "Grad-CAM" in shown["explain_status"]
    faint = pixels(demo.render(state, *explain, True, 0.1)[0][0])
    assert not np.array_equal(faint, overlay)


# ----------------------------------------------------------------------------- findings panel


def loaded_with_findings(demo) -> tuple[DemoState, dict]:
    """A study loaded, then its findings read (what the page does after every load)."""
    state = load(demo.load_upload, DemoState(), DICOM, None)["state"]
    return state, named(demo.read_study(state), READ)


def test_the_findings_panel_shows_the_heads_reading_once_a_study_is_loaded(head_demo):
    state, read = loaded_with_findings(head_demo)
    panel = read["findings_head"]
    assert panel["visible"] is True and len(panel["value"]) == 14
    rows = list(panel["value"].items())
    assert [p for _, p in rows] == sorted((p for _, p in rows), reverse=True)  # most probable first
    assert all(0 < p < 1 for _, p in rows)
    # each row names its state beside its probability
    assert "Cardiomegaly · present" in panel["value"] and "Effusion · absent" in panel["value"]
    others = [
        label
        for label in panel["value"]
        if label.split(" · ")[0] not in ("Cardiomegaly", "Effusion")
    ]
    assert len(others) == 12 and all(label.endswith(" · not stated") for label in others)
    note = read["findings_note"]
    assert "present: Cardiomegaly; absent: Effusion" in note and "Grad-CAM" in note
    # the what-if starts from the head's reading, unticked
    assert read["manual_findings"] is False
    assert read["manual_choice"]["value"] == ["Cardiomegaly", "Effusion: absent"]
    assert state.reading.named == ["Cardiomegaly"] and state.reading_key == state.case_key
    # the same study again (e.g. a load that failed): nothing is read again
    again = named(head_demo.read_study(state), READ)
    assert all(again[name] == {"__type__": "update"} for name in READ if name != "state")


def test_the_findings_panel_says_when_no_head_is_loaded(demo):
    _, read = loaded_with_findings(demo)
    assert read["findings_head"]["visible"] is False and read["findings_note"] == NO_HEAD
    assert "No findings head is loaded" in NO_HEAD
    before = named(demo.read_study(DemoState()), READ)
    assert "Load a study" in before["findings_note"]


def test_clicking_a_finding_puts_its_grad_cam_on_the_viewer(head_demo):
    state, read = loaded_with_findings(head_demo)
    label = next(iter(read["findings_head"]["value"]))
    click = gr.SelectData(None, {"index": 0, "value": label, "selected": True})
    shown = named(
        head_demo.select_finding(state, FILE_WINDOW, 0, 1, False, 0.5, click), FINDING_SHOWN
    )
    overlay, image = map(pixels, shown["frontal_view"])  # the overlay first, as for the report
    assert overlay.shape == (1024, 964, 3) and image.shape == (1024, 964)
    assert not np.array_equal(overlay[..., 0], image)
    assert (
        shown["show_cam"] is True and "Grad-CAM of the findings head's" in shown["explain_status"]
    )
    name, said = label.split(" · ")
    assert f"{name} (p " in shown["explain_status"] and f", {said})" in shown["explain_status"]
    # another finding, another picture
    effusion = named(
        head_demo.show_finding(state, "Effusion · absent", FILE_WINDOW, 0, 1, False, 0.5),
        FINDING_SHOWN,
    )
    assert not np.array_equal(pixels(effusion["frontal_view"][0]), overlay)
    # the report's Grad-CAM still works after it
    run_generate(head_demo, state)
    explain = (FILE_WINDOW, 0, 1, False)
    report = named(head_demo.explain(state, True, WHOLE_REPORT, *explain, 0.5), EXPLAINED)
    assert "whole of Report A" in report["explain_status"]
    assert report["frontal_view"][0] != effusion["frontal_view"][0]


def test_clicking_a_finding_without_a_head_is_a_message(demo):
    state, _ = loaded_with_findings(demo)
    shown = named(
        demo.show_finding(state, "Effusion", FILE_WINDOW, 0, 1, False, 0.5), FINDING_SHOWN
    )
    assert (
        "Cannot explain" in shown["explain_status"]
        and "no findings head" in shown["explain_status"]
    )
    assert shown["show_cam"] == {"__type__": "update"} and state.heatmaps == []


def test_what_if_writes_the_report_from_the_findings_set_by_hand(
    head_demo, tiny_llm, tokenizer, monkeypatch
):
    app = conditioned_demo(head_demo, tiny_llm, tokenizer)
    state, _ = loaded_with_findings(app)
    asked = []
    stream = app.service.stream

    def spy(*args, findings=None, **kwargs):
        asked.append(findings)
        return stream(*args, findings=findings, **kwargs)

    monkeypatch.setattr(app.service, "stream", spy)
    updates = app.generate(
        state,
        "prompt-wise",
        "greedy",
        8,
        1.2,
        0.7,
        0.9,
        False,
        "s",
        True,
        ["Effusion", "Pleural thickening"],
    )
    final = named(list(updates)[-1], GENERATED)
    assert asked == [{"Effusion": "present", "Pleural_Thickening": "present"}]
    assert "written from findings set by hand: Effusion and Pleural thickening" in final["header_a"]
    condition = state.conditions["prompt-wise"]
    assert condition.manual and condition.named == ["Effusion", "Pleural_Thickening"]
    assert "first token" in final["stats"]
    # none ticked: a normal study
    final = run_generate_with(app, state, True, [])
    assert asked[-1] == {} and "set by hand: none (a normal study)" in final["header_a"]
    # not ticked: the head's reading of the study, already read when it was loaded
    final = run_generate_with(app, state, False, ["Effusion"])
    assert (
        asked[-1] is state.reading
        and "the findings head's reading: Cardiomegaly" in final["header_a"]
    )
    # the report's Grad-CAM scores it under the findings it was written from
    run_generate_with(app, state, True, ["Effusion"])
    explain = (FILE_WINDOW, 0, 1, False)
    shown = named(app.explain(state, True, WHOLE_REPORT, *explain, 0.5), EXPLAINED)
    assert "Grad-CAM of the whole of Report A" in shown["explain_status"]


def run_generate_with(demo, state, manual: bool, chosen: list[str], mode="prompt-wise") -> dict:
    updates = demo.generate(state, mode, "greedy", 8, 1.2, 0.7, 0.9, False, "s", manual, chosen)
    return named(list(updates)[-1], GENERATED)


def test_a_model_that_takes_no_findings_says_so_when_they_are_set_by_hand(head_demo):
    state, _ = loaded_with_findings(head_demo)
    final = run_generate_with(head_demo, state, True, ["Effusion"])
    assert (
        "Cannot generate prompt-wise" in final["stats"]
        and "cannot be given findings" in final["stats"]
    )
    assert "failed" not in final["stats"]
    final = run_generate_with(head_demo, state, True, ["Effusion"], COMPARE_BOTH)
    assert "cannot be given findings" in final["stats"]
    # blinded, the message names the slot, never the mode
    updates = head_demo.generate(
        state, "prompt-wise", "greedy", 8, 1.2, 0.7, 0.9, True, "s", True, ["Mass"]
    )
    final = named(list(updates)[-1], GENERATED)
    assert "cannot be given findings" in final["stats"] and "prompt" not in final["stats"]
    # not set by hand: the model writes from the image; the header claims no findings
    final = run_generate_with(head_demo, state, False, [])
    assert final["header_a"] == "**prompt-wise**" and "first token" in final["stats"]


def test_the_panel_says_whether_the_report_names_the_findings_it_was_written_from(head_demo):
    from mrg.model.gate import Screening
    from mrg.service import StudyFindings

    said = consistency(["Effusion"], ["Cardiomegaly"], manual=False)
    assert said == (
        "⚠️ **Report and findings disagree:** The report names Effusion, which the findings "
        "head does not find above its operating point; the head finds Cardiomegaly, which the "
        "report does not name."
    )
    assert "Report and findings agree" in consistency(["Cardiomegaly"], ["Cardiomegaly"], False)
    assert "neither names a finding" in consistency([], [], False)
    hand = consistency(["Mass", "Nodule"], ["Pleural_Thickening"], manual=True)
    assert "Mass and Nodule, which were not set by hand" in hand
    assert "Pleural thickening was set by hand, but the report does not name it" in hand

    state, _ = loaded_with_findings(head_demo)
    run_generate(head_demo, state)  # an untrained model: whatever it writes, the panel says
    assert "Report and findings" in head_demo.check_findings(state)
    reading = StudyFindings({}, {}, ["Cardiomegaly"])
    state.conditions["prompt-wise"] = reading
    state.generated["prompt-wise"] = "FINDINGS: Small left pleural effusion. IMPRESSION: Effusion."
    message = head_demo.check_findings(state)
    assert "The report names Effusion" in message and "the head finds Cardiomegaly" in message
    state.generated["prompt-wise"] = "FINDINGS: The heart is enlarged. IMPRESSION: Cardiomegaly."
    assert "Report and findings agree" in head_demo.check_findings(state)
    # written despite the gate: the panel showed no reading, and the line says why
    state.screening = Screening(message="This is a CT image, not a chest radiograph.")
    state.screening.allowed_anyway = True
    said = head_demo.check_findings(state)
    assert said.startswith("Written despite the gate") and "Report and findings agree" in said
    state.screening = None
    state.conditions["prompt-wise"] = None  # no head: nothing to check against
    assert head_demo.check_findings(state) == ""


def test_the_report_api_returns_the_heads_reading(head_demo):
    report = head_demo.report(DICOM, None, "prompt-wise")
    keys = {"findings", "impression", "text", "mode", "checkpoint", "tokens", "views"}
    assert keys < set(report) and report["mode"] == "prompt-wise"
    reading = report["findings_head"]
    assert reading["named"] == ["Cardiomegaly"] and reading["manual"] is False
    assert len(reading["probabilities"]) == 14 and "p_Effusion" in reading["probabilities"]
    assert reading["operating_points"]["Cardiomegaly"] == 0.0
    assert reading["states"] == {"Cardiomegaly": "present", "Effusion": "absent"}
    assert (
        reading["present_points"]["Cardiomegaly"] == 0.0
        and reading["present_points"]["Mass"] is None
        and reading["possible_points"]["Mass"] == pytest.approx(1.01)
    )
    head = head_demo.service.findings_head
    kept = head.possible_threshold.clone()
    head.possible_threshold.fill_(float("inf"))  # a head that names nothing possible
    try:
        never = head_demo.report(DICOM, None, "prompt-wise")["findings_head"]
    finally:
        head.possible_threshold.copy_(kept)
    assert never["possible_points"]["Mass"] is None  # JSON has no ∞
    assert json.loads(json.dumps(never, allow_nan=False))["states"] == reading["states"]
    head_demo.service.findings_head = None
    assert head_demo.report(DICOM, None, "prompt-wise")["findings_head"] is None


def test_compare_with_pasted_reference(demo):
    state = first_example(demo)
    run_generate(demo, state)
    reference = "No pneumothorax. Small left pleural effusion."
    compared = named(demo.compare(state, "Report A", reference), COMPARED)
    assert "BLEU-1" in compared["compare_metrics"]
    # the untrained model does not mention it: missed, and marked so in the reference text
    assert "Pleural Effusion" in compared["compare_table"] and "missed" in compared["compare_table"]
    assert "<mark class='agree-missed'" in compared["reference_view"]
    assert "Small left pleural effusion.</mark>" in compared["reference_view"]
    assert "No pneumothorax." in compared["reference_view"].split("<mark")[0]  # not marked
    assert "Paste or load" in demo.compare(state, "Report A", " ")[0]


def save(demo, state, verdict_a, reviewer, verdict_b=None, preference=None, session="s"):
    given = (verdict_a, ["missed finding"] if verdict_a == "minor error" else [], verdict_b, [])
    return named(demo.save_review(state, "", *given, preference, "n", reviewer, session), SAVED)


def test_review_save_validation_and_export(demo):
    state = first_example(demo)
    assert "Generate a report" in save(demo, state, "minor error", "Dr B")["review_status"]
    run_generate(demo, state)
    refused = save(demo, state, "minor error", "")["review_status"]
    assert "Not saved" in refused and "reviewer" in refused
    saved = save(demo, state, "minor error", "Dr B")
    row = named(saved["reviews"][0], REVIEW_COLUMNS)
    assert saved["review_status"].startswith("Saved")
    assert row["case"] == state.case_key and row["verdict"] == "minor error"
    assert row["report"] == "prompt-wise" and saved["progress"].startswith("**1 of")
    exported = Path(demo.export("s", "csv"))
    assert exported.is_file() and "Dr B" in exported.read_text()


def test_blinded_reviews_need_both_verdicts_and_a_preference_and_unblind_in_the_export(demo):
    import json

    state = first_example(demo)
    run_generate(demo, state, blinded=True)
    assert "Report B" in save(demo, state, "acceptable", "Dr A")["review_status"]
    refused = save(demo, state, "acceptable", "Dr A", "major error")["review_status"]
    assert "prefer" in refused
    saved = save(demo, state, "acceptable", "Dr A", "major error", "A")
    assert "preferred A" in saved["review_status"] and "prompt" not in saved["review_status"]
    assert {named(r, REVIEW_COLUMNS)["report"] for r in saved["reviews"]} == {
        "Report A",
        "Report B",
    }
    exported = json.loads(Path(demo.export("s", "json")).read_text())
    (preference,) = exported["preferences"]
    assert preference["preferred_mode"] == state.blinding.report_a
    verdicts = {r["mode"]: r["verdict"] for r in exported["reviews"]}
    assert verdicts == {
        state.blinding.report_a: "acceptable",
        state.blinding.report_b: "major error",
    }
    assert exported["summary"]["preference"]["ties"] == 0


def test_dataset_browser_marks_reviewed_cases(tiny_llm, tokenizer, tmp_path, demo):
    from mrg.data.datasets import load_annotation

    records = load_annotation(
        shared_path("iu_xray", "annotation_sample.json"), shared_path("iu_xray", "images")
    )
    app = DemoApp(demo.service, demo.store, [], records)
    loaded = load(app.load_case, DemoState(), records[0].study_id)
    assert loaded["reference"] == records[0].report and loaded["lateral_view"]["visible"]
    cleared = ("verdict_a", "categories_a", "verdict_b", "categories_b", "preference", "note")
    assert [loaded[name] for name in cleared] == [None, [], None, [], None, ""]  # a fresh review
    state = loaded["state"]
    assert state.position == 0 and app.progress("s2") == "**0 of 3 reviewed**"
    run_generate(app, state, tokens=4)
    save(app, state, "acceptable", "Dr C", session="s2")
    assert app.progress("s2") == "**1 of 3 reviewed**"
    *moved, _, choice = app.go(state, "s2", "unreviewed")
    assert choice == records[1].study_id and named(moved, LOADED)["state"].position == 1
    *_, choice = app.go(state, "s2", "previous")
    assert choice == records[0].study_id
    restarted = DemoApp(demo.service, ReviewStore(demo.store.path), [], records)  # same file
    assert restarted.progress("s2") == "**1 of 3 reviewed**"
    *_, choice = restarted.go(DemoState(), "s2", "unreviewed")  # resumes past the reviewed one
    assert choice == records[1].study_id


def test_a_folder_is_a_review_queue(demo):
    from mrg.data.datasets import folder_records
    from mrg.ui import SHIPPED_EXAMPLES

    records = folder_records(SHIPPED_EXAMPLES)
    assert len(records) == 8 and all(len(r.image_paths) == 1 for r in records)
    app = DemoApp(demo.service, demo.store, [], records)
    *loaded, progress, choice = app.go(DemoState(), "f", "next")
    assert choice == records[0].study_id and progress == "**0 of 8 reviewed**"
    assert named(loaded, LOADED)["state"].case_key == f"dataset:folder:{records[0].study_id}"


def test_a_case_whose_name_has_a_space_loads(demo, tmp_path):
    import shutil

    from mrg.data.datasets import folder_records
    from mrg.ui import SHIPPED_EXAMPLES

    shutil.copy(SHIPPED_EXAMPLES / "00003350_000.png", tmp_path / "chest film 1.png")
    app = DemoApp(demo.service, demo.store, [], folder_records(tmp_path))
    loaded = load(app.load_case, DemoState(), "chest film 1")
    assert loaded["load_status"] == "Case chest film 1 loaded."


def test_a_blank_session_name_is_the_default_session_for_blinding_and_saving(demo):
    state = first_example(demo)
    updates = demo.generate(state, "prompt-wise", "greedy", 8, 1.2, 0.7, 0.9, True, "  ")
    for _ in updates:
        pass
    given = ("", "acceptable", [], "acceptable", [], "equal", "", "Dr S", "  ")
    assert named(demo.save_review(state, *given), SAVED)["review_status"].startswith("Saved")
    assert [p["preferred"] for p in demo.store.preferences("default")] == ["equal"]


def test_banner_says_what_is_loaded_and_its_limits():
    info = ServiceInfo("tiny", "cpu", ["prompt-wise"], {}, trained=False, views=2)
    text = banner(info)
    assert "not for diagnosis" in text and "untrained" in text and "frontal view only" not in text
    info = ServiceInfo("tiny", "cpu", ["prompt-wise"], {"prompt-wise": "x"}, trained=True, views=1)
    assert "untrained" not in banner(info) and "frontal view only" in banner(info)


def test_blocks_build(demo):
    blocks = demo.build()
    assert blocks.title.startswith("mrg")


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def app_server(tiny_checkpoints):
    server = AppProcess(tiny_checkpoints / "ckpt", tiny_checkpoints / "data")
    yield server
    server.stop()


@pytest.mark.slow
def test_end_to_end_with_gradio_client(app_server, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(app_server.url, verbose=False)
    loaded_names = LOADED[1:]  # gradio_client never sees the session state
    loaded = named(client.predict(handle_file(DICOM), None, api_name="/load_upload"), loaded_names)
    assert "Could not load" not in loaded["load_status"] and "MONOCHROME1" in loaded["meta"]

    decoding = ("greedy", 16, 1.2, 0.7, 0.9, False, "e2e-session")
    job = client.submit("prompt-wise", *decoding, api_name="/generate")
    job.result(timeout=120)
    outputs = job.outputs()
    client_outputs = [n for n in GENERATED if n not in ("report_b", "state")]  # a column, state
    assert len(outputs) >= 3 and "first token" in named(outputs[-1], client_outputs)["stats"]

    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(500))
    failed = client.predict(handle_file(str(corrupt)), None, api_name="/load_upload")
    message = named(failed, loaded_names)["load_status"]
    assert "Could not load" in message and "damaged" in message
    again = client.predict(handle_file(DICOM), None, api_name="/load_upload")  # still serving
    assert "Could not load" not in named(again, loaded_names)["load_status"]
    client.submit("prompt-wise", *decoding, api_name="/generate").result(timeout=120)
    review = ("", "major error", ["false finding"], None, [], None, "e2e", "Dr E2E", "e2e-session")
    status = client.predict(*review, api_name="/save_review")[0]
    assert status.startswith("Saved")


@pytest.mark.slow
def test_requests_at_start_up_wait_for_the_models_and_never_race_their_imports(
    tiny_checkpoints, tmp_path
):
    """/report and the upload handler, called at once as soon as the page answers, from
    three fresh processes: every call succeeds (the loader alone imports torch & co.)."""
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client, handle_file

    for start in range(3):
        server = AppProcess(tiny_checkpoints / "ckpt", tmp_path / f"data{start}")
        try:
            client = Client(server.url, verbose=False)
            calls = {
                "report": (handle_file(DICOM), None, "prompt-wise", "/report"),
                "upload": (handle_file(DICOM), None, "/load_upload"),
            }
            with ThreadPoolExecutor(2) as pool:
                futures = {
                    name: pool.submit(client.predict, *args[:-1], api_name=args[-1])
                    for name, args in calls.items()
                }
                results = {name: f.result(timeout=180) for name, f in futures.items()}
            assert results["report"]["text"].startswith("FINDINGS:")
            status = named(results["upload"], LOADED[1:])["load_status"]
            assert "Could not load" not in status
        finally:
            server.stop()


@pytest.mark.slow
def test_stateless_report_api(app_server, tmp_path):
    """One call, no session: an image in, both sections out; bad input is a clear error."""
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(app_server.url, verbose=False)
    report = client.predict(handle_file(DICOM), None, "promptbook-wise", api_name="/report")
    assert report["mode"] == "promptbook-wise" and report["checkpoint"].endswith("promptbook-wise")
    assert report["findings"] and report["impression"] and report["views"] == ["frontal"]
    assert report["text"].startswith("FINDINGS:") and "\nIMPRESSION:" in report["text"]
    assert report["findings_head"] is None  # no findings head beside the tiny checkpoints
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(500))
    with pytest.raises(AppError, match="Could not load the study.*damaged"):
        client.predict(handle_file(str(corrupt)), None, "prompt-wise", api_name="/report")
    with pytest.raises(AppError, match="mode must be one of"):
        client.predict(handle_file(DICOM), None, "nonsense", api_name="/report")


@pytest.mark.slow
def test_review_survives_an_app_restart(tiny_checkpoints, tmp_path):
    from gradio_client import Client, handle_file

    data = tmp_path / "data"
    first = AppProcess(tiny_checkpoints / "ckpt", data)
    try:
        client = Client(first.url, verbose=False)
        client.predict(handle_file(DICOM), None, api_name="/load_upload")
        decoding = ("greedy", 16, 1.2, 0.7, 0.9, False, "restart")
        client.submit("promptbook-wise", *decoding, api_name="/generate").result(timeout=120)
        review = ("", "acceptable", [], None, [], None, "fine", "Dr R", "restart")
        client.predict(*review, api_name="/save_review")
    finally:
        first.stop()
    second = AppProcess(tiny_checkpoints / "ckpt", data)
    try:
        reviews = ReviewStore(data / "reviews.sqlite").reviews("restart")
        assert [(r.reviewer, r.verdict, r.mode) for r in reviews] == [
            ("Dr R", "acceptable", "promptbook-wise")
        ]
        assert reviews[0].case_key.startswith("sha256:")
    finally:
        second.stop()


def test_uploaded_files_are_deleted_from_gradios_folder_once_read(demo, tmp_path, monkeypatch):
    uploads = tmp_path / "gradio-uploads" / "abc123"
    uploads.mkdir(parents=True)
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio-uploads"))
    copy = uploads / "patient.dcm"
    copy.write_bytes(Path(DICOM).read_bytes())
    state = load(demo.load_upload, DemoState(), str(copy), None)["state"]
    assert state.study is not None and not copy.exists()
    demo.load_upload(DemoState(), DICOM, None)
    assert Path(DICOM).exists()  # files outside the upload folder are never touched


def test_identical_simultaneous_uploads_all_load(demo, tmp_path, monkeypatch):
    """Gradio gives identical uploads one path: the first reader's deletion must not break the others."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio-uploads"))
    shared = tmp_path / "gradio-uploads" / "same-sha" / "chest.dcm"
    shared.parent.mkdir(parents=True)
    shared.write_bytes(Path(DICOM).read_bytes())
    with ThreadPoolExecutor(6) as pool:
        loads = list(
            pool.map(lambda _: load(demo.load_upload, DemoState(), str(shared), None), range(6))
        )
    assert all(r["state"].study is not None for r in loads), [r["load_status"] for r in loads]
    assert len({r["state"].case_key for r in loads}) == 1
    assert not shared.exists()
    # a second upload event for the same file (e.g. a lateral added)
    again = load(demo.load_upload, DemoState(), str(shared), None)
    assert again["state"].study is not None, again["load_status"]


def test_unexpected_failures_are_messages_and_logs_without_their_text(demo, caplog, monkeypatch):
    state = load(demo.load_upload, DemoState(), DICOM, None)["state"]
    run_generate(demo, state)

    patient = "DOE^JANE"

    def leak(*args):  # an error whose message quotes a DICOM attribute
        raise RuntimeError(patient)

    monkeypatch.setattr(demo.service, "compare", leak)
    monkeypatch.setattr(demo, "_study_from", leak)
    with caplog.at_level("ERROR", logger="mrg.ui"):
        compared = named(demo.compare(state, "Report A", "FINDINGS: Normal."), COMPARED)
        kept = load(demo.load_upload, state, DICOM, None)
    message = compared["compare_metrics"]
    assert "Cannot compare" in message and "try again" in message
    assert compared["compare_table"] == ""
    assert "Could not load" in kept["load_status"] and kept["state"].study is state.study
    failures = [r.getMessage() for r in caplog.records]
    assert [m.split("\n")[0] for m in failures] == [
        "comparison failed with RuntimeError",
        "loading a study failed with RuntimeError",
    ]
    assert "DOE^JANE" not in caplog.text


# ----------------------------------------------------------------------------- start-up


def test_the_page_is_built_while_the_models_load(demo):
    """The page needs no model: it is built at once and handlers wait for the models."""
    import threading

    from mrg.loading import Loading
    from mrg.ui import LOADING_BANNER

    release = threading.Event()

    def slow_load():
        release.wait(10)
        return demo.service

    app = DemoApp(Loading(slow_load), demo.store, default_examples())
    assert app.loading.ready() is False
    blocks = app.build()  # nothing waited for the models
    heading = next(b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == "banner")
    assert heading.value == LOADING_BANNER
    assert all(u == {"__type__": "update"} for u in app.banner_now())  # unchanged while loading
    state = load(app.load_upload, DemoState(), DICOM, None)["state"]  # needs no model
    app.loading.start()
    release.set()
    final = run_generate(app, state)[-1]  # waited, then ran
    findings, stats = final["findings_a"], final["stats"]
    assert findings and "first token" in stats
    text, timer = app.banner_now()
    assert text == banner(demo.service.info) and timer.active is False


def test_a_failed_load_is_a_message_not_a_crash(demo):
    from mrg.loading import Loading

    def broken():
        raise OSError("disk full")

    app = DemoApp(Loading(broken), demo.store, default_examples())
    app.build()
    state = load(app.load_upload, DemoState(), DICOM, None)["state"]
    stats = run_generate(app, state)[-1]["stats"]
    assert "failed" in stats and "try again" in stats
    assert "could not be loaded (OSError)" in app.banner_now()[0]


def test_building_the_demo_imports_no_torch(tmp_path):
    """What `python app.py` does before it serves the page: Gradio only, no torch."""
    code = (
        "import sys; from mrg.demo import build_demo, parse_args; "
        f"demo, loading = build_demo(parse_args(['--data-dir', {str(tmp_path)!r}])); "
        "print('torch' in sys.modules, loading.ready())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["False", "False"]


def test_a_busy_service_answers_with_the_message(demo, monkeypatch):
    from mrg.batching import BUSY, ServiceBusy

    state = load(demo.load_upload, DemoState(), DICOM, None)["state"]

    def busy(*args, **kwargs):
        raise ServiceBusy()

    monkeypatch.setattr(demo.service, "stream", busy)
    monkeypatch.setattr(demo.service, "generate", busy)
    assert BUSY in run_generate(demo, state)[-1]["stats"]
    with pytest.raises(gr.Error, match="busy"):
        demo.report(DICOM, None, "prompt-wise")


def test_for_a_states_model_the_panel_compares_the_states_read_in_the_report(head_demo):
    from mrg.service import StudyFindings
    from mrg.ui.findings import chosen_states, state_choices, state_consistency

    given = {"Cardiomegaly": "present", "Effusion": "possible", "Pneumothorax": "absent"}
    assert chosen_states(["Cardiomegaly", "Effusion: possible", "Pneumothorax: absent"]) == given
    assert chosen_states(state_choices(given)) == given
    agree = state_consistency(dict(given), given, manual=True)
    assert agree.startswith("✓ **Report and states agree** (set by hand: present: Cardiomegaly;")
    said = state_consistency({"Cardiomegaly": "present", "Mass": "possible"}, given, False)
    assert said.startswith("⚠️ **Report and states disagree** (the findings head's):")
    assert "Effusion possible, the report: not stated" in said
    assert "Mass not stated, the report: possible" in said
    # through the panel, for a model conditioned on states
    head_demo.service.models["prompt-wise"].config.findings_prompt = "states"
    try:
        state, _ = loaded_with_findings(head_demo)
        state.shown = ["prompt-wise"]
        state.conditions["prompt-wise"] = StudyFindings({}, {}, [], states=given)
        state.generated["prompt-wise"] = (
            "FINDINGS: Cardiomegaly. Possible pleural effusion. No pneumothorax.\n"
            "IMPRESSION: Cardiomegaly."
        )
        assert "Report and states agree" in head_demo.check_findings(state)
        header = head_demo.written_from("prompt-wise", state.conditions["prompt-wise"])
        assert header == (
            " · written from the findings head's reading: present: Cardiomegaly; "
            "possible: Effusion; absent: Pneumothorax"
        )
    finally:
        head_demo.service.models["prompt-wise"].config.findings_prompt = "none"


def test_the_page_gets_the_first_words_at_once_the_last_update_and_one_update_per_interval(
    monkeypatch,
):
    from mrg.ui.generation import Throttle

    clock = iter([0.0, 0.01, 0.02, 0.05, 0.12, 0.13, 0.2, 0.3, 0.31])
    monkeypatch.setattr("mrg.ui.generation.time.monotonic", lambda: next(clock))
    throttle = Throttle(0.1)
    words = [False, True, True, True, True, True, True, True]
    finished = [False] * 7 + [True]
    shown = [throttle.due(w, f) for w, f in zip(words, finished)]
    # no words yet: wait; first words at once; then at 0.12 (0.1 after 0.01), 0.3; the end
    assert shown == [False, True, False, False, True, False, False, True]


def test_a_radiograph_is_written_once_losslessly(tmp_path):
    from mrg.ui.viewer import lossless_png

    image = (np.random.default_rng(0).random((120, 100)) * 255).astype(np.uint8)
    path = lossless_png(image, tmp_path)
    assert np.array_equal(pixels(path), image)
    assert lossless_png(image.copy(), tmp_path) == path  # the same content: the same file
    overlay = np.stack([image] * 3, axis=-1)
    assert lossless_png(overlay, tmp_path) != path and pixels(
        lossless_png(overlay, tmp_path)
    ).shape == (120, 100, 3)

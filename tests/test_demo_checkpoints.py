"""The embedded default: the trained checkpoints shipped in assets/ (issue: demo checkpoints).

These run the real SmolLM2 with the shipped weights, so they say what a user of
``python app.py`` on a fresh machine sees.
"""

import json
from pathlib import Path

import pytest
from conftest import DICOM, AppProcess, shared_path
from safetensors import safe_open

from mrg.config import DEFAULT_CHECKPOINTS, Decoding
from mrg.data.pairs import patient_split, read_nih_labels
from mrg.data.study import study_from_sources
from mrg.model.mrg_model import CONFIG_NAME, WEIGHTS_NAME
from mrg.service import ReportService
from mrg.text.states import states_from_statuses
from mrg.ui import banner

SHIPPED = ("prompt-wise", "promptbook-wise")


@pytest.fixture(scope="module")
def service():
    return ReportService.load()  # no argument: the default a fresh `python app.py` uses


@pytest.fixture(scope="module")
def test_images() -> list[Path]:
    """Four held-out NIH images (the demo's test split) with different findings, one normal."""
    by_labels = {}
    for row in read_nih_labels(shared_path("nih_cxr14", "labels.csv")):
        path = shared_path("nih_cxr14", "images", row["image"])
        if patient_split(row["patient"]) == "test" and path.is_file():
            by_labels.setdefault(row["labels"], path)
    normal = by_labels.pop(frozenset())
    return [normal, *list(by_labels.values())[:3]]


def test_shipped_checkpoints_are_small_fp16_and_complete():
    total = 0
    for mode in SHIPPED:
        folder = DEFAULT_CHECKPOINTS / mode
        config = json.loads((folder / CONFIG_NAME).read_text())
        assert config["customizer"]["mode"] == mode and config["llm"]["source"] == "smollm2"
        with safe_open(folder / WEIGHTS_NAME, "pt") as weights:
            keys = list(weights.keys())
            # trainable parts only: the LLM and the frozen CNN stem come from their packages
            assert keys and not any(
                k.startswith(("llm.", "encoder.vit.patch_embed.backbone.")) for k in keys
            )
            assert {str(weights.get_tensor(k).dtype) for k in keys} == {"torch.float16"}
        total += sum(f.stat().st_size for f in folder.iterdir())
    assert total < 50 * 2**20


def test_the_demo_checkpoints_preset_reproduces_the_shipped_configs():
    from mrg.train.config import train_preset

    for mode in SHIPPED:
        shipped = json.loads((DEFAULT_CHECKPOINTS / mode / CONFIG_NAME).read_text())
        assert train_preset("demo-checkpoints", mode=mode).model.to_dict() == shipped


def test_the_model_card_reports_every_mode_both_baselines_and_the_ceiling():
    card = (DEFAULT_CHECKPOINTS.parent / "MODEL_CARD.md").read_text()
    rows = (
        *SHIPPED,
        *(f"{mode}, v only (previous)" for mode in SHIPPED),
        *(f"{mode}, present findings y (previous)" for mode in SHIPPED),
        "findings head, listed (no LLM)",
        "composed, no training (probe → sentences → frozen LLM)",
        f"{SHIPPED[0]}, open vocabulary",
        "baseline: constant, top 1",
        "baseline: constant, top 3",
        "baseline: most common report",
        "baseline: random",
    )
    for row in rows:
        assert f"| {row}" in card, row
    assert "| static" not in card  # not shipped, so not measured on the card
    assert "linear probe on the frozen stem" in card
    assert "not for diagnosis" in card.lower() and "CC BY-NC-ND 4.0" in card
    assert "{" not in card  # every template field was filled


def test_the_model_card_tables_come_from_the_measured_run():
    from mrg.evaluation.demo_card import dependence_table, markdown
    from mrg.evaluation.text_quality import TextQuality, quality_table

    card = (DEFAULT_CHECKPOINTS.parent / "MODEL_CARD.md").read_text()
    measured = json.loads((DEFAULT_CHECKPOINTS.parent / "demo_metrics.json").read_text())
    assert markdown(measured["results"]) in card
    quality = {name: TextQuality(**q) for name, q in measured["text_quality"].items()}
    assert quality_table(quality) in card
    assert dependence_table(measured["image_dependence"], measured["results"]) in card
    language = measured["language"]
    assert (
        f"{language['language_before']:.2f} → {language['language_after']:.2f} nats/token" in card
    )
    assert language["language_after"] < language["language_before"]
    from mrg.evaluation.demo_card import fidelity_table, head_table

    assert fidelity_table(measured["fidelity"]) in card
    head = json.loads((DEFAULT_CHECKPOINTS.parent / "findings_metrics.json").read_text())
    assert head_table(head) in card
    from mrg.evaluation.findings_card import cv_table

    record = json.loads((DEFAULT_CHECKPOINTS.parent / "findings_cv.json").read_text())
    assert cv_table(record) in card and head["row"] in record["rows"]
    from mrg.evaluation.states_card import (
        calibration_table,
        content_table,
        form_table,
        language_table,
    )

    states = measured["states"]
    assert calibration_table(head["calibration"]) in card and "reliability_diagram.png" in card
    assert (DEFAULT_CHECKPOINTS.parent / "reliability_diagram.png").is_file()
    assert content_table(states["content"]) in card and form_table(states["form"]) in card
    assert language_table(states["language"]) in card


def test_the_metrics_name_the_checkpoints_they_scored():
    import hashlib

    measured = json.loads((DEFAULT_CHECKPOINTS.parent / "demo_metrics.json").read_text())
    for mode in SHIPPED:
        weights = (DEFAULT_CHECKPOINTS / mode / WEIGHTS_NAME).read_bytes()
        assert measured["checkpoints"][mode] == hashlib.sha256(weights).hexdigest(), mode
    head = (DEFAULT_CHECKPOINTS / "findings" / "findings.safetensors").read_bytes()
    assert measured["findings_head"] == hashlib.sha256(head).hexdigest()


def test_the_findings_head_beats_the_frozen_stem_probe_on_its_split():
    metrics = json.loads((DEFAULT_CHECKPOINTS.parent / "findings_metrics.json").read_text())
    test = metrics["test"]
    assert test["head_mean_auroc"] > test["probe_mean_auroc"]
    # the split is the demo pairs' patient split: no test image was trained on
    labels = {
        r["image"]: r["patient"] for r in read_nih_labels(shared_path("nih_cxr14", "labels.csv"))
    }
    assert all(patient_split(labels[i]) == "test" for i in metrics["splits"]["test"])
    assert not set(metrics["splits"]["train"]) & set(metrics["splits"]["test"])


@pytest.mark.slow
def test_setting_the_findings_by_hand_changes_the_reports_labels(service, test_images):
    """The what-if on the shipped checkpoints: told "effusion", a normal image's report
    names an effusion; told nothing, it names none."""
    normal = study_from_sources(test_images[0])
    for mode in SHIPPED:
        told = service.generate(normal, mode, findings=["Effusion"])
        nothing = service.generate(normal, mode, findings=[])
        hedged = service.generate(normal, mode, findings={"Effusion": "possible"})
        assert service.labeler.label14(told.text)["Effusion"], (mode, told.text)
        assert service.labeler.label14(nothing.text)["normal"], (mode, nothing.text)
        assert told.condition.manual and told.condition.named == ["Effusion"]
        read = states_from_statuses(service.labeler.statuses14(hedged.text))
        assert read["Effusion"] == "possible", (mode, hedged.text)


@pytest.mark.slow
def test_generate_writes_a_probability_column_per_finding(tmp_path, test_images):
    import csv

    from mrg.cli import main
    from mrg.text.taxonomy import FINDINGS14

    folder = tmp_path / "images"
    folder.mkdir()
    for path in test_images[:2]:
        (folder / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "reports.csv"
    assert main(["generate", str(folder), "--out", str(out), "--max-new-tokens", "40"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 2
    for row in rows:
        probabilities = [float(row[f"p_{f}"]) for f in FINDINGS14]
        assert all(0.0 <= p <= 1.0 for p in probabilities) and len(set(probabilities)) > 1
        assert row["condition"]
        states = {row[f"state_{f}"] for f in FINDINGS14}
        assert states <= {"", "present", "possible", "absent"} and states - {""}


def test_the_default_service_loads_the_trained_modes(service):
    assert service.info.trained and set(SHIPPED) <= set(service.info.modes)
    assert service.info.views == 1  # trained on single frontal NIH images
    assert "frontal view only" in banner(service.info) and "untrained" not in banner(service.info)
    assert all(
        Path(p).is_relative_to(DEFAULT_CHECKPOINTS) for p in service.info.checkpoints.values()
    )


@pytest.mark.slow
def test_reports_respond_to_the_image(service, test_images):
    decoding = Decoding(max_new_tokens=60)
    for mode in SHIPPED:
        reports = {
            service.generate(study_from_sources(path), mode, decoding).text for path in test_images
        }
        assert len(reports) >= 2, f"{mode} writes the same report for every image"


@pytest.mark.slow
def test_shipped_reports_are_well_formed_loop_free_and_without_demographics(service, test_images):
    from mrg.config import DEFAULT_DECODING
    from mrg.evaluation.text_quality import DEMOGRAPHICS, has_loop, well_formed

    for mode in SHIPPED:
        for path in test_images:
            text = service.generate(study_from_sources(path), mode, DEFAULT_DECODING).text
            assert well_formed(text), (mode, path.name, text)
            assert not has_loop(text) and not DEMOGRAPHICS.search(text), (mode, text)


@pytest.mark.slow
def test_app_streams_findings_and_impression_with_the_shipped_checkpoints(tmp_path):
    """The end-to-end path of a fresh install: DICOM upload, both modes side by side."""
    from gradio_client import Client, handle_file

    server = AppProcess(DEFAULT_CHECKPOINTS, tmp_path / "data")
    try:
        client = Client(server.url, verbose=False)
        loaded = client.predict(handle_file(DICOM), None, api_name="/load_upload")
        assert "Could not load" not in loaded[-1]
        job = client.submit("compare both", "greedy", 100, 1.2, 0.7, 0.9, api_name="/generate")
        job.result(timeout=300)
        outputs = job.outputs()
        findings_a, impression_a, findings_b, impression_b = outputs[-1][:4]
        assert len(outputs) >= 3
        assert findings_a.strip() and impression_a.strip(), "prompt-wise lacks a section"
        assert findings_b.strip() and impression_b.strip(), "promptbook-wise lacks a section"
    finally:
        server.stop()


@pytest.mark.slow
def test_generate_findings_flag_and_json_on_the_shipped_checkpoints(test_images, capsys):
    from mrg.cli import main
    from mrg.text.labeler import ReportLabeler

    argv = ["generate", str(test_images[0]), "--json", "--findings", "Effusion"]
    assert main([*argv, "--max-new-tokens", "60"]) == 0
    payload = json.loads(capsys.readouterr().out)
    head = payload["findings_head"]
    assert head["named"] == ["Effusion"] and head["manual"]
    assert head["states"] == {"Effusion": "present"}
    assert len(head["probabilities"]) == 14 and "p_Pleural_Thickening" in head["probabilities"]
    assert ReportLabeler().label14(payload["text"])["Effusion"]
    states = "Cardiomegaly,Effusion=possible,Pneumothorax=absent"
    argv = ["generate", str(test_images[0]), "--json", "--findings", states]
    assert main([*argv, "--max-new-tokens", "80"]) == 0
    payload = json.loads(capsys.readouterr().out)
    given = {"Cardiomegaly": "present", "Effusion": "possible", "Pneumothorax": "absent"}
    assert payload["findings_head"]["states"] == given
    findings, impression = payload["text"].split("\nIMPRESSION: ")
    lead = "Cardiomegaly. Possible pleural effusion."  # speaks for the heart: opens them
    assert findings.startswith(f"FINDINGS: {lead} The lungs are") and impression == lead

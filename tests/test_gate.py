"""The chest-radiograph gate (issue: refuse what is not a chest radiograph), on real files:
pydicom-data's CT, MR, US and colour images, scikit-image's photographs, the shared NIH and
OpenI radiographs, the shipped examples, and a MONOCHROME1 radiograph read the wrong way."""

import io
import json
import sqlite3
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from conftest import DICOM, shared_path
from PIL import Image
from pydicom.data import get_testdata_file

from mrg.config import DEFAULT_CHECKPOINTS
from mrg.data.pairs import patient_split, read_nih_labels
from mrg.data.study import Study, View, batch_tensors, study_from_sources
from mrg.hub import CHECKPOINT_FILES
from mrg.imaging import load_image
from mrg.model import findings as findings_module
from mrg.model import gate as gate_module
from mrg.model.findings import FINDINGS_FOLDER, FindingsHead
from mrg.model.gate import GATE_FOLDER, ChestGate, rule_refusal, screen, screen_study
from mrg.review import Review, ReviewStore
from mrg.ui.generation import GENERATED
from mrg.ui.viewer import LOADED

NON_RADIOGRAPHS = {  # pydicom-data file → the reason it is refused
    "CT_small.dcm": "modality",
    "MR_small.dcm": "modality",
    "US1_UNCR.dcm": "modality",
    "JPEG2000.dcm": "modality",  # NM
    "SC_rgb.dcm": "colour",  # a secondary capture in colour
}


@pytest.fixture(scope="module")
def head() -> FindingsHead:
    return FindingsHead.from_pretrained(Path(DEFAULT_CHECKPOINTS) / FINDINGS_FOLDER)


@pytest.fixture(scope="module")
def gate() -> ChestGate:
    return ChestGate.from_pretrained(Path(DEFAULT_CHECKPOINTS) / GATE_FOLDER)


def verdict(source, head, gate, allow_anyway=False, lateral=None):
    """The shipped gate's verdict on one file (and a lateral), as the service screens it."""
    return screen_study(study_from_sources(source, lateral), head, gate, allow_anyway)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def held_out_radiographs() -> list[Path]:
    """The NIH test split: patients the gate never saw."""
    nih = shared_path("nih_cxr14")
    return [
        nih / "images" / row["image"]
        for row in read_nih_labels(nih / "labels.csv")
        if patient_split(row["patient"]) == "test" and (nih / "images" / row["image"]).is_file()
    ]


def openi_studies() -> list[tuple[Path, Path]]:
    """The shared OpenI studies as a user would upload them: 0.png, then 1.png."""
    folders = sorted(shared_path("iu_xray", "images").iterdir())
    return [(folder / "0.png", folder / "1.png") for folder in folders]


@pytest.mark.parametrize("name,reason", NON_RADIOGRAPHS.items())
def test_pydicom_non_radiographs_are_refused_with_a_clinician_s_message(name, reason, head, gate):
    screening = verdict(get_testdata_file(name), head, gate)
    assert screening.refused == reason
    assert "not a chest radiograph" in screening.message or "colour" in screening.message


def test_the_modality_rule_names_the_modality_and_lets_projection_x_rays_through():
    ct = load_image(get_testdata_file("CT_small.dcm"))
    assert rule_refusal(ct.meta) == (
        "modality",
        "This is a CT image, not a chest radiograph; the model was trained on chest X-rays only.",
    )
    assert rule_refusal(load_image(DICOM).meta) is None  # a chest CR
    assert rule_refusal(load_image(get_testdata_file("MR_small.dcm")).meta)[0] == "modality"


def test_a_chest_cr_and_the_shipped_examples_pass(head, gate):
    examples = sorted(Path("assets/examples").glob("*.png"))
    assert len(examples) == 8
    for source in [DICOM, *examples]:
        screening = verdict(source, head, gate)
        assert screening.refused is None, (source, screening.views)


def test_held_out_radiographs_are_falsely_refused_at_most_one_percent(head, gate):
    sources = held_out_radiographs()
    refused = [s.name for s in sources if verdict(s, head, gate).refused]
    refused += [
        f.parent.name for f, lat in openi_studies() if verdict(f, head, gate, lateral=lat).refused
    ]
    assert len(sources) >= 100
    assert len(refused) <= 0.01 * (len(sources) + 3), refused


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea", "camera"])
def test_scikit_image_photographs_are_refused(name, head, gate):
    import skimage.data

    screening = verdict(png_bytes(getattr(skimage.data, name)()), head, gate)
    assert screening.refused in ("colour", "not_a_chest_radiograph", "orientation")


def test_a_blank_image_is_refused_as_blank(head, gate):
    for value in (0, 255):
        screening = verdict(png_bytes(np.full((256, 256), value, np.uint8)), head, gate)
        assert screening.refused == "blank"


def test_a_radiograph_upside_down_is_refused_for_its_orientation(head, gate):
    upright = load_image(min(Path("assets/examples").glob("*.png"))).to_uint8()
    screening = verdict(png_bytes(np.rot90(upright, 2).copy()), head, gate)
    assert screening.refused == "orientation" and "rotated 180°" in screening.message


def test_a_monochrome1_radiograph_read_as_monochrome2_is_caught(head, gate, tmp_path):
    """RG1_UNCI is MONOCHROME1 (bone at low values): read with the wrong photometric
    interpretation it comes out black-for-white, and the gate says so."""
    ds = pydicom.dcmread(DICOM)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    ds.PhotometricInterpretation = "MONOCHROME2"
    wrong = tmp_path / "read_wrongly.dcm"
    ds.save_as(wrong)
    assert verdict(DICOM, head, gate).refused is None
    screening = verdict(wrong, head, gate)
    assert screening.refused == "orientation" and "inverted" in screening.message


def test_the_override_passes_the_study_and_keeps_the_warning(head, gate):
    screening = verdict(get_testdata_file("CT_small.dcm"), head, gate, allow_anyway=True)
    assert screening.refused is None and screening.allowed_anyway
    assert screening.warning.startswith("Written despite the gate: This is a CT image")
    as_json = json.loads(json.dumps(screening.as_dict()))
    assert as_json["views"][0]["distance"] > gate.config.max_distance


def test_the_gate_s_distance_is_the_ledoit_wolf_mahalanobis_distance(head):
    """fit_gate's whitening reproduces sklearn's distance (its square is what sklearn gives)."""
    from sklearn.covariance import LedoitWolf

    from mrg.train.gate import fit_gate, head_features, radiograph_tensors

    images = radiograph_tensors(held_out_radiographs()[:40], head.config.image_size)
    fitted = fit_gate(head, images[:30], images[30:], epochs=1)
    features = head_features(head, images)
    expected = (
        LedoitWolf().fit(features[:30].double().numpy()).mahalanobis(features.double().numpy())
    )
    got = fitted.scores(images, features)["distance"].double().numpy() ** 2
    np.testing.assert_allclose(got, expected, rtol=1e-3)
    assert fitted.config.max_distance == pytest.approx(
        float(fitted.scores(images[30:], features[30:])["distance"].quantile(0.995)), abs=0.01
    )


def test_a_new_head_refits_the_feature_statistics_and_keeps_the_orientation_net(head):
    """build_gate.py --features-only: μ, Σ and the distance threshold follow the new head's
    features; the orientation net (it reads thumbnails) and its threshold stay."""
    from mrg.train.gate import fit_features, fit_gate, head_features, radiograph_tensors

    images = radiograph_tensors(held_out_radiographs()[:40], head.config.image_size)
    kept = fit_gate(head, images[:30], images[30:], epochs=1)
    upright = kept.config.min_upright
    other = FindingsHead(load_weights=False).eval()  # another backbone's features
    refitted = fit_features(kept, other, images[:30], images[30:])
    features = head_features(other, images[:30])
    assert torch.allclose(refitted.mean, features.mean(0), atol=1e-4)
    assert not torch.allclose(refitted.mean, kept.mean)
    for name, tensor in kept.orientation.state_dict().items():
        assert torch.equal(refitted.orientation.state_dict()[name], tensor)
    assert refitted.config.min_upright == upright


def test_without_a_fitted_gate_only_the_rules_and_the_contrast_apply():
    ct = load_image(get_testdata_file("CT_small.dcm"))
    blank = load_image(png_bytes(np.zeros((64, 64), np.uint8)))
    chest = load_image(DICOM)
    for image, expected in ((ct, "modality"), (blank, "blank"), (chest, None)):
        images = batch_tensors([Study([View(image, "frontal")])], 64, 1).images[0]
        assert screen([image.meta], images, None, None).refused == expected


def test_the_hub_downloads_the_gate_and_the_findings_head():
    names = {
        findings_module.FINDINGS_CONFIG_NAME,
        findings_module.FINDINGS_WEIGHTS_NAME,
        gate_module.GATE_CONFIG_NAME,
        gate_module.GATE_WEIGHTS_NAME,
    }
    assert {f"*/{name}" for name in names} <= set(CHECKPOINT_FILES)


def test_reviews_record_the_gate_and_an_older_store_gains_the_column(tmp_path):
    path = tmp_path / "reviews.sqlite"
    with sqlite3.connect(path) as db:  # the table as stores written before the gate have it
        db.execute(
            "CREATE TABLE reviews (id INTEGER PRIMARY KEY AUTOINCREMENT, session TEXT NOT NULL, "
            "case_key TEXT NOT NULL, mode TEXT NOT NULL, reviewer TEXT NOT NULL, verdict TEXT "
            "NOT NULL, categories TEXT NOT NULL, note TEXT NOT NULL, generated TEXT NOT NULL, "
            "reference TEXT NOT NULL, checkpoint TEXT NOT NULL, created_at TEXT NOT NULL, "
            "UNIQUE (session, case_key, mode, reviewer))"
        )
    store = ReviewStore(path)
    gate = {"refused": None, "allowed_anyway": True, "message": "This is a CT image", "views": []}
    review = Review("s", "sha256:ab", "prompt-wise", "dr a", "major error", gate=gate)
    store.save(review)
    assert store.reviews()[0].gate == gate
    exported = json.loads(store.export_json(tmp_path / "r.json").read_text())
    assert exported[0]["gate"]["allowed_anyway"] is True
    assert "allowed_anyway" in (store.export_csv(tmp_path / "r.csv")).read_text()


# --------------------------------------------------------------------------- the real default
# The shipped checkpoints with the real SmolLM2: what a user of the API, the CLI and the page meets.


@pytest.fixture(scope="module")
def service():
    from mrg.service import ReportService

    return ReportService.load()  # the default a fresh `python app.py` uses


@pytest.mark.slow
def test_the_service_refuses_non_radiographs_and_the_override_writes_with_the_warning(service):
    from mrg.config import Decoding
    from mrg.service import StudyRefused

    ct = study_from_sources(get_testdata_file("CT_small.dcm"))
    with pytest.raises(StudyRefused, match="This is a CT image, not a chest radiograph"):
        service.generate(ct, "prompt-wise")
    update = service.generate(ct, "prompt-wise", Decoding(max_new_tokens=40), allow_anyway=True)
    assert "FINDINGS:" in update.text and "IMPRESSION:" in update.text
    assert update.screening.warning.startswith("Written despite the gate: This is a CT image")
    assert service.info.gate["max_distance"] == service.gate.config.max_distance


@pytest.mark.slow
def test_reports_of_images_that_pass_are_the_same_with_or_without_the_gate(service):
    from mrg.config import Decoding

    study = study_from_sources(sorted(Path("assets/examples").glob("*.png"))[1])
    decoding = Decoding(max_new_tokens=60)
    gated = service.generate(study, "promptbook-wise", decoding)
    kept, service.gate = service.gate, None
    try:
        ungated = service.generate(study, "promptbook-wise", decoding)
    finally:
        service.gate = kept
    assert gated.screening.refused is None and not gated.screening.warning
    assert gated.text == ungated.text


@pytest.mark.slow
def test_the_cli_refuses_with_a_reason_and_the_flag_writes_anyway(capsys):
    from mrg.cli import main

    argv = ["generate", get_testdata_file("MR_small.dcm"), "--json", "--max-new-tokens", "40"]
    assert main(argv) == 2
    payload = json.loads(capsys.readouterr().out)
    assert payload["refused"] == "modality" and "MR image" in payload["message"]
    assert payload["text"] == "" and payload["gate"]["views"][0]["distance"] > 0
    assert main([*argv, "--allow-any-modality"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["refused"] is None and "MR image" in payload["warning"]
    assert "FINDINGS:" in payload["text"]
    assert main([*argv[:-3], "--max-new-tokens", "40"]) == 2  # without --json: a message
    assert "no report" in capsys.readouterr().out


@pytest.mark.slow
def test_the_api_and_the_page_refuse_every_pydicom_non_radiograph(tmp_path):
    from conftest import AppProcess
    from gradio_client import Client, handle_file

    server = AppProcess(DEFAULT_CHECKPOINTS, tmp_path / "data")
    try:
        client = Client(server.url, verbose=False)
        for name, reason in NON_RADIOGRAPHS.items():
            answer = client.predict(
                handle_file(get_testdata_file(name)), None, "prompt-wise", api_name="/report"
            )
            assert answer["refused"] == reason and answer["text"] == "", name
        allowed = client.predict(
            handle_file(get_testdata_file("US1_UNCR.dcm")),
            None,
            "prompt-wise",
            True,
            api_name="/report",
        )
        assert allowed["refused"] is None and "US image" in allowed["warning"]
        assert allowed["findings"].strip() and allowed["gate"]["allowed_anyway"]
        passed = client.predict(handle_file(DICOM), None, "prompt-wise", api_name="/report")
        assert passed["refused"] is None and passed["warning"] == "" and passed["findings"].strip()
        # the page: the upload loads (the image is shown), Generate says why there is no report
        loaded = client.predict(
            handle_file(get_testdata_file("CT_small.dcm")), None, api_name="/load_upload"
        )
        assert "This is a CT image" in dict(zip(LOADED[1:], loaded))["load_status"]
        job = client.submit("prompt-wise", "greedy", 40, 1.05, 0.7, 0.9, api_name="/generate")
        shown = [n for n in GENERATED if n not in ("report_b", "state")]
        status = dict(zip(shown, job.result(timeout=120)))["stats"]
        assert "No report" in status and "Allow any image" in status
    finally:
        server.stop()

"""The examples that ship in ``assets/examples``: what a fresh clone or a Space shows without
``../shared/data``."""

import json
import subprocess
import urllib.request

import pytest
from conftest import REPO, AppProcess
from PIL import Image

from mrg.text.labeler import ReportLabeler
from mrg.text.taxonomy import FINDINGS14
from mrg.ui import SHIPPED_EXAMPLES, default_examples, shipped_examples

MANIFEST = json.loads((SHIPPED_EXAMPLES / "manifest.json").read_text())


def test_the_examples_are_small_real_radiographs_with_their_nih_labels_and_attribution():
    entries = MANIFEST["examples"]
    assert 6 <= len(entries) <= 10
    assert "NIH Clinical Center" in MANIFEST["source"] and "CVPR 2017" in MANIFEST["citation"]
    findings = {label for e in entries for label in e["nih_labels"]}
    assert len(findings) >= 5 and findings <= set(FINDINGS14)
    assert any(not e["nih_labels"] for e in entries)  # a normal study too
    for entry in entries:
        path = SHIPPED_EXAMPLES / entry["file"]
        with Image.open(path) as image:
            assert image.mode == "L" and max(image.size) <= 512
        assert path.stat().st_size < 150_000


def test_the_reference_findings_are_the_labels_the_labeler_reads():
    labeler = ReportLabeler()
    for example, entry in zip(shipped_examples(), MANIFEST["examples"], strict=True):
        labels = labeler.label14(example.reference)
        expected = set(entry["nih_labels"]) or {"normal"}
        assert {name for name, value in labels.items() if value == 1} == expected


def test_the_examples_are_committed_so_a_clone_has_them():
    files = ["manifest.json", *(e["file"] for e in MANIFEST["examples"])]
    tracked = subprocess.run(
        ["git", "ls-files", "--error-unmatch", *files],
        check=False,
        cwd=SHIPPED_EXAMPLES,
        capture_output=True,
        text=True,
    )
    assert tracked.returncode == 0, tracked.stderr


def test_without_shared_data_the_examples_are_the_shipped_ones():
    labels = [e.label for e in default_examples(None)]
    assert labels[0].startswith("Chest CR, DICOM")
    assert labels[1:] == [e.label for e in shipped_examples()]


@pytest.mark.slow
def test_an_app_without_shared_data_lists_the_examples_and_generates_for_one(tmp_path):
    from gradio_client import Client

    app = AppProcess(
        REPO / "assets" / "checkpoints",
        tmp_path / "data",
        env={"MRG_SHARED_DATA": str(tmp_path / "nowhere")},
    )
    try:
        with urllib.request.urlopen(app.url + "config", timeout=10) as response:
            config = json.load(response)
        dropdown = next(
            c["props"] for c in config["components"] if c["props"].get("elem_id") == "example"
        )
        listed = [choice[0] for choice in dropdown["choices"]]
        assert [e.label for e in shipped_examples()] == listed[1:]
        client = Client(app.url, verbose=False)
        cardiomegaly = next(label for label in listed if "Cardiomegaly" in label)
        loaded = client.predict(cardiomegaly, api_name="/load_example")
        assert loaded[0] == "NIH ChestX-ray14 labels: Cardiomegaly."
        decoding = ("greedy", 60, 1.05, 0.7, 0.9, False, "default")
        job = client.submit("prompt-wise", *decoding, api_name="/generate")
        job.result(timeout=300)
        _, findings, impression, *_ = job.outputs()[-1]
        assert findings and impression
    finally:
        app.stop()

"""The demo: handlers directly, then the real app in another process driven by gradio_client."""

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

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def demo(tiny_llm, tokenizer, tmp_path):
    models = {}
    for seed, mode in enumerate(("prompt-wise", "promptbook-wise")):
        torch.manual_seed(seed)
        models[mode] = MRGModel(tiny_model_config(mode), tiny_llm, tokenizer).eval()
    service = ReportService(models, ServiceInfo("tiny", "cpu", list(models), {}, trained=False))
    return DemoApp(service, ReviewStore(tmp_path / "reviews.sqlite"), default_examples())


# What ``DemoApp.generate`` yields, in order (the page's components).
GENERATE_OUTPUTS = (
    "findings_a", "impression_a", "findings_b", "impression_b", "stats", "sentences", "state",
)  # fmt: skip
REVIEW_COLUMNS = ("saved", "case", "mode", "reviewer", "verdict", "categories", "note")


def named(outputs, names=GENERATE_OUTPUTS) -> dict:
    return dict(zip(names, outputs, strict=True))


def run_generate(demo, state, mode="prompt-wise", tokens=8) -> list[dict]:
    """Every update of a greedy generation, by output name."""
    return [named(u) for u in demo.generate(state, mode, "greedy", tokens, 1.2, 0.7, 0.9)]


def test_upload_dicom_shows_the_windowed_image_and_no_phi(demo):
    state, _, frontal, lateral, meta, status = demo.load_upload(DemoState(), DICOM, None)
    assert state.study is not None and state.case_key.startswith("sha256:")
    assert frontal.dtype == np.uint8 and frontal.shape == (1955, 1841) and lateral is None
    assert "MONOCHROME1 inverted" in meta and "CR" in meta
    assert "CompressedSamples" not in meta + status  # the file's patient name


def test_bad_uploads_give_a_clear_message_and_keep_the_state(demo, tmp_path):
    state, *_ = demo.load_upload(DemoState(), DICOM, None)
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(Path(DICOM).read_bytes()[:3000])
    kept, _, _, _, _, status = demo.load_upload(state, str(bad), None)
    assert "Could not load" in status and ("damaged" in status or "could not be decoded" in status)
    assert kept.study is state.study
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert "empty" in demo.load_upload(DemoState(), str(empty), None)[-1]
    assert "upload a frontal" in demo.load_upload(DemoState(), None, None)[-1]


def test_generate_streams_and_offers_sentences(demo):
    state, *_ = demo.load_example(DemoState(), next(iter(demo.examples)))
    updates = run_generate(demo, state)
    assert len(updates) >= 3
    assert "tokens" in updates[-1]["stats"] and "first token" in updates[-1]["stats"]
    assert updates[-1]["sentences"]["choices"][0] == WHOLE_REPORT
    assert state.generated["prompt-wise"]


def test_compare_both_fills_both_columns(demo):
    state, *_ = demo.load_example(DemoState(), next(iter(demo.examples)))
    final = run_generate(demo, state, COMPARE_BOTH)[-1]
    assert set(state.generated) == {"prompt-wise", "promptbook-wise"}
    assert "prompt-wise" in final["stats"] and "promptbook-wise" in final["stats"]


def test_generate_before_loading_is_a_message(demo):
    (update,) = run_generate(demo, DemoState())
    assert "Load a study first" in update["stats"]


def test_explain_and_reblend(demo):
    state, *_ = demo.load_example(DemoState(), next(iter(demo.examples)))
    run_generate(demo, state)
    frontal, lateral, status, state = demo.explain(state, "prompt-wise", WHOLE_REPORT, 0.5)
    assert frontal.shape == (1955, 1841, 3) and lateral is None and "Grad-CAM" in status
    faint, _ = demo.blend(state, 0.1)
    assert not np.array_equal(faint, frontal)


def test_compare_with_pasted_reference(demo):
    state, *_ = demo.load_example(DemoState(), next(iter(demo.examples)))
    run_generate(demo, state)
    metrics, table = demo.compare(state, "prompt-wise", "Small left pleural effusion.")
    assert "BLEU-1" in metrics
    assert (
        "Pleural Effusion" in table and "missed" in table
    )  # the untrained model does not mention it
    assert "Paste or load" in demo.compare(state, "prompt-wise", " ")[0]


def test_review_save_validation_and_export(demo):
    state, *_ = demo.load_example(DemoState(), next(iter(demo.examples)))
    run_generate(demo, state)
    status, rows, _ = demo.save_review(
        state, "prompt-wise", "", "minor error", ["missed finding"], "n", "", "s"
    )
    assert "Not saved" in status and "reviewer" in status
    status, rows, _ = demo.save_review(
        state, "prompt-wise", "", "minor error", ["missed finding"], "n", "Dr B", "s"
    )
    saved = named(rows[0], REVIEW_COLUMNS)
    assert status.startswith("Saved")
    assert saved["case"] == state.case_key and saved["verdict"] == "minor error"
    exported = Path(demo.export("s", "csv"))
    assert exported.is_file() and "Dr B" in exported.read_text()


def test_dataset_browser_marks_reviewed_cases(tiny_llm, tokenizer, tmp_path, demo):
    from mrg.data.datasets import load_annotation

    records = load_annotation(
        shared_path("iu_xray", "annotation_sample.json"), shared_path("iu_xray", "images")
    )
    app = DemoApp(demo.service, demo.store, [], records)
    state, reference, _, lateral, _, _ = app.load_case(DemoState(), records[0].study_id)
    assert reference == records[0].report and lateral is not None
    run_generate(app, state, tokens=4)
    app.save_review(state, "prompt-wise", reference, "acceptable", [], "", "Dr C", "s2")
    assert app.case_choices("s2")[0] == f"{records[0].study_id} ✓ reviewed"
    assert app.case_choices("s2")[1] == records[1].study_id


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
    loaded = client.predict(handle_file(DICOM), None, api_name="/load_upload")
    assert "Could not load" not in loaded[-1] and "MONOCHROME1" in loaded[-2]

    job = client.submit("prompt-wise", "greedy", 16, 1.2, 0.7, 0.9, api_name="/generate")
    job.result(timeout=120)
    outputs = job.outputs()
    client_outputs = GENERATE_OUTPUTS[:-1]  # gradio_client never sees the session state
    assert len(outputs) >= 3 and "first token" in named(outputs[-1], client_outputs)["stats"]

    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(500))
    message = client.predict(handle_file(str(corrupt)), None, api_name="/load_upload")[-1]
    assert "Could not load" in message and "damaged" in message
    again = client.predict(
        handle_file(DICOM), None, api_name="/load_upload"
    )  # the app still serves
    assert "Could not load" not in again[-1]
    client.submit("prompt-wise", "greedy", 16, 1.2, 0.7, 0.9, api_name="/generate").result(
        timeout=120
    )
    status = client.predict(
        "prompt-wise",
        "",
        "major error",
        ["false finding"],
        "e2e",
        "Dr E2E",
        "e2e-session",
        api_name="/save_review",
    )[0]
    assert status.startswith("Saved")


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
        client.submit("promptbook-wise", "greedy", 16, 1.2, 0.7, 0.9, api_name="/generate").result(
            timeout=120
        )
        client.predict(
            "promptbook-wise",
            "",
            "acceptable",
            [],
            "fine",
            "Dr R",
            "restart",
            api_name="/save_review",
        )
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
    state, *_ = demo.load_upload(DemoState(), str(copy), None)
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
        loads = list(pool.map(lambda _: demo.load_upload(DemoState(), str(shared), None), range(6)))
    assert all(state.study is not None for state, *_ in loads), [r[-1] for r in loads]
    assert len({state.case_key for state, *_ in loads}) == 1
    assert not shared.exists()
    # a second click on the same upload
    again, *_, status = demo.load_upload(DemoState(), str(shared), None)
    assert again.study is not None, status


def test_unexpected_failures_are_messages_and_logs_without_their_text(demo, caplog, monkeypatch):
    state, *_ = demo.load_upload(DemoState(), DICOM, None)
    run_generate(demo, state)

    patient = "DOE^JANE"

    def leak(*args):  # an error whose message quotes a DICOM attribute
        raise RuntimeError(patient)

    monkeypatch.setattr(demo.service, "compare", leak)
    monkeypatch.setattr(demo, "_study_from", leak)
    with caplog.at_level("ERROR", logger="mrg.ui"):
        message, table = demo.compare(state, "prompt-wise", "FINDINGS: Normal.")
        kept, *_, status = demo.load_upload(state, DICOM, None)
    assert "Cannot compare" in message and "try again" in message and table == ""
    assert "Could not load" in status and kept.study is state.study
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
    state, *_ = app.load_upload(DemoState(), DICOM, None)  # loading a study needs no model
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
    state, *_ = app.load_upload(DemoState(), DICOM, None)
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

    state, *_ = demo.load_upload(DemoState(), DICOM, None)

    def busy(*args, **kwargs):
        raise ServiceBusy()

    monkeypatch.setattr(demo.service, "stream", busy)
    monkeypatch.setattr(demo.service, "generate", busy)
    assert BUSY in run_generate(demo, state)[-1]["stats"]
    with pytest.raises(gr.Error, match="busy"):
        demo.report(DICOM, None, "prompt-wise")

"""Inference service and Grad-CAM with tiny random LLaMAs (and SmolLM2 once)."""

import threading

import numpy as np
import pytest
import torch
from conftest import save_tiny_checkpoints, shared_path, tiny_model_config, wait_idle

from mrg.data.study import Study, View, study_from_sources
from mrg.imaging import ImageMeta, LoadedImage
from mrg.model import Decoding, MRGModel
from mrg.model.llm import bitsandbytes_device
from mrg.service import ReportService, ServiceInfo, report_sentences

REPORT = (
    "FINDINGS: The heart is enlarged. There is a small left pleural effusion. "
    "IMPRESSION: Cardiomegaly and left effusion."
)


def synthetic_study(seed=0, views=2):
    rng = np.random.default_rng(seed)
    made = []
    for position in ("frontal", "lateral")[:views]:
        pixels = rng.random((96, 80)).astype(np.float32)
        made.append(
            View(LoadedImage(pixels, ImageMeta(format="png", width=80, height=96)), position)
        )
    return Study(made, study_id=f"synthetic-{seed}")


@pytest.fixture
def service(tiny_llm, tokenizer):
    models = {}
    for seed, mode in enumerate(("prompt-wise", "promptbook-wise")):
        torch.manual_seed(seed)
        models[mode] = MRGModel(tiny_model_config(mode), tiny_llm, tokenizer).eval()
    info = ServiceInfo("tiny", "cpu", list(models), {}, trained=False)
    return ReportService(models, info)


def test_stream_yields_several_increments_ending_in_the_generated_text(service):
    study = synthetic_study()
    decoding = Decoding(max_new_tokens=12, repetition_penalty=1.3)
    updates = list(service.stream(study, "prompt-wise", decoding))
    assert len(updates) >= 3 and updates[-1].finished and not any(u.finished for u in updates[:-1])
    assert [u.tokens for u in updates[:-1]] == list(range(1, len(updates)))
    assert updates[-1].ttft_s is not None and updates[-1].ttft_s > 0
    views = service.views(study, "prompt-wise")
    expected = service.models["prompt-wise"].generate(views, decoding)[0]
    assert updates[-1].text == expected


def test_sections_split_correctly_mid_stream(service, monkeypatch):
    pieces = ["FIND", "INGS: The heart", " is enlarged.", " IMPRES", "SION: Cardio", "megaly."]
    import mrg.service.report_service

    monkeypatch.setattr(
        mrg.service.report_service, "text_increments", lambda tokenizer, ids: iter(pieces)
    )
    updates = list(service.stream(synthetic_study(), "prompt-wise"))
    by_step = [(u.findings, u.impression) for u in updates]
    assert by_step[0] == ("", "")
    assert by_step[2] == ("The heart is enlarged.", "")
    assert by_step[3] == (
        "The heart is enlarged.",
        "",
    )  # "IMPRES" is held back, not shown as findings
    assert by_step[4] == ("The heart is enlarged.", "Cardio")
    assert by_step[-1] == ("The heart is enlarged.", "Cardiomegaly.")


def test_beam_search_returns_one_final_update(service):
    updates = list(
        service.stream(
            synthetic_study(), "promptbook-wise", Decoding(strategy="beam", max_new_tokens=6)
        )
    )
    assert len(updates) == 1 and updates[0].finished


def test_cancellation_stops_promptly_and_frees_the_model(service):
    stop = threading.Event()
    seen = []
    for update in service.stream(
        synthetic_study(), "prompt-wise", Decoding(max_new_tokens=200), stop.is_set
    ):
        seen.append(update)
        if len(seen) == 2:
            stop.set()
    assert seen[-1].finished and seen[-1].tokens == 2
    batcher = service.batchers[id(service.models["prompt-wise"].llm)]
    assert wait_idle(batcher) and not batcher.calls
    stream = service.stream(synthetic_study(), "prompt-wise", Decoding(max_new_tokens=200))
    next(stream)
    assert batcher.admitted == 1
    stream.close()  # the client went away
    assert wait_idle(batcher)


def test_two_simultaneous_requests_both_finish_correctly(service):
    decoding = Decoding(max_new_tokens=10)
    studies = {"prompt-wise": synthetic_study(1), "promptbook-wise": synthetic_study(2)}
    expected = {
        mode: service.generate(study, mode, decoding).text for mode, study in studies.items()
    }
    results, errors = {}, []

    def run(mode):
        try:
            results[mode] = service.generate(studies[mode], mode, decoding).text
        except Exception as err:  # noqa: BLE001 — any failure in the thread is surfaced below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(mode,)) for mode in studies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors and results == expected


def test_unknown_mode_is_a_clear_error(service):
    with pytest.raises(ValueError, match="not loaded"):
        list(service.stream(synthetic_study(), "static"))


def test_compare_reports_matched_missed_and_hallucinated_with_sentences(service):
    reference = "The heart is enlarged. There is a small left pleural effusion. No pneumothorax."
    generated = (
        "FINDINGS: The heart is enlarged. There is a right pneumothorax. IMPRESSION: Cardiomegaly."
    )
    comparison = service.compare(generated, reference)
    rows = {row.observation: row for row in comparison.rows}
    assert rows["Cardiomegaly"].agreement == "matched"
    assert rows["Pleural Effusion"].agreement == "missed"
    assert rows["Pleural Effusion"].reference_sentences == [
        "There is a small left pleural effusion."
    ]
    assert rows["Pneumothorax"].agreement == "hallucinated"
    assert rows["Pneumothorax"].generated_sentences == ["There is a right pneumothorax."]
    assert 0 < comparison.metrics["BLEU_1"] < 1 and "ROUGE_L" in comparison.metrics
    identical = service.compare(reference, reference)
    assert identical.metrics["BLEU_4"] == pytest.approx(1.0) and all(
        r.agreement == "matched" for r in identical.rows
    )


def test_load_shares_one_llm_between_modes(tiny_llm, tokenizer, tmp_path):
    service = ReportService.load(save_tiny_checkpoints(tmp_path, tiny_llm, tokenizer))
    assert set(service.models) == {"prompt-wise", "promptbook-wise"} and service.info.trained
    assert service.models["prompt-wise"].llm is service.models["promptbook-wise"].llm
    assert service.info.checkpoints["prompt-wise"].endswith("prompt-wise")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallbacks")
def test_load_on_a_cpu_with_gpu_options_says_what_is_in_effect(tiny_llm, tokenizer, tmp_path):
    checkpoints = save_tiny_checkpoints(tmp_path, tiny_llm, tokenizer)
    service = ReportService.load(checkpoints, device="cuda", quantization="nf4")
    assert service.info.device == "cpu"  # not "cuda": no GPU here
    # bitsandbytes quantizes on this CPU: nf4 is real, and said so; elsewhere it is not claimed
    assert service.info.quantization == ("nf4" if bitsandbytes_device() else "none")


# ----------------------------------------------------------------------------- Grad-CAM


def test_gradcam_maps_per_view_normalised_and_sentence_specific(service):
    study = synthetic_study()
    model = service.models["prompt-wise"]
    before = {k: v.clone() for k, v in model.llm.state_dict().items()}
    whole = service.explain(study, "prompt-wise", REPORT)
    assert [h.view for h in whole] == ["frontal", "lateral"]
    for heatmap in whole:
        assert heatmap.cam.min() >= 0 and heatmap.cam.max() == pytest.approx(1.0, abs=1e-5)
    first, second = report_sentences(REPORT)[:2]
    assert first == "The heart is enlarged."
    map_a = service.explain(study, "prompt-wise", REPORT, first)[0].cam
    map_b = service.explain(study, "prompt-wise", REPORT, second)[0].cam
    assert not np.allclose(map_a, map_b)
    assert all(torch.equal(before[k], v) for k, v in model.llm.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    overlay = whole[0].overlay(study.views[0].image.pixels, alpha=0.5)
    assert overlay.shape == (96, 80, 3) and overlay.dtype == np.uint8


def test_sentences_are_found_across_line_breaks(service):
    report = "FINDINGS: The heart is\nenlarged.  There is a small\n\nleft effusion. IMPRESSION: Cardiomegaly."
    _, second, _ = report_sentences(report)
    assert second == "There is a small left effusion."
    maps = service.explain(synthetic_study(), "prompt-wise", report, second)
    assert len(maps) == 2


def test_gradcam_rejects_a_sentence_not_in_the_report(service):
    with pytest.raises(ValueError, match="not part of the report"):
        service.explain(synthetic_study(), "prompt-wise", REPORT, "Pneumothorax.")


def _correlation(a, b):
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.mark.slow
def test_model_randomisation_sanity_check_with_smollm2(smollm2):
    """Adebayo et al. 2018: re-initialising the encoder's last blocks must change the map."""
    from mrg.presets import model_preset

    llm, tokenizer = smollm2
    root = shared_path("iu_xray", "images", "CXR2843_IM-1254-1001")
    study = study_from_sources(root / "0.png", root / "1.png")
    torch.manual_seed(0)
    model = MRGModel(model_preset("demo-cpu", "prompt-wise"), llm, tokenizer).eval()
    service = ReportService(
        {"prompt-wise": model}, ServiceInfo("smollm2", "cpu", ["prompt-wise"], {}, False)
    )
    original = service.explain(study, "prompt-wise", REPORT)[0].cam
    again = service.explain(study, "prompt-wise", REPORT)[0].cam
    assert _correlation(original, again) > 0.999  # deterministic
    for block in model.encoder.vit.blocks[-2:]:
        for module in block.modules():
            if hasattr(module, "reset_parameters") and module is not block:
                module.reset_parameters()
    randomised = service.explain(study, "prompt-wise", REPORT)[0].cam
    correlation = _correlation(original, randomised)
    print(f"Grad-CAM correlation before/after re-initialising the last 2 blocks: {correlation:.3f}")
    assert correlation < 0.5


def test_a_split_streamed_through_the_batcher_equals_decoding_alone(service, tmp_path):
    """``mrg generate`` over a folder: the app's continuous batcher, the same greedy reports."""
    from mrg.cli.generate import stream_split
    from mrg.data.datasets import folder_records
    from mrg.evaluation.runner import generate_split
    from mrg.ui import SHIPPED_EXAMPLES

    records = folder_records(SHIPPED_EXAMPLES)[:4]
    decoding = Decoding(max_new_tokens=12)
    model = service.model("prompt-wise")
    alone = generate_split(model, records, tmp_path / "alone.jsonl", decoding, batch_size=1)
    streamed = stream_split(service, "prompt-wise", records, tmp_path / "s.jsonl", decoding, 4)
    assert [r["id"] for r in streamed] == [r.study_id for r in records]
    assert [r["generated"] for r in streamed] == [r["generated"] for r in alone]
    assert service.batchers[id(model.llm)].largest_batch >= 2
    again = stream_split(service, "prompt-wise", records, tmp_path / "s.jsonl", decoding, 4)
    assert again == streamed and len((tmp_path / "s.jsonl").read_text().splitlines()) == 4


def test_a_states_model_writes_from_the_heads_states_or_those_set_by_hand(tiny_llm, tokenizer):
    from mrg.model.findings import FindingsHead
    from mrg.text.taxonomy import FINDINGS14

    config = tiny_model_config("prompt-wise")
    config.customizer.conditioning, config.findings_prompt = "visual+states", "states"
    torch.manual_seed(0)
    model = MRGModel(config, tiny_llm, tokenizer).eval()
    head = FindingsHead(load_weights=False).eval()
    head.possible_threshold.fill_(1.01)  # nothing possible
    head.present_threshold[FINDINGS14.index("Mass")] = 0.0  # mass always present
    head.negated_share[FINDINGS14.index("Pneumothorax")] = 0.7
    info = ServiceInfo("tiny", "cpu", ["prompt-wise"], {}, trained=False)
    service = ReportService({"prompt-wise": model}, info, findings_head=head)
    decoding = Decoding(max_new_tokens=40)
    study = synthetic_study(views=1)
    read = service.generate(study, "prompt-wise", decoding)
    assert read.condition.states == {"Mass": "present", "Pneumothorax": "absent"}
    # the lead comes where the findings would close (the tiny LLM never names the heart)
    assert read.text.split("\nIMPRESSION:")[0].endswith(" Mass.")
    assert read.text.endswith("\nIMPRESSION: Mass.")
    hand = service.generate(
        study, "prompt-wise", decoding, findings={"Effusion": "possible", "edema": "absent"}
    )
    assert hand.condition.manual and hand.condition.states == {
        "Effusion": "possible",
        "Edema": "absent",
    }
    assert hand.text.endswith("\nIMPRESSION: Possible pleural effusion.")
    assert service.generate(study, "prompt-wise", decoding, findings=["Mass"]).text.endswith(
        "\nIMPRESSION: Mass."
    )
    with pytest.raises(ValueError, match="unknown state"):
        service.generate(study, "prompt-wise", decoding, findings={"Mass": "likely"})


def test_a_split_is_read_by_the_head_at_its_own_side(tiny_llm, tokenizer, tmp_path, monkeypatch):
    """``generate_split`` hands the head the studies loaded at its side, not the encoder's."""
    from mrg.data.datasets import folder_records
    from mrg.evaluation.runner import generate_split
    from mrg.model.findings import FindingsHead, FindingsHeadConfig
    from mrg.ui import SHIPPED_EXAMPLES

    config = tiny_model_config("prompt-wise")
    config.customizer.conditioning, config.findings_prompt = "visual+states", "states"
    torch.manual_seed(0)
    model = MRGModel(config, tiny_llm, tokenizer).eval()
    head = FindingsHead(FindingsHeadConfig(image_size=96), load_weights=False).eval()
    sides = []
    predict = head.predict
    monkeypatch.setattr(
        head, "predict", lambda v, **k: sides.append(v.images.shape) or predict(v, **k)
    )
    records = folder_records(SHIPPED_EXAMPLES)[:2]
    rows = generate_split(
        model, records, tmp_path / "g.jsonl", Decoding(max_new_tokens=4), findings_head=head
    )
    assert config.encoder.image_size != 96 and [s[-1] for s in sides] == [96]
    assert len(rows) == 2 and all("state_Effusion" in r for r in rows)


def test_the_verdict_and_reading_made_at_upload_are_not_made_again(service, monkeypatch):
    """One pass per study: given the upload's reading and verdict, Generate runs no network
    before the context (the gate's read is not entered); a refusal stays a refusal unless the
    override is on, and then the report carries its warning."""
    from mrg.model.gate import Screening
    from mrg.service import StudyFindings, StudyRefused

    study = synthetic_study(views=1)
    decoding = Decoding(max_new_tokens=12)
    reading = StudyFindings({}, {}, [], manual=False, states={})
    reference = service.generate(study, "prompt-wise", decoding)

    def entered(*args, **kwargs):
        raise AssertionError("the study was read again")

    monkeypatch.setattr("mrg.service.report_service.read_study", entered)
    monkeypatch.setattr("mrg.service.report_service.screen_study", entered)
    accepted = Screening(views=[{"distance": 1.0}])
    update = next(
        u
        for u in service.stream(
            study, "prompt-wise", decoding, findings=reading, screening=accepted
        )
        if u.finished
    )
    assert update.text == reference.text and update.screening is accepted
    refused = Screening("orientation", "This radiograph looks rotated 90°.")
    with pytest.raises(StudyRefused, match="rotated"):
        list(service.stream(study, "prompt-wise", decoding, findings=reading, screening=refused))
    anyway = service.generate(
        study, "prompt-wise", decoding, findings=reading, allow_anyway=True, screening=refused
    )
    assert anyway.screening.allowed_anyway and "rotated" in anyway.screening.warning
    with pytest.raises(AssertionError, match="read again"):  # an allowed verdict is not reused
        service.generate(
            study, "prompt-wise", decoding, findings=reading, screening=anyway.screening
        )

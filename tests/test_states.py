"""Finding states: the text layer, the findings head's calibration and states, and the
counts of what a radiologist reads (``mrg.text.states``, ``mrg.model.findings``,
``mrg.train.findings``, ``mrg.evaluation.states_eval``)."""

import numpy as np
import pytest
import torch

from mrg.evaluation.calibration import (
    calibration_report,
    expected_calibration_error,
    negated_shares,
    states_report,
)
from mrg.evaluation.states_eval import content, form, state_fidelity
from mrg.model.findings import FindingsHead
from mrg.text.labeler import ReportLabeler
from mrg.text.states import (
    STATE_WIDTH,
    contradicting_bigrams,
    described,
    global_normal,
    lead_sentences,
    naming_prefixes,
    parse_states,
    spoken_for,
    state_vector,
    states_from_statuses,
    states_of_vector,
    states_words,
)
from mrg.text.taxonomy import FINDINGS14, findings_vector
from mrg.train.findings_calibration import fit_platt, possible_point, present_points

STATES = {"Cardiomegaly": "present", "Effusion": "possible", "Pneumothorax": "absent"}
NORMAL = (
    "FINDINGS: The heart is normal in size. The lungs are clear. No pleural effusion or "
    "pneumothorax.\nIMPRESSION: No acute cardiopulmonary abnormality."
)


def test_a_states_vector_holds_three_flags_per_finding_and_normal_and_reads_back():
    vector = state_vector(STATES)
    assert len(vector) == STATE_WIDTH == 43 and sum(vector) == 3
    assert vector[FINDINGS14.index("Cardiomegaly")] == 1.0
    assert vector[14 + FINDINGS14.index("Effusion")] == 1.0
    assert vector[28 + FINDINGS14.index("Pneumothorax")] == 1.0 and vector[42] == 0.0
    assert states_of_vector(vector) == STATES
    assert state_vector({"Pneumothorax": "absent"})[42] == 1.0  # nothing present or possible
    # the 15-wide findings vector of the checkpoints before: its findings present
    assert states_of_vector(findings_vector(["Mass"])) == {"Mass": "present"}
    with pytest.raises(ValueError, match="unknown state"):
        state_vector({"Mass": "likely"})


def test_states_as_words_and_as_the_sentences_decoding_forces():
    assert states_words(STATES) == (
        "Present: cardiomegaly. Possible: pleural effusion. Absent: pneumothorax."
    )
    assert states_words({}) == "Present: none. Possible: none. Absent: none."
    assert lead_sentences(STATES) == "Cardiomegaly. Possible pleural effusion."
    assert lead_sentences({"Pneumothorax": "absent"}) == ""
    hernia_nodule = {"Hernia": "present", "Nodule": "possible"}
    assert lead_sentences(hernia_nodule) == "Hiatal hernia. Possible pulmonary nodule."


def test_what_a_findings_sentence_speaks_for_and_what_contradicts_it():
    assert spoken_for({"Cardiomegaly": "possible"}) >= {"heart", "cardiomediastinal", "cardiac"}
    assert "lungs" not in spoken_for(STATES) and not spoken_for({"Cardiomegaly": "absent"})
    assert described(["the", "cardiomediastinal", "silhouette", "is", "normal"]) == {
        "heart",
        "mediastinum",
    }
    assert {"large", "enlarge", "cardiomegal"} <= naming_prefixes(["Cardiomegaly"])
    pleural = contradicting_bigrams({"Effusion": "present"})
    assert ("pleural", "disease") in pleural and ("acute", "cardiopulmonary") in pleural
    lungs = contradicting_bigrams({"Nodule": "possible"})
    assert ("pleural", "disease") not in lungs and ("acute", "cardiopulmonary") in lungs
    assert not contradicting_bigrams({"Effusion": "absent"})


def test_the_findings_flag_reads_states_and_names_alone_are_present():
    assert parse_states("Effusion=possible, cardiomegaly, pneumothorax=Absent") == STATES
    assert parse_states("none") == {} and parse_states("") == {}
    with pytest.raises(ValueError, match="unknown state"):
        parse_states("Effusion=maybe")
    with pytest.raises(ValueError, match="unknown finding"):
        parse_states("Fracture")


def test_the_labelers_statuses_become_states():
    labeler = ReportLabeler()
    text = "Possible small left effusion. No pneumothorax. Cardiomegaly."
    assert states_from_statuses(labeler.statuses14(text)) == STATES
    assert global_normal(NORMAL) and not global_normal("FINDINGS: Cardiomegaly.")


def test_platt_scaling_matches_the_rate_the_imbalance_aware_loss_shifted():
    rng = np.random.default_rng(0)
    labels = torch.from_numpy(rng.random((400, 14)) < 0.1).float()
    logits = labels * 2.0 + torch.from_numpy(rng.normal(0, 1, (400, 14))).float() + 2.5
    before = torch.sigmoid(logits).numpy()  # far too sure: mean p ≈ 0.9 against a rate of 0.1
    temperature, bias = fit_platt(logits, labels)
    after = torch.sigmoid(logits / temperature + bias).numpy()
    assert abs(after.mean() - labels.mean().item()) < 0.01
    assert expected_calibration_error(after, labels.numpy()) < 0.05
    assert expected_calibration_error(before, labels.numpy()) > 0.5
    report = calibration_report(after, labels.numpy())
    assert report["expected_count"] == pytest.approx(report["labelled_count"], abs=0.05)
    assert sum(b["count"] for b in report["reliability"]) == 400 * 14


def test_a_present_point_is_the_lowest_threshold_of_enough_precision():
    p = np.array([[0.9], [0.8], [0.7], [0.6], [0.5]])
    y = np.array([[1], [1], [0], [0], [1]])
    assert present_points(p, y, precision=0.6, min_true=2)[0] == 0.5  # 3 of 5 above 0.5
    assert present_points(p, y, precision=0.7, min_true=2)[0] == 0.8  # 2 of 2 above 0.8
    assert present_points(p, y, min_true=3, precision=0.7)[0] == np.inf  # never: at most possible
    assert present_points(p, y, precision=0.5)[0] == np.inf  # by default 5 true positives


def test_the_possible_point_is_one_threshold_of_best_micro_f1_beside_the_present_ones():
    p = np.array([[0.9, 0.3, 0.2, 0.1], [0.5, 0.4, 0.05, 0.01], [0.2, 0.1, 0.6, 0.05]])
    y = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]])
    present = np.zeros_like(p, dtype=bool)
    present[0, 0] = True
    # candidates: image 0's one free slot (0.3), the others' top two; naming 0.6, 0.5 and
    # 0.4 beside the present one gives 3 right of 4 named against 3 labelled: F1 6/7
    assert possible_point(p, y, present) == 0.4
    assert possible_point(p, y, present, cap=1) == 0.6  # image 1 may name only its 0.5
    assert possible_point(p, np.zeros_like(y), present) == np.inf  # nothing to find: none
    # tied candidates are named all or none: 0.5 names three (one right), 0.3 all four
    tied = np.array([[0.5], [0.5], [0.5], [0.3]])
    assert possible_point(tied, np.array([[1], [0], [0], [1]]), np.zeros((4, 1), bool)) == 0.3
    # present ones fill an image's cap: its other findings are no candidates
    full = np.ones_like(p, dtype=bool)
    full[:, 2:] = False
    assert possible_point(p, y, full) == np.inf  # two present everywhere: nothing left
    # an F1 tie goes to the higher point: naming 0.6 (right) or 0.6 and 0.4 (one of two)
    even = np.array([[0.6, 0.4]])
    assert possible_point(even, np.array([[1, 0]]), np.zeros((1, 2), bool)) == 0.6


def test_negated_shares_count_the_reports_that_negate_each_finding():
    shares = negated_shares([NORMAL, "FINDINGS: Small effusion.\nIMPRESSION: Effusion."])
    assert shares[FINDINGS14.index("Pneumothorax")] == 0.5
    assert shares[FINDINGS14.index("Effusion")] == 0.5  # negated once, affirmed once
    assert shares[FINDINGS14.index("Mass")] == 0.0


@pytest.fixture(scope="module")
def head():
    head = FindingsHead(load_weights=False).eval()
    head.threshold.fill_(0.3)
    head.possible_threshold.fill_(0.3)
    head.present_threshold.fill_(float("inf"))
    head.present_threshold[FINDINGS14.index("Cardiomegaly")] = 0.6
    head.negated_share[FINDINGS14.index("Pneumothorax")] = 0.7
    head.negated_share[FINDINGS14.index("Effusion")] = 0.7
    return head


def probabilities(**values) -> torch.Tensor:
    p = torch.full((1, 14), 0.05)
    for name, value in values.items():
        p[0, FINDINGS14.index(name)] = value
    return p


def test_the_heads_states_present_above_its_point_two_named_at_most_the_rest_absent(head):
    (states,) = head.states(probabilities(Cardiomegaly=0.7, Mass=0.4, Nodule=0.5, Effusion=0.35))
    # present, then the most probable of the band while fewer than two are named
    assert states == {"Cardiomegaly": "present", "Nodule": "possible", "Pneumothorax": "absent"}
    (states,) = head.states(probabilities(Cardiomegaly=0.5, Effusion=0.35))
    assert states == {"Cardiomegaly": "possible", "Effusion": "possible", "Pneumothorax": "absent"}
    (states,) = head.states(probabilities())  # a normal study: the often-negated ones absent
    assert states == {"Effusion": "absent", "Pneumothorax": "absent"}
    # possible from the one possible point, not from each finding's F1 point; absent only
    # below both (never a finding above its own F1 point)
    points = head.threshold.clone()
    head.threshold[FINDINGS14.index("Mass")] = 0.9
    head.threshold[FINDINGS14.index("Effusion")] = 0.1
    (states,) = head.states(probabilities(Mass=0.4, Effusion=0.2))
    (below,) = head.states(probabilities(Effusion=0.08))
    head.threshold.copy_(points)
    assert states == {"Mass": "possible", "Pneumothorax": "absent"}
    assert below == {"Effusion": "absent", "Pneumothorax": "absent"}
    vector = head.condition(probabilities(Cardiomegaly=0.7), states=True)
    assert (
        vector.shape == (1, 43)
        and states_of_vector(vector[0].tolist())["Cardiomegaly"] == "present"
    )
    assert head.condition(probabilities(Cardiomegaly=0.7)).shape == (1, 15)


def test_a_head_saved_before_the_states_loads_with_its_decisions_kept(head, tmp_path):
    from safetensors.torch import load_file, save_file

    head.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "findings.safetensors"))
    for name in ("bias", "present_threshold", "negated_share", "possible_threshold"):
        del state[name]
    save_file(state, str(tmp_path / "findings.safetensors"))
    old = FindingsHead.from_pretrained(tmp_path)
    assert torch.equal(old.threshold, head.threshold) and not old.bias.any()
    assert torch.equal(old.possible_threshold, old.threshold)  # possible from its F1 points
    assert old.states(probabilities(Cardiomegaly=0.9)) == [{"Cardiomegaly": "possible"}]
    del state["threshold"]
    save_file(state, str(tmp_path / "findings.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        FindingsHead.from_pretrained(tmp_path)


def test_states_report_counts_present_precision_and_the_image_free_constants():
    labels = np.zeros((4, 14))
    labels[0, 1] = labels[1, 2] = 1
    states = [{"Cardiomegaly": "present"}, {"Mass": "present", "Effusion": "possible"}, {}, {}]
    report = states_report(states, labels, train_rate=np.linspace(1, 0, 14))
    assert report["present_precision"] == 0.5 and report["normal_without_present"] == 1.0
    assert report["named_per_image"] == 0.75 and report["with_possible"]["recall"] == 1.0
    assert set(report["constants"]) == {"top1", "top2", "top3"}


def test_content_form_and_fidelity_read_the_reports_as_a_radiologist_would():
    labeler = ReportLabeler()
    cardiomegaly = (
        "FINDINGS: Cardiomegaly. The lungs are clear. No pleural effusion or pneumothorax."
        "\nIMPRESSION: Cardiomegaly. No acute cardiopulmonary abnormality."
    )
    texts = [cardiomegaly, NORMAL]
    counted = content(texts, [["Cardiomegaly"], []], labeler)
    assert counted["present_precision"] == 1.0 and counted["normal_without_present"] == 1.0
    shape = form(texts, labeler, vocabulary=frozenset({"the"}))
    assert shape["anatomy_all"] == 1.0 and shape["global_normal_beside_present"] == 0.5
    assert 0 < shape["outside_vocabulary"] < 1 and shape["affirm_and_negate"] == 0.0
    fidelity = state_fidelity([STATES, {"Effusion": "absent"}], texts, labeler)
    # cardiomegaly and pneumothorax read back, effusion possible not (the report negates it)
    assert fidelity["per_state"]["possible"] == {"stated": 1, "read_back": 0}
    assert fidelity["fidelity"] == 3 / 4


def test_a_states_model_is_scored_by_state_fidelity_with_one_fixed_image(tiny_llm, tokenizer):
    from conftest import random_batch, tiny_model_config

    from mrg.evaluation.fidelity import language_fidelity
    from mrg.evaluation.states_card import language_table
    from mrg.model import MRGModel

    config = tiny_model_config("prompt-wise")
    config.customizer.conditioning, config.findings_prompt = "visual+states", "states"
    torch.manual_seed(0)
    model = MRGModel(config, tiny_llm, tokenizer).eval()
    texts = ["FINDINGS: Cardiomegaly. No pneumothorax.\nIMPRESSION: Cardiomegaly.", NORMAL]
    from mrg.config import Decoding

    scores, rows = language_fidelity(
        model, texts, Decoding(max_new_tokens=24), image=random_batch(1, 1)
    )
    assert rows[0]["states"] == {"Cardiomegaly": "present", "Pneumothorax": "absent"}
    assert rows[0]["generated"].endswith("IMPRESSION: Cardiomegaly.")  # the forced sentence
    per = scores["states"]["per_state"]
    assert per["present"] == {"stated": 1, "read_back": 1} and per["absent"]["stated"] == 3
    table = language_table({"tiny": {**scores, "BLEU_4": 0.1, "CIDEr": 0.2}})
    assert "| tiny | 2 |" in table and "1 of 1" in table

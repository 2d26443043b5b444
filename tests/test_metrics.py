"""Metric wrappers against known values, and clinical-efficacy scoring."""

import math

import pytest

from mrg.evaluation.metrics import clinical_efficacy, java_available, label_agreement, nlg_scores
from mrg.text.taxonomy import CHEXPERT5

REPORTS = [
    "The heart is normal in size. The lungs are clear. No pleural effusion or pneumothorax.",
    "There is a small left pleural effusion. Mild cardiomegaly.",
    "Right upper lobe opacity concerning for pneumonia. No pneumothorax.",
]


def identity(text):
    return text


def test_hand_computed_bleu():
    scores = nlg_scores(
        ["the cat is on the mat"], ["the cat sat on the mat"], clean=identity, meteor=False
    )
    assert scores.corpus["BLEU_1"] == pytest.approx(5 / 6, abs=1e-6)
    assert scores.corpus["BLEU_2"] == pytest.approx(math.sqrt(5 / 6 * 3 / 5), abs=1e-6)
    assert scores.per_case["BLEU_1"][0] == pytest.approx(5 / 6, abs=1e-6)


def test_identical_texts_score_perfectly():
    scores = nlg_scores(REPORTS, REPORTS)
    for key in ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "ROUGE_L"):
        assert scores.corpus[key] == pytest.approx(1.0, abs=1e-6), key
    assert (
        scores.corpus["CIDEr"] > 5.0
    )  # 10 for identical captions when every n-gram has the same IDF


def test_disjoint_texts_score_zero():
    scores = nlg_scores(
        REPORTS, ["banana apple orange kiwi melon grape"] * 3, clean=identity, meteor=False
    )
    assert (
        scores.corpus["BLEU_1"] < 1e-6
        and scores.corpus["ROUGE_L"] == 0.0
        and scores.corpus["CIDEr"] == 0.0
    )
    assert len(scores.per_case["ROUGE_L"]) == 3


@pytest.mark.skipif(not java_available(), reason="METEOR needs Java")
def test_meteor_runs_with_java():
    scores = nlg_scores(REPORTS, REPORTS[::-1])
    assert 0.0 < scores.corpus["METEOR"] < 1.0 and len(scores.per_case["METEOR"]) == 3
    assert nlg_scores(REPORTS, REPORTS).corpus["METEOR"] > 0.95


def test_missing_java_is_reported_not_fatal(monkeypatch):
    monkeypatch.setattr("mrg.evaluation.metrics.java_available", lambda: False)
    scores = nlg_scores(REPORTS, REPORTS)
    assert "METEOR" not in scores.corpus and "Java" in scores.notes[0]
    assert scores.corpus["BLEU_4"] == pytest.approx(1.0)


def test_label_agreement_micro_and_macro():
    refs = [{"A": 1, "B": 0}, {"A": 1, "B": 1}, {"A": 0, "B": 1}]
    preds = [{"A": 1, "B": 1}, {"A": 0, "B": 1}, {"A": 0, "B": 1}]
    scores = label_agreement(refs, preds, ["A", "B"])
    # A: tp1 fp0 fn1 -> P1 R.5 F.667 ; B: tp2 fp1 fn0 -> P.667 R1 F.8 ; micro tp3 fp1 fn1 -> .75
    assert scores.per_label["A"].f1 == pytest.approx(2 / 3)
    assert scores.per_label["B"].f1 == pytest.approx(0.8)
    assert scores.micro.f1 == pytest.approx(0.75)
    assert scores.macro.f1 == pytest.approx((2 / 3 + 0.8) / 2)


def test_clinical_efficacy_on_reports():
    perfect = clinical_efficacy(REPORTS, REPORTS)
    assert perfect["chexpert14"].micro.f1 == pytest.approx(1.0)
    assert set(perfect["chexpert5"].per_label) == set(CHEXPERT5)
    swapped = clinical_efficacy(REPORTS, [REPORTS[0]] * 3)  # always "normal"
    assert swapped["chexpert5"].micro.recall == 0.0
    assert swapped["chexpert14"].per_label["Pleural Effusion"].f1 == 0.0

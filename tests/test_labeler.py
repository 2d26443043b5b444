"""The rule-based report labeler: crafted hard cases and the floor on the OpenI gold standard."""

import pytest
from conftest import shared_path

from mrg.text.labeler import (
    NEGATIVE,
    POSITIVE,
    UNCERTAIN,
    ReportLabeler,
)
from mrg.text.taxonomy import CHEXPERT14, FINDINGS14

labeler = ReportLabeler()


def concepts(text):
    return labeler.concepts(text)


@pytest.mark.parametrize(
    "text, concept, status",
    [
        ("There is a small left pleural effusion.", "effusion", POSITIVE),
        ("No pleural effusion.", "effusion", NEGATIVE),
        ("No focal consolidation, pneumothorax, or pleural effusion.", "effusion", NEGATIVE),
        ("No focal consolidation, pneumothorax, or pleural effusion.", "pneumothorax", NEGATIVE),
        ("No pneumothorax, but there is a small right effusion.", "effusion", POSITIVE),
        ("No pneumothorax, but there is a small right effusion.", "pneumothorax", NEGATIVE),
        ("The lungs are clear without effusion.", "effusion", NEGATIVE),
        ("Lungs are free of focal consolidation.", "consolidation", NEGATIVE),
        ("Previously seen right basilar atelectasis has resolved.", "atelectasis", NEGATIVE),
        ("Pneumothorax is no longer seen.", "pneumothorax", NEGATIVE),
        ("Pneumonia cannot be excluded.", "pneumonia", UNCERTAIN),
        ("Cannot exclude a small effusion.", "effusion", UNCERTAIN),
        ("Opacity may represent atelectasis.", "atelectasis", UNCERTAIN),
        ("Possible small effusion, no pneumothorax.", "effusion", UNCERTAIN),
        ("Possible small effusion, no pneumothorax.", "pneumothorax", NEGATIVE),
        ("Left basilar opacity, atelectasis versus infiltrate.", "atelectasis", POSITIVE),
        ("No change in the moderate cardiomegaly.", "cardiomegaly", POSITIVE),
        ("The heart is not enlarged.", "cardiomegaly", NEGATIVE),
        ("The heart is mildly enlarged.", "cardiomegaly", POSITIVE),
        ("Heart size is within normal limits.", "cardiomegaly", None),
        ("Stable hiatal hernia.", "hernia", POSITIVE),
        ("Subcutaneous emphysema in the chest wall.", "emphysema", None),
        ("Hyperinflated lungs consistent with emphysema.", "emphysema", POSITIVE),
        ("No evidence of mass effect.", "mass", None),
        ("Right upper lobe mass.", "mass", POSITIVE),
        (
            "Interval resolution of previously demonstrated bibasilar infiltrates.",
            "infiltration",
            NEGATIVE,
        ),
        ("Right-sided PICC line in the SVC.", "support_devices", POSITIVE),
    ],
)
def test_hard_cases(text, concept, status):
    assert concepts(text).get(concept) == status


def test_negation_does_not_cross_sentences_or_clauses():
    text = "No pneumothorax. Small left effusion; no edema."
    got = concepts(text)
    assert got == {"pneumothorax": NEGATIVE, "effusion": POSITIVE, "edema": NEGATIVE}


def test_positive_mention_wins_over_a_negated_one():
    assert concepts("No right effusion. Small left pleural effusion.")["effusion"] == POSITIVE


def test_label14_and_normal():
    labels = labeler.label14(
        "The heart is normal in size. The lungs are clear. No effusion or pneumothorax."
    )
    assert set(labels) == set(FINDINGS14) | {"normal"}
    assert labels["normal"] == 1 and sum(labels[k] for k in FINDINGS14) == 0
    labels = labeler.label14("Cardiomegaly with small bilateral pleural effusions.")
    assert labels["Cardiomegaly"] == labels["Effusion"] == 1 and labels["normal"] == 0
    assert labeler.label14("Possible pneumonia.")["Pneumonia"] == 0
    assert labeler.label14("Possible pneumonia.", uncertain_as_positive=True)["Pneumonia"] == 1


def test_chexpert_codes():
    labels = labeler.chexpert(
        "Small left effusion. Pneumonia cannot be excluded. No pneumothorax. ET tube in place."
    )
    assert set(labels) == set(CHEXPERT14)
    assert (
        labels["Pleural Effusion"] == 1
        and labels["Pneumonia"] == -1
        and labels["Pneumothorax"] == 0
    )
    assert (
        labels["Support Devices"] == 1
        and labels["Fracture"] is None
        and labels["No Finding"] is None
    )
    assert labels["Lung Opacity"] == -1  # pneumonia is an opacity, here uncertain
    normal = labeler.chexpert("The lungs are clear. No acute cardiopulmonary abnormality.")
    assert normal["No Finding"] == 1


def test_mentions_carry_their_sentence_and_span():
    text = "The heart is normal. There is a small right pleural effusion."
    (mention,) = [m for m in labeler.mentions(text) if m.concept == "effusion"]
    assert mention.sentence == "There is a small right pleural effusion."
    assert mention.sentence[mention.start : mention.end] == "effusion"


def test_floor_on_openi_gold_standard():
    from mrg.evaluation.labeler_eval import evaluate_on_gold

    result = evaluate_on_gold(
        shared_path("openi_labels", "openi_gold14_dev.csv"),
        shared_path("iu_xray", "NLMCXR_reports.tgz"),
    )
    assert result.reports == 3080
    assert result.micro.f1 >= 0.90, result.micro
    assert result.macro_f1 >= 0.80

"""The label taxonomies of report text: ChestX-ray14's 14 findings and CheXpert's 14 observations.

The findings head predicts ``FINDINGS14``, the labeler reads them from text, and the
customizers are conditioned on them; all three import the names from here.
"""

from __future__ import annotations

from collections.abc import Iterable

FINDINGS14 = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NORMAL = "normal"  # no finding of FINDINGS14: the 15th entry of a findings vector
CHEXPERT14 = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Lesion",
    "Lung Opacity",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
CHEXPERT5 = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")


def display_name(finding: str) -> str:
    """``Pleural_Thickening`` → ``Pleural thickening``: the name a radiologist reads."""
    words = finding.replace("_", " ")
    return words[:1].upper() + words[1:].lower()


def finding_named(name: str) -> str:
    """The ChestX-ray14 finding a user means by ``name`` (case, spaces or underscores, or
    the display name); ValueError naming the choices otherwise."""
    key = name.strip().lower().replace(" ", "_")
    for finding in FINDINGS14:
        if finding.lower() == key:
            return finding
    raise ValueError(f"unknown finding {name!r}; choose from {', '.join(FINDINGS14)}")


def findings_vector(positive: Iterable[str]) -> list[float]:
    """The 15-entry condition y: 1 for each finding of ``positive``, then 1 for normal when none."""
    chosen = set(positive)
    unknown = chosen - set(FINDINGS14)
    if unknown:
        raise ValueError(f"unknown findings {sorted(unknown)}; choose from {FINDINGS14}")
    values = [1.0 if f in chosen else 0.0 for f in FINDINGS14]
    return values + [0.0 if chosen else 1.0]


# where the label is not what a report says (OpenI's 3,955 reports never write "infiltration")
SPOKEN = {"Effusion": "pleural effusion", "Infiltration": "infiltrate"}


def spoken_name(finding: str) -> str:
    """The words a report uses for ``finding``: ``Effusion`` → ``pleural effusion``."""
    return SPOKEN.get(finding, finding.replace("_", " ").lower())


def findings_words(named: Iterable[str]) -> str:
    """The findings condition as words in the user turn: ``Findings: cardiomegaly, pleural
    effusion.`` or ``Findings: none.``"""
    names = [spoken_name(f) for f in FINDINGS14 if f in set(named)]
    return f"Findings: {', '.join(names) if names else 'none'}."


def named_findings(vector: Iterable[float]) -> list[str]:
    """The ChestX-ray14 findings a findings vector (or its first 14 entries) names: entries ≥ 0.5."""
    return [f for f, value in zip(FINDINGS14, vector) if value >= 0.5]


def findings_sentences(named: Iterable[str]) -> str:
    """The findings as the sentences a report begins with: ``Cardiomegaly. Pleural effusion.``
    ("" for none)."""
    return " ".join(f"{spoken_name(f).capitalize()}." for f in FINDINGS14 if f in set(named))

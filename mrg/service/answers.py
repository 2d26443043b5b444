"""What the service answers and is asked: the findings head's reading of a study, the report
as it streams, a refusal by the chest-radiograph gate, the comparison with a reference; a
condition set by hand (``Manual``, read by ``mrg.text.states.manual_states``) and the
sentences of a report (``report_sentences``)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from mrg.model.gate import Screening
from mrg.text.cleaning import split_sentences
from mrg.text.sections import split_sections
from mrg.text.states import STATE_WIDTH, state_vector
from mrg.text.taxonomy import FINDINGS14, findings_vector


@dataclass
class StudyFindings:
    """The findings head's reading of a study: calibrated probabilities, operating points
    (F1, present and possible: ``FindingsHead``; None: never reached), the states (present,
    possible, absent: what a states model writes from) and the findings above their F1
    operating points (``named``: what the models before the states write from); set by hand
    when ``manual`` (then ``named`` is the present and possible ones)."""

    probabilities: dict[str, float]
    thresholds: dict[str, float]
    named: list[str]
    manual: bool = False
    states: dict[str, str] = field(default_factory=dict)
    present_thresholds: dict[str, float | None] = field(default_factory=dict)
    possible_thresholds: dict[str, float | None] = field(default_factory=dict)

    def vector(self, width: int = len(FINDINGS14) + 1) -> torch.Tensor:
        """The condition a model of ``width`` takes: the states ``[1, 43]`` or y ``[1, 15]``."""
        if width == STATE_WIDTH:
            return torch.tensor([state_vector(self.states)], dtype=torch.float32)
        return torch.tensor([findings_vector(self.named)], dtype=torch.float32)

    def as_dict(self) -> dict:
        """What ``mrg generate --json`` and the ``/report`` API return as ``findings_head``."""
        return {
            "named": self.named,
            "manual": self.manual,
            "states": self.states,
            "probabilities": {f"p_{f}": p for f, p in self.probabilities.items()},
            "operating_points": self.thresholds,
            "present_points": self.present_thresholds,
            "possible_points": self.possible_thresholds,
        }

    def ranked(self) -> list[tuple[str, float, float]]:
        """(finding, probability, operating point), most probable first."""
        return sorted(
            ((f, self.probabilities[f], self.thresholds[f]) for f in self.probabilities),
            key=lambda row: -row[1],
        )


@dataclass
class ReportUpdate:
    """The report so far, split into sections, with timing."""

    findings: str = ""
    impression: str = ""
    text: str = ""
    finished: bool = False
    tokens: int = 0
    ttft_s: float | None = None
    tokens_per_s: float | None = None
    elapsed_s: float = 0.0
    # the findings head's reading of the study (or the findings set by hand): what a
    # findings-conditioned report was written from
    condition: StudyFindings | None = None
    screening: Screening | None = None  # the gate's verdict: scores, and a warning if overridden


class StudyRefused(ValueError):
    """The gate refused the study; ``str(err)`` is its message, ``screening`` the verdict."""

    def __init__(self, screening: Screening):
        super().__init__(screening.message)
        self.screening = screening


@dataclass
class LabelRow:
    observation: str
    agreement: str  # matched | missed | hallucinated
    reference_sentences: list[str] = field(default_factory=list)
    generated_sentences: list[str] = field(default_factory=list)


@dataclass
class Comparison:
    metrics: dict[str, float]
    notes: list[str]
    rows: list[LabelRow]


Manual = list[str] | Mapping[str, str] | None  # a condition set by hand: names, or names → states


def find_span(report: str, sentence: str) -> tuple[int, int]:
    """Character span of ``sentence`` in ``report``, whatever whitespace separates its words there."""
    pattern = r"\s+".join(re.escape(word) for word in sentence.split())
    match = re.search(pattern, report) if pattern else None
    if match is None:
        raise ValueError("the selected sentence is not part of the report")
    return match.span()


def report_sentences(text: str) -> list[str]:
    """Sentences of a generated report, section headers removed (for sentence-level Grad-CAM)."""
    sections = split_sections(text)
    return split_sentences(sections.findings) + split_sentences(sections.impression)

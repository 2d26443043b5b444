"""What the service answers: the findings head's reading of a study, the report as it
streams, a refusal by the chest-radiograph gate, and the comparison with a reference."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mrg.model.gate import Screening
from mrg.text.taxonomy import findings_vector


@dataclass
class StudyFindings:
    """The findings head's reading of a study: calibrated probabilities, operating points,
    and the findings the report is conditioned on (``named``; set by hand when ``manual``)."""

    probabilities: dict[str, float]
    thresholds: dict[str, float]
    named: list[str]
    manual: bool = False

    def vector(self) -> torch.Tensor:
        """The condition y ``[1, 15]``."""
        return torch.tensor([findings_vector(self.named)], dtype=torch.float32)

    def as_dict(self) -> dict:
        """What ``mrg generate --json`` and the ``/report`` API return as ``findings_head``."""
        return {
            "named": self.named,
            "manual": self.manual,
            "probabilities": {f"p_{f}": p for f, p in self.probabilities.items()},
            "operating_points": self.thresholds,
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

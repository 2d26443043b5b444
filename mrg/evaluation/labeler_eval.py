"""Score the report labeler against the OpenI radiologist gold standard (NegBio's 14 labels).

The gold marks a finding 1 when the report states it (hedged "or"/"versus" alternatives
included) and 0 when it is absent, negated or only raised as a possibility, so the labeler's
positive status is compared with it. The gold set has no Hernia annotations although
reports mention hiatal hernias, so Hernia is reported but left out of the averages.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from mrg.data.reports import iter_openi_reports
from mrg.text.labeler import ReportLabeler
from mrg.text.taxonomy import FINDINGS14

SCORED = tuple(label for label in FINDINGS14 if label != "Hernia")


@dataclass
class LabelScore:
    tp: int = 0
    fp: int = 0
    fn: int = 0

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


@dataclass
class GoldEvaluation:
    per_label: dict[str, LabelScore] = field(default_factory=dict)
    reports: int = 0

    @property
    def micro(self) -> LabelScore:
        total = LabelScore()
        for label in SCORED:
            score = self.per_label[label]
            total.tp, total.fp, total.fn = (
                total.tp + score.tp,
                total.fp + score.fp,
                total.fn + score.fn,
            )
        return total

    @property
    def macro_f1(self) -> float:
        return sum(self.per_label[label].f1 for label in SCORED) / len(SCORED)


def report_texts(reports_source: str | Path) -> dict[str, str]:
    """Report id → FINDINGS + IMPRESSION text (what the gold standard was labelled from)."""
    return {
        r.report_id: " ".join(part for part in (r.findings, r.impression) if part)
        for r in iter_openi_reports(reports_source)
    }


def evaluate_on_gold(
    gold_csv: str | Path, reports_source: str | Path, labeler: ReportLabeler | None = None
) -> GoldEvaluation:
    labeler = labeler or ReportLabeler()
    texts = report_texts(reports_source)
    result = GoldEvaluation(per_label={label: LabelScore() for label in FINDINGS14})
    with open(gold_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            predicted = labeler.label14(texts[row["filename"]])
            result.reports += 1
            for label in FINDINGS14:
                gold, pred = int(row[label]), predicted[label]
                score = result.per_label[label]
                score.tp += gold and pred
                score.fp += pred and not gold
                score.fn += gold and not pred
    return result

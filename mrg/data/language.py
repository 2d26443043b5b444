"""Report text for the report-language stage: OpenI reports, minus every held-out reference.

The corpus is every OpenI report with both sections, in the training target's form
(``format_report``), except reports with OpenI's ``XXXX`` redactions (a model taught on them
writes "No [redacted] of effusion") and the reports that are a reference of a held-out
(validation or test) study of any annotation given. A held-out report is known by its id
(``CXR<n>``: the pairs record it, R2Gen's IU X-ray ids start with it); where a study's
annotation does not say which report it is, by its text (whitespace- and case-normalised,
whole or FINDINGS alone), which then also leaves out every report worded the same. The rest is split by a hash of the report id into the
stage's training and validation texts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from mrg.data.datasets import StudyRecord, split_of
from mrg.data.reports import iter_openi_reports
from mrg.text.cleaning import REDACTED
from mrg.text.sections import format_report

_OPENI_ID = re.compile(r"^(CXR\d+)_")


def normalise(text: str) -> str:
    return " ".join(text.split()).lower()


@dataclass
class HeldOut:
    """Report ids and normalised texts that the language stage must never see."""

    report_ids: set[str] = field(default_factory=set)
    texts: set[str] = field(default_factory=set)

    @classmethod
    def from_records(cls, records: Iterable[StudyRecord]) -> HeldOut:
        """Everything that identifies the references of ``records`` that are not training ones."""
        held = cls()
        for record in records:
            if record.split == "train":
                continue
            match = _OPENI_ID.match(record.study_id)
            report_id = record.report_id or (match and match.group(1))
            if report_id:
                held.report_ids.add(report_id)
            else:
                held.texts.update(
                    normalise(t) for t in (record.report, record.target, record.findings) if t
                )
        return held

    def update(self, other: HeldOut) -> None:
        self.report_ids |= other.report_ids
        self.texts |= other.texts

    def __contains__(self, report) -> bool:
        texts = (format_report(report.findings, report.impression), report.findings)
        return report.report_id in self.report_ids or any(normalise(t) in self.texts for t in texts)


@dataclass
class ReportCorpus:
    train: list[str]
    val: list[str]
    held_out: int  # reports left out because a held-out study uses them
    redacted: int = 0  # reports left out for their redactions
    held_out_texts: list[str] = field(default_factory=list)  # those reports (no redactions)


def report_corpus(source: str | Path, held_out: HeldOut, val_ratio: float = 0.05) -> ReportCorpus:
    """OpenI reports with FINDINGS and IMPRESSION not in ``held_out``, split train / val by id."""
    train, val, left_out, redacted, held_texts = [], [], 0, 0, []
    for report in iter_openi_reports(source):
        if not (report.findings and report.impression):
            continue
        text = format_report(report.findings, report.impression)
        if report in held_out:
            left_out += 1
            if REDACTED not in text:
                held_texts.append(text)
            continue
        if REDACTED in text:
            redacted += 1
            continue
        split = split_of(f"openi-language-{report.report_id}", (1 - val_ratio, val_ratio, 0.0))
        (val if split == "val" else train).append(text)
    return ReportCorpus(train, val, left_out, redacted, held_texts)

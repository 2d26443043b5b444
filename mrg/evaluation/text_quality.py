"""Does generated text read like a radiology report? Six counts a reader notices at once.

* ``vocabulary_share``: the share of generated words (lower-case letter runs, headers
  excluded) that occur at least ``min_count`` times in the OpenI report corpus;
* ``demographics``: reports that mention age, sex or other demographics (a chest X-ray
  report has no business inventing "a 45-year-old male");
* ``malformed_headers``: reports that are not exactly ``FINDINGS: …⏎IMPRESSION: …``, each
  header once, spelled so, each section non-empty;
* ``loops``: reports in which some word 3-gram occurs three times or more;
* ``prior_comparisons``: reports that compare with a prior study ("unchanged", "interval",
  "stable", "previous", "compared" …): no prior study is ever given, so the claim is invented;
* ``contradictions``: reports that affirm and negate the same finding (the labeler finds a
  positive and a negative mention of one ChestX-ray14 finding). Real OpenI reports do this
  about 3 times in 100, mostly "no right effusion, small left effusion".

Real reports are measured the same way as a reference (``corpus_counts`` of the same text).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from mrg.data.reports import iter_openi_reports
from mrg.text.labeler import LABEL_MAPS, NEGATIVE, POSITIVE, ReportLabeler
from mrg.text.sections import FINDINGS, IMPRESSION, format_report
from mrg.text.vocabulary import HEADER, PRIOR_COMPARISON, word_counts, words

DEMOGRAPHICS = re.compile(
    r"\b(\d+[- ]?(year|yr|month)s?[- ]?old|years? old|male|female|man|woman|men|women|boy|girl|"
    r"gentleman|lady|he|she|his|her|sex|gender|race|ethnicity|caucasian|african[- ]american|"
    r"hispanic|asian)\b",
    re.IGNORECASE,
)
WELL_FORMED = re.compile(rf"{FINDINGS} \S[^\n]*\n{IMPRESSION} \S[^\n]*")


def corpus_counts(reports_source: str | Path) -> Counter:
    """Word counts over every OpenI report with FINDINGS and IMPRESSION."""
    return word_counts(
        format_report(report.findings, report.impression)
        for report in iter_openi_reports(reports_source)
        if report.findings and report.impression
    )


def well_formed(text: str) -> bool:
    return bool(WELL_FORMED.fullmatch(text.strip())) and len(HEADER.findall(text)) == 2


def has_loop(text: str, n: int = 3, times: int = 3) -> bool:
    tokens = words(text)
    grams = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return any(count >= times for count in grams.values())


def contradicted(text: str, labeler: ReportLabeler) -> list[str]:
    """The ChestX-ray14 findings ``text`` both affirms and negates (``labeler.mentions``)."""
    status: dict[str, set[str]] = {}
    for mention in labeler.mentions(text):
        status.setdefault(mention.concept, set()).add(mention.status)
    return [
        finding
        for finding, concepts in LABEL_MAPS["chestxray14"].items()
        if any({POSITIVE, NEGATIVE} <= status.get(c, set()) for c in concepts)
    ]


@dataclass
class TextQuality:
    reports: int
    vocabulary_share: float
    demographics: int
    malformed_headers: int
    loops: int
    prior_comparisons: int = 0
    contradictions: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def text_quality(
    texts: Sequence[str], counts: Counter, min_count: int = 5, labeler: ReportLabeler | None = None
) -> TextQuality:
    """The six counts over ``texts`` (contradictions need the ``labeler``; 0 without it)."""
    generated = [w for text in texts for w in words(text)]
    known = sum(counts[w] >= min_count for w in generated)
    return TextQuality(
        reports=len(texts),
        vocabulary_share=known / len(generated) if generated else 0.0,
        demographics=sum(bool(DEMOGRAPHICS.search(t)) for t in texts),
        malformed_headers=sum(not well_formed(t) for t in texts),
        loops=sum(has_loop(t) for t in texts),
        prior_comparisons=sum(bool(PRIOR_COMPARISON.search(t)) for t in texts),
        contradictions=sum(bool(contradicted(t, labeler)) for t in texts) if labeler else 0,
    )


def quality_table(rows: dict[str, TextQuality]) -> str:
    """Markdown: one row per source of text."""
    lines = [
        (
            "| text | reports | words seen ≥ 5× in OpenI | demographics | malformed headers | "
            "3-gram loops | prior-study claims | affirm and negate |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, q in rows.items():
        lines.append(
            f"| {name} | {q.reports} | {q.vocabulary_share:.3f} | {q.demographics} | "
            f"{q.malformed_headers} | {q.loops} | {q.prior_comparisons} | {q.contradictions} |"
        )
    return "\n".join(lines) + "\n"


def examples_of_failures(texts: Iterable[str], limit: int = 3) -> list[str]:
    """A few texts that fail any check, for reading."""
    return [t for t in texts if DEMOGRAPHICS.search(t) or not well_formed(t) or has_loop(t)][:limit]

"""The report vocabulary: the words a report may use (R2Gen's closed vocabulary, for an LLM).

R2Gen's decoder can write only the words seen at least 3 times in its training reports. A
frozen LLM knows every word, and a softly prompted one writes misspellings ("cardiomegmal")
and chatbot words ("rehab", "treated"). A model trained on report text keeps the words seen at
least ``MIN_COUNT`` times in it (``report_vocabulary``), saved beside its weights as
``VOCABULARY_NAME``; decoding (``mrg.model.decoding.ClosedVocabulary``) then writes no other
word. A word is a run of lower-case letters, section headers removed; digits and punctuation
are not words.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

VOCABULARY_NAME = "report_vocabulary.txt"
MIN_COUNT = 5  # the text-quality floor's count: "words seen ≥ 5× in OpenI"
WORD = re.compile(r"[a-z]+")
HEADER = re.compile(r"\b(findings|impression)\s*:", re.IGNORECASE)
HEADER_WORDS = frozenset({"findings", "impression"})
# Words that compare with a prior study: no prior study is ever given, so a report that uses
# them invents one. Kept out of every report vocabulary (and counted by the text-quality floor).
PRIOR_COMPARISON = re.compile(
    r"\b(unchanged|interval\w*|prior|stable|stably|previous\w*|compared?|comparison|"
    r"again (?:seen|noted|demonstrated)|no change|redemonstrat\w*|persist\w*|since|"
    r"improv\w*|worsen\w*|resolv\w*|remain\w*|increasing|decreasing|developing|evolving|now)\b",
    re.IGNORECASE,
)


def words(text: str) -> list[str]:
    """Lower-case words of ``text`` without the section headers."""
    return WORD.findall(HEADER.sub(" ", text).lower())


def word_counts(texts: Iterable[str]) -> Counter:
    counts: Counter = Counter()
    for text in texts:
        counts.update(words(text))
    return counts


def report_vocabulary(texts: Iterable[str], min_count: int = MIN_COUNT) -> frozenset[str]:
    """The words seen at least ``min_count`` times in ``texts``, less those that compare with
    a prior study (``PRIOR_COMPARISON``)."""
    return frozenset(
        w for w, n in word_counts(texts).items() if n >= min_count and not PRIOR_COMPARISON.match(w)
    )


def write_vocabulary(path: str | Path, vocabulary: Iterable[str]) -> Path:
    """One word a line, sorted."""
    path = Path(path)
    path.write_text("".join(f"{w}\n" for w in sorted(vocabulary)))
    return path


def read_vocabulary(path: str | Path) -> frozenset[str]:
    return frozenset(line.strip() for line in Path(path).read_text().splitlines() if line.strip())

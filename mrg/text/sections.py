"""Report sections: the ``FINDINGS: …⏎IMPRESSION: …`` form the model learns and reads back.

``format_report`` writes the training target; ``split_sections`` splits any text, including a
partial stream cut mid-word, into the two sections without ever showing a half-typed header.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FINDINGS, IMPRESSION = "FINDINGS:", "IMPRESSION:"
_HEADER = re.compile(r"\b(FINDINGS|IMPRESSION)\s*:", re.IGNORECASE)


@dataclass(frozen=True)
class Sections:
    findings: str = ""
    impression: str = ""


def format_report(findings: str, impression: str) -> str:
    """``FINDINGS: f⏎IMPRESSION: i``, omitting an empty section.

    The newline is the section break the decoder relies on (``mrg.model.decoding``): it
    occurs nowhere else in a report, so the model learns it only before IMPRESSION.
    """
    parts = []
    if findings.strip():
        parts.append(f"{FINDINGS} {findings.strip()}")
    if impression.strip():
        parts.append(f"{IMPRESSION} {impression.strip()}")
    return "\n".join(parts)


def _partial_header_len(text: str) -> int:
    """Length of a trailing upper-case header prefix (e.g. ``"IMPRES"``) still being typed."""
    for header in (IMPRESSION, FINDINGS):
        for size in range(len(header) - 1, 0, -1):
            if text.endswith(header[:size]) and (
                len(text) == size or not text[-size - 1].isalnum()
            ):
                return size
    return 0


def split_sections(text: str) -> Sections:
    """Split report text into findings and impression.

    Text before any header counts as findings. A header's trailing partial prefix (a stream
    cut at ``… IMPRES``) is held back so the findings box never shows it.
    """
    text = text[: len(text) - _partial_header_len(text)]
    findings: list[str] = []
    impression: list[str] = []
    current = findings
    position = 0
    for match in _HEADER.finditer(text):
        current.append(text[position : match.start()])
        current = impression if match.group(1).upper() == "IMPRESSION" else findings
        position = match.end()
    current.append(text[position:])
    return Sections(" ".join(" ".join(findings).split()), " ".join(" ".join(impression).split()))

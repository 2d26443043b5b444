"""Report text cleaning: R2Gen's (for comparable metrics), a display form, sentences.

``clean_report_iu_xray`` and ``clean_report_mimic_cxr`` reproduce R2Gen's
``Tokenizer.clean_report_*`` character for character (including its quirk of keeping empty
sentences: R2Gen's filter compares a string with ``[]`` and so never drops anything).
Metrics computed on this text are comparable with R2Gen, R2GenCMN and R2GenGPT.
"""

from __future__ import annotations

import re

_R2GEN_PUNCT = re.compile("[.,?;*!%^&_+():-\\[\\]{}]")  # R2Gen's class, ':-\\[' is a range ':'..'['
_NUMBERED = (("1. ", ""), (". 2. ", ". "), (". 3. ", ". "), (". 4. ", ". "), (". 5. ", ". "))
_NUMBERED += ((" 2. ", ". "), (" 3. ", ". "), (" 4. ", ". "), (" 5. ", ". "))


def _r2gen_sentence(sentence: str) -> str:
    text = (
        sentence.replace('"', "")
        .replace("/", "")
        .replace("\\", "")
        .replace("'", "")
        .strip()
        .lower()
    )
    return _R2GEN_PUNCT.sub("", text)


def _r2gen_join(text: str) -> str:
    for old, new in _NUMBERED:
        text = text.replace(old, new)
    return " . ".join(_r2gen_sentence(s) for s in text.strip().lower().split(". ")) + " ."


def clean_report_iu_xray(report: str) -> str:
    """R2Gen's IU X-ray cleaning: lower case, punctuation removed, sentences joined by ' . '."""
    for _ in range(3):
        report = report.replace("..", ".")
    return _r2gen_join(report)


def clean_report_mimic_cxr(report: str) -> str:
    """R2Gen's MIMIC-CXR cleaning: as IU X-ray, after collapsing newlines, underscores and spaces."""
    report = report.replace("\n", " ")
    for _ in range(7):
        report = report.replace("__", "_")
    for _ in range(6):
        report = report.replace("  ", " ")
    for _ in range(8):
        report = report.replace("..", ".")
    return _r2gen_join(report)


CLEANERS = {"iu_xray": clean_report_iu_xray, "mimic_cxr": clean_report_mimic_cxr}


REDACTED = "[redacted]"


def display_form(text: str) -> str:
    """Readable text: case and punctuation kept, whitespace collapsed, OpenI's 'XXXX' redactions marked."""
    text = re.sub(r"\bX{2,}\b", REDACTED, text)
    return " ".join(text.split())


_ABBREVIATIONS = {"dr.", "mr.", "mrs.", "ms.", "vs.", "e.g.", "i.e.", "st.", "approx."}
_LIST_NUMBER = re.compile(r"\d+\.")


def split_sentences(text: str) -> list[str]:
    """Sentences of display-form text.

    A sentence ends at a word ending in . ! or ? when the next word starts with a capital, a
    digit or a bracket, unless the word is a list number ("1.") or a known abbreviation.
    """
    words = text.split()
    sentences: list[str] = []
    current: list[str] = []
    for word, following in zip(words, words[1:] + [""]):
        current.append(word)
        ends = (
            word[-1] in ".!?"
            and word.lower() not in _ABBREVIATIONS
            and not _LIST_NUMBER.fullmatch(word)
        )
        if (
            following
            and ends
            and (following[0].isupper() or following[0].isdigit() or following[0] in "[(")
        ):
            sentences.append(" ".join(current))
            current = []
    if current:
        sentences.append(" ".join(current))
    return sentences

"""Where the next token of a report being written goes: ``position`` reads a row's text back
to its section's start (a header's colon or a newline) and returns the ``Position`` that the
closed vocabulary (``mrg.model.closed_vocabulary``) tests each candidate token at."""

from __future__ import annotations

import re
from dataclasses import dataclass

from mrg.text.states import FINDING_PREFIXES, NEGATIONS, described

OPEN_WORD = re.compile(r"[A-Za-z]*$")
SENTENCE_END = re.compile(r"[.!?:\n]")
SECTION_START = re.compile(r"[:\n]")
GLUED = re.compile(r"[.!?:]$")  # punctuation that the next word would touch
# the words before a sentence's subject ("The right lung is clear." after "The lungs are clear.")
SUBJECT_MODIFIERS = frozenset({"the", "right", "left", "both", "bilateral", "upper", "lower"})


@dataclass(frozen=True)
class Position:
    """Where the next token goes: the word before the open one (None after punctuation),
    whether the sentence so far negates, the letters of the open word, the sentence's words
    so far, whether the open word is the sentence's first, and whether the text ends with
    punctuation that a letter would touch ("normal.Density"); and what the section's earlier
    sentences hold: whether the open word is the sentence's subject (its first word, or the
    one after ``SUBJECT_MODIFIERS``: "The right lung"), the parts of the chest they describe
    (``TOPICS``) and the beginnings of the finding names they hold (``FINDING_PREFIXES``)."""

    previous: str | None = None
    negated: bool = False
    open_word: str = ""
    sentence: frozenset[str] = frozenset()
    opening: bool = True
    glued: bool = False
    subject: bool = True
    described: frozenset[str] = frozenset()
    named: frozenset[str] = frozenset()


SENTENCE_START = Position()  # a section's first sentence, before its first word


def position(pieces: list[str], ids: list[int], limit: int = 192) -> Position:
    """The ``Position`` at the end of ``ids``, read back to the start of the section (a
    header's colon or a newline; or ``limit`` tokens), however many tokens the open word
    spans."""
    tail = ""
    for token in reversed(ids[-limit:]):
        tail = pieces[token] + tail
        if SECTION_START.search(tail):
            break
    *earlier, sentence = SENTENCE_END.split(SECTION_START.split(tail)[-1])
    open_word = OPEN_WORD.search(sentence).group()
    before = sentence[: len(sentence) - len(open_word)]
    previous = re.search(r"([A-Za-z]+) +$", before)
    ordered = [w.lower() for w in re.findall(r"[A-Za-z]+", before)]
    words = frozenset(ordered)
    previous_word = previous.group(1).lower() if previous else None
    said = [w.lower() for w in re.findall(r"[A-Za-z]+", " ".join(earlier))]
    return Position(
        previous_word,
        bool(words & NEGATIONS),
        open_word,
        words,
        opening=not words,
        glued=bool(GLUED.search(tail)),
        subject=all(w in SUBJECT_MODIFIERS for w in ordered),
        described=described(said),
        named=frozenset(p for p in FINDING_PREFIXES if any(w.startswith(p) for w in said)),
    )

"""Report phrasing: a word trigram model of report text, how radiologists say what they say.

The frozen 135M LLM, softly prompted, writes the report's content in its own words: "The heart is
normal in size and appearance. The air is clear." and "No acute cardiopulmonary
abnormalities." where reports say "The lungs are clear." and "abnormality". ``Phrasing`` counts
the word trigrams of a model's training reports (saved beside its weights as ``PHRASING_NAME``)
and scores text with interpolated absolute discounting (Ney, Essen and Kneser 1994):

    P₃(w | u, v) = max(c(u v w) − D, 0) / c(u v ·) + D · N(u v ·) / c(u v ·) · P₂(w | v)
    P₂(w | v)    = max(c(v w) − D, 0) / c(v ·)     + D · N(v ·) / c(v ·)     · P₁(w)
    P₁(w)        = (c(w) + 1) / (N + |V|)

where c counts, N(x ·) is the number of distinct words after x, N the tokens and V the words
seen. A token is a lower-case word, "." or ","; each section runs from ``START`` to ``END``;
any other character but a space scores as a word never seen.
Decoding types a word a few sub-word tokens at a time, so ``mass`` gives the probability of
the next word beginning with a prefix (the sum over the words that do), and ``increment`` the
change in log-probability that one more piece of text makes: summed over a word's pieces it
is the word's log-probability (``mrg.model.phrasing_fusion`` adds it to the LLM's scores).
"""

from __future__ import annotations

import bisect
import json
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from mrg.text.sections import split_sections

PHRASING_NAME = "report_phrasing.json"
START, END = "<s>", "</s>"
DISCOUNT = 0.75
_TOKENS = re.compile(r"[a-z]+|[.,]")
_PIECE = re.compile(r"[a-z]+|[.,]|\n|[^a-z.,\n]")

Context = tuple[str, str]  # the two tokens before the next one


def tokens(section: str) -> list[str]:
    """The tokens of one section's text: lower-case words, full stops and commas."""
    return _TOKENS.findall(section.lower())


class _Next:
    """The words seen after one context, sorted, with their cumulative discounted counts: the
    discounted count of every word with a prefix is one difference of two sums."""

    def __init__(self, counts: dict[str, int], discount: float):
        self.counts, self.discount = counts, discount
        self.words = sorted(counts)
        self.cumulative = [0.0]
        for w in self.words:
            self.cumulative.append(self.cumulative[-1] + max(counts[w] - discount, 0.0))
        self.seen = sum(counts.values())
        self.backoff = discount * len(counts) / self.seen  # the mass left to the lower order

    def kept(self, prefix: str, whole: bool) -> float:
        """Σ max(c(w) − D, 0) over the words ``w`` beginning with ``prefix`` (or equal to it)."""
        if whole:
            return max(self.counts.get(prefix, 0) - self.discount, 0.0)
        lo = bisect.bisect_left(self.words, prefix)
        hi = bisect.bisect_left(self.words, prefix + "\x7f")
        return self.cumulative[hi] - self.cumulative[lo]


class WordPairs:
    """The word pairs of a report corpus: after each word, the words its reports wrote next.
    Hashed by identity (one per ``Phrasing``), so that a decoding cache may key on it."""

    def __init__(self, after: dict[str, frozenset[str]]):
        self.after = after

    def unseen_after(self, word: str, vocabulary: frozenset[str]) -> frozenset[str]:
        """The words of ``vocabulary`` the reports never wrote right after ``word`` (none for a
        word the reports never wrote: nothing is known of it)."""
        return _unseen_after(self, word, vocabulary)


@lru_cache(maxsize=4096)
def _unseen_after(pairs: WordPairs, word: str, vocabulary: frozenset[str]) -> frozenset[str]:
    followers = pairs.after.get(word)
    return frozenset() if followers is None else vocabulary - followers


class Phrasing:
    """Trigram counts of report sections and the discounted model over them (module docstring)."""

    def __init__(self, trigrams: dict[str, dict[str, int]], discount: float = DISCOUNT):
        if not 0 < discount < 1 or not any(trigrams.values()):
            raise ValueError(f"phrasing needs counts and 0 < discount < 1, got {discount}")
        self.discount = discount
        self.trigrams = {tuple(k.split(" ")): v for k, v in trigrams.items()}
        bigrams: dict[str, Counter] = defaultdict(Counter)
        unigrams: Counter = Counter()
        for (_, v), nexts in self.trigrams.items():
            bigrams[v].update(nexts)
            unigrams.update(nexts)
        self.unigrams = unigrams
        self.total = sum(unigrams.values())
        self.words = sorted(unigrams)  # for the unigram mass of a prefix: a sorted range
        self._cumulative = [0]
        for w in self.words:
            self._cumulative.append(self._cumulative[-1] + unigrams[w] + 1)
        self._after_word = {v: _Next(dict(c), discount) for v, c in bigrams.items()}
        self._after_pair = {k: _Next(c, discount) for k, c in self.trigrams.items()}
        self.pairs = WordPairs(
            {v: frozenset(filter(str.isalpha, c)) for v, c in bigrams.items() if v.isalpha()}
        )
        self._mass = lru_cache(maxsize=1 << 16)(self._mass_uncached)
        self.increment = lru_cache(maxsize=1 << 16)(self._increment)

    @classmethod
    def from_reports(cls, reports: Iterable[str]) -> Phrasing:
        """Count the trigrams of each report's findings and impression."""
        counts: dict[str, Counter] = defaultdict(Counter)
        for report in reports:
            sections = split_sections(report)
            for text in (sections.findings, sections.impression):
                if not text.strip():
                    continue
                sequence = [START, START, *tokens(text), END]
                for u, v, w in zip(sequence, sequence[1:], sequence[2:]):
                    counts[f"{u} {v}"][w] += 1
        return cls({k: dict(v) for k, v in counts.items()})

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        rows = {" ".join(k): v for k, v in sorted(self.trigrams.items())}
        path.write_text(json.dumps({"discount": self.discount, "trigrams": rows}) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Phrasing:
        data = json.loads(Path(path).read_text())
        return cls(data["trigrams"], data["discount"])

    def _unigram_mass(self, prefix: str) -> float:
        """P₁ summed over the words beginning with ``prefix``."""
        lo = bisect.bisect_left(self.words, prefix)
        hi = bisect.bisect_left(self.words, prefix + "\x7f")
        mass = self._cumulative[hi] - self._cumulative[lo] or 1  # an unseen word: one count
        return mass / (self.total + len(self.words))

    def _mass_uncached(self, context: Context, prefix: str, whole: bool) -> float:
        lower = self._unigram_mass_of(prefix) if whole else self._unigram_mass(prefix)
        for nexts in (self._after_word.get(context[1]), self._after_pair.get(context)):
            if nexts:
                lower = nexts.kept(prefix, whole) / nexts.seen + nexts.backoff * lower
        return lower

    def _unigram_mass_of(self, word: str) -> float:
        return (self.unigrams.get(word, 0) + 1) / (self.total + len(self.words))

    def mass(self, context: Context, prefix: str, whole: bool = False) -> float:
        """P(next token begins with ``prefix`` | ``context``); with ``whole``, P(it is ``prefix``)."""
        return self._mass(context, prefix, whole)

    def _increment(self, context: Context, open_word: str, piece: str) -> float:
        """log P(text + ``piece``) − log P(text), where the text ends with ``context`` and then
        ``open_word`` (letters typed of a word not yet ended, or ""). A newline ends the section."""
        score = -math.log(self.mass(context, open_word)) if open_word else 0.0
        for part in _PIECE.findall(piece.lower()):
            if part.isascii() and part.isalpha():
                open_word += part
                continue
            if open_word:  # any other character ends the word being typed
                score += math.log(self.mass(context, open_word, whole=True))
                context, open_word = (context[1], open_word), ""
            if part in (".", ","):
                score += math.log(self.mass(context, part, whole=True))
                context = (context[1], part)
            elif part == "\n":
                return score + math.log(self.mass(context, END, whole=True))
            elif part != " ":  # a character reports never write ("(", "*", "\x0b"): unseen
                score += math.log(self._unigram_mass_of(part))
        if open_word:
            score += math.log(self.mass(context, open_word))
        return score


def state(section: str) -> tuple[Context, str]:
    """(the two tokens before the word being typed, its letters so far) at the end of
    ``section``'s text."""
    open_word = re.search(r"[A-Za-z]*$", section).group().lower()
    before = tokens(section[: len(section) - len(open_word)])
    context = ([START, START] + before)[-2:]
    return (context[0], context[1]), open_word

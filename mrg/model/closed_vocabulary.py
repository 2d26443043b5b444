"""The closed report vocabulary as a logits processor: only whole words of a report vocabulary.

``ClosedVocabulary`` keeps, of each row's likeliest tokens, those that leave every finished
word in the vocabulary and the open one on the way to a word of it (read back to its first
letter, however many tokens it spans: ``mrg.text.position``); ``Rules`` hold what one study's
report may not write besides (a finding its lead names, a finding it does not state except to
negate it, a global-normal statement beside a present or possible finding, a sentence calling
a named finding's anatomy normal). Across the sentences of a section (``position`` reads back
to its header) a finding is named once and each part of the chest is a sentence's subject
once (``mrg.text.states.TOPICS``). ``_fits`` is the test of one token at one ``Position``,
remembered.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch
from transformers import LogitsProcessor

from mrg.model.decoding import ReportStructure, of_study
from mrg.text.phrasing import WordPairs
from mrg.text.position import (
    GLUED,
    SENTENCE_END,
    SENTENCE_START,
    SUBJECT_MODIFIERS,
    Position,
    position,
)
from mrg.text.states import (
    EXCEPTABLE,
    EXCEPTING,
    FINDING_PREFIXES,
    GLOBAL_NORMAL_PAIRS,
    NEGATIONS,
    restating,
    topic_words,
)
from mrg.text.vocabulary import PRIOR_COMPARISON

_LETTER_RUNS = re.compile(r"[A-Za-z]+|[^A-Za-z]+")
# the abbreviations a report writes in capitals inside a sentence (the views, CT)
ABBREVIATIONS = frozenset({"ap", "pa", "ct"})

# the header word that reports also write in the body ("No acute findings."); the vocabulary
# counts none of the two (every target has both headers), and "Impression." in the body is noise
BODY_HEADER_WORDS = frozenset({"findings"})
Bigrams = frozenset[tuple[str, str]]  # (word, next word) pairs never written
# the characters between words that reports write ("_", a tab, a vertical tab never)
_PUNCTUATION = frozenset(" .,;'()-\n")  # and no "/": "cardio/mediastinal"
_STOPS = frozenset(".,;!?")
# "is no" and "are no" negate only after "there" ("There is no pneumothorax.")
COPULAS, EXISTENTIAL = frozenset({"is", "are"}), "there"
# a word that is one half of a compound a report may write apart: only its other half follows
COMPOUND_HALVES = {"cardio": "mediastinal"}  # "Cardio mediastinal silhouette" (60 in OpenI)


@dataclass(frozen=True)
class Rules:
    """What one study's report may not write, besides words outside the vocabulary:
    ``stated``, prefixes of words never written (the findings its lead named); ``unstated``,
    prefixes of words written only in a sentence that already negates (the findings its
    condition does not state present or possible: "No pleural effusion." yes, "Pleural
    effusion." no); ``bigrams``, (word, next word) pairs never written; ``normal``, (word,
    prefix) pairs: no word with the prefix after the word in one sentence ("heart" …
    "normal…" beside cardiomegaly), though a sentence on the lungs may say ``otherwise``
    ("The lungs are otherwise clear."); ``subjects``, words no sentence opens with (the
    heart beside a named cardiomegaly: ``mrg.text.states.spoken_for``)."""

    stated: frozenset[str] = frozenset()
    unstated: frozenset[str] = frozenset()
    bigrams: Bigrams = frozenset()
    normal: Bigrams = frozenset()
    subjects: frozenset[str] = frozenset()


@lru_cache(maxsize=8)
def writable(vocabulary: frozenset[str]) -> frozenset[str]:
    """The words decoding may write of a report ``vocabulary``: none that compares with a prior
    study, whatever the checkpoint's vocabulary holds, and the body's header word. Remembered:
    every request builds its processors, and one object keeps ``_fits``'s cache keys cheap."""
    kept = frozenset(w for w in vocabulary if not PRIOR_COMPARISON.match(w))
    return kept | BODY_HEADER_WORDS


@lru_cache(maxsize=1024)
def allowed_words(
    vocabulary: frozenset[str],
    stated: frozenset[str] = frozenset(),
    banned: frozenset[str] = frozenset(),
) -> tuple[frozenset[str], frozenset[str]]:
    """(words, their prefixes) of ``vocabulary`` less the words beginning with ``stated`` and
    the words of ``banned``."""
    words = frozenset(
        w for w in vocabulary if not w.startswith(tuple(stated) or "\0") and w not in banned
    )
    return words, frozenset(w[:i] for w in words for i in range(1, len(w) + 1))


@lru_cache(maxsize=1 << 16)
def _fits(
    vocabulary: frozenset[str],
    rules: Rules,
    at: Position,
    piece: str,
    pairs: WordPairs | None = None,
) -> bool:
    """``ClosedVocabulary.fits``, remembered: a report's steps ask about the same few hundred
    (position, token) pairs again and again (5 ms of a 35 ms step before)."""
    if any(map(str.isdigit, piece)) or not piece.isascii() or "  " in piece or ":" in piece:
        return False  # a colon makes a header of its own ("IMPROVEMENT: Cardiomediastinal")
    if piece and not piece.strip(" "):  # a lone space ("a normal  for"): words bring their own
        return False
    if not _PUNCTUATION.issuperset(c for c in piece if not c.isalpha()):
        return False  # "cardio_mediastinal", a tab or vertical tab between sentences
    previous, negated, sentence = at.previous, at.negated, set(at.sentence)
    opening, glued, subject = at.opening, at.glued, at.subject
    runs = _LETTER_RUNS.findall(at.open_word + piece)
    for i, run in enumerate(runs):
        if not run[0].isalpha():
            if "-" in run and (i or at.open_word):  # "air-pulmonary", "well-osseous"
                return False
            stops = sum(c in _STOPS for c in run)
            if stops and (glued or stops > 1 or previous in COMPOUND_HALVES):
                return False  # "No acute cardio..", "normal. .", "cardio."
            if SENTENCE_END.search(run):
                negated, sentence, opening, subject = False, set(), True, True
            if run.strip():  # punctuation ends the phrase a bigram belongs to
                previous = None
            glued = bool(GLUED.search(run))
            continue
        banned = _banned(vocabulary, rules, previous, at.described if subject else None, pairs)
        excepted = EXCEPTABLE if EXCEPTING in sentence else frozenset()
        normal = (b for a, b in rules.normal if a in sentence and a not in excepted)
        named = frozenset(p for p in FINDING_PREFIXES if any(w.startswith(p) for w in sentence))
        stated = rules.stated | frozenset(normal) | named | at.named
        stated |= restating(named | at.named | rules.stated)  # and the lead's, after or not
        stated = stated if negated else stated | rules.unstated
        words, prefixes = allowed_words(vocabulary, stated, banned)
        if glued or not _case_fits(run, opening, words, open_=i == len(runs) - 1):
            return False  # "normal.Density", "No Acute", "IMPROVED", "volumE", "cardiac A…"
        word = run.lower()
        if i == len(runs) - 1:
            return word in prefixes and not _only_toward(words, word, previous)
        if word not in words or word == previous:  # "otherwise otherwise", "pleural pleural"
            return False
        if word == "no" and previous in COPULAS and EXISTENTIAL not in sentence:
            return False  # "The cardiomediastinal silhouette is no pneumothorax"
        previous, opening, subject = word, False, subject and word in SUBJECT_MODIFIERS
        negated = negated or previous in NEGATIONS
        sentence.add(previous)
    return True


@lru_cache(maxsize=256)
def _describing(rules: Rules) -> Rules:
    """``rules`` in the findings: no global-normal statement there, whatever the states."""
    return dataclasses.replace(rules, bigrams=rules.bigrams | GLOBAL_NORMAL_PAIRS)


@lru_cache(maxsize=4096)
def _only_toward(words: frozenset[str], prefix: str, previous: str | None) -> bool:
    """Whether every word of ``words`` that begins with ``prefix`` is ``previous``: the open
    word could only become the word just written ("osse" after "osseous"), a dead end."""
    if previous is None or not previous.startswith(prefix):
        return False
    return not any(w != previous and w.startswith(prefix) for w in words)


@lru_cache(maxsize=4096)
def _banned(
    vocabulary: frozenset[str],
    rules: Rules,
    previous: str | None,
    subject: frozenset[str] | None,
    pairs: WordPairs | None,
) -> frozenset[str]:
    """The words that may not follow ``previous``: the rules' bigrams, all but the other half
    of a compound ("cardio" "mediastinal", never "cardio pulmonary"), the words the phrasing
    model's reports never wrote after it ("within normal limited"); and where the word is the
    sentence's subject (``subject``: the parts described already; None elsewhere), the parts
    described already and those a finding's sentence speaks for. Remembered: one object per
    position, so ``allowed_words``'s key hashes once (the last resort asks ~49k tokens at one
    position)."""
    banned = frozenset(b for a, b in rules.bigrams if a == previous)
    if previous in COMPOUND_HALVES:
        banned |= vocabulary - {COMPOUND_HALVES[previous]}
    if pairs is not None and previous is not None:
        banned |= pairs.unseen_after(previous, vocabulary)
    if subject is not None:
        banned |= rules.subjects | topic_words(subject)
    return banned


def _case_fits(run: str, opening: bool, words: frozenset[str], open_: bool) -> bool:
    """Whether the letters ``run`` are cased as a report writes a word: small; Capitalised
    where it opens a sentence; or in capitals being (or, ``open_``, on the way to) one of the
    ``ABBREVIATIONS`` that ``words`` allow here ("No acute cardiac A…": none follows
    "cardiac")."""
    if run.islower() or opening and run[0].isupper() and (run[1:].islower() or len(run) == 1):
        return True
    small = run.lower()
    if not run.isupper():
        return False
    allowed = ABBREVIATIONS & words
    return any(a.startswith(small) for a in allowed) if open_ else small in allowed


@lru_cache(maxsize=4096)
def _fitting_anywhere(
    structure: ReportStructure,
    vocabulary: frozenset[str],
    rules: Rules,
    at: Position,
    pairs: WordPairs | None,
) -> tuple[int, ...]:
    """Every token of the tokenizer that ``_fits`` at ``at``: the last resort where none of
    the most likely does (tens of ms, once per position)."""
    return tuple(
        t for t, piece in enumerate(structure.pieces) if _fits(vocabulary, rules, at, piece, pairs)
    )


class ClosedVocabulary(LogitsProcessor):
    """Masks every token that would make a word outside ``vocabulary``: a whole-word constraint.

    Of each row's ``top_k`` most likely tokens, those are kept whose text, appended to the
    word being written (read back to its first letter, however many tokens it spans), leaves
    every finished word in ``vocabulary`` and the open one a prefix of a word in it; all other
    tokens get −∞. Punctuation is what reports write between words (" .,;'()-" and a
    newline); digits and non-ASCII letters are never written
    (nothing here measures a size or knows a date), nor a lone or doubled space, nor a colon
    (a header of its own: "IMPROVEMENT: Cardiomediastinal"), nor a word touching the full stop
    before it ("normal.Density"), nor a word that compares with a prior study
    (``PRIOR_COMPARISON``: "improved", "remains"), nor a Capitalised word inside a sentence or
    one in capitals longer than an abbreviation ("No Acute", "IMPROVED"), nor a word in mixed
    case ("volumE", "IMPRESSIOn"), nor the word just written again ("otherwise otherwise"),
    nor a hyphen joining words (the report vocabulary holds single words: "air-pulmonary",
    "well-osseous"), nor punctuation reports do not write between words ("_", "/", a tab),
    nor a stop after a stop ("cardio.."), nor "is no" but after "there" ("The
    cardiomediastinal silhouette is no pneumothorax"), nor a finding named a second time in the
    section ("No pneumothorax or pleural effusion. … No pneumothorax."), nor a sentence opening
    on a part of the chest an earlier one described ("The heart is normal in size. … The
    cardiomediastinal silhouette is normal."). With ``pairs`` (the phrasing model's word pairs,
    ``mrg.text.phrasing.WordPairs``) no word follows another that the reports never wrote
    after it ("within normal limited", "The aorta is a normal central airways"). Where none of
    the ``top_k`` fits, the ``wider_k`` most likely are tried (the n-gram ban may have
    removed the likely ending of a word), then every token of the tokenizer, even one the
    n-gram ban took: a word is never left unfinished or misspelt (and where none fits under
    the study's rules and the word pairs, one that fits the vocabulary and the form alone).

    ``forced`` (``ReportStructureProcessor.forced``) names the rows whose next token is forced:
    they are left as they are (a lead's "Cardiomegaly." fits none of the rules that follow it,
    and searching every token there took half of a batch's decoding time). ``opening``
    (``NormalAnatomy.next``) names the token a row's opener favours next: it is kept whatever
    the rules say ("No acute bony", where the findings write "No acute" nowhere else).

    ``rules`` (one ``Rules`` per study, rows laid out as ``ReportStructureProcessor``'s leads)
    hold what else the study's report may not write: after its lead, no word naming a finding
    the lead named, in any words ("Cardiomegaly. No acute cardiomegaly.", "The heart is
    large." beside "Possible cardiomegaly."), nor a sentence on the part its sentence speaks
    for (the heart); a finding its condition does not state present or possible only in a
    sentence that negates; beside a present or possible finding no global-normal statement
    (``mrg.text.states.GLOBAL_NORMAL_BIGRAMS``; in the findings never, whatever the states: the
    conclusion is the impression's, and "No acute cardiopulmonary abnormality." at the end of
    the findings left the impression "No active disease."), and beside a pleural one no "pleural
    disease"; and beside a present or possible finding no sentence calling its anatomy normal
    (``NORMAL_ANATOMY``)."""

    def __init__(
        self,
        structure: ReportStructure,
        vocabulary: frozenset[str],
        rules: list[Rules] | None = None,
        top_k: int = 64,
        wider_k: int = 1024,
        pairs: WordPairs | None = None,
        forced: Callable[[list[int], int, int], int | None] | None = None,
        opening: Callable[[list[int], int, int], int | None] | None = None,
    ):
        self.structure, self.rules, self.pairs, self.forced = structure, rules, pairs, forced
        self.opening = opening
        self.top_k, self.wider_k = top_k, wider_k
        self.vocabulary = writable(frozenset(vocabulary))
        excepting = structure.tokenizer(f" {EXCEPTING}", add_special_tokens=False)["input_ids"]
        self.excepting = excepting[0] if len(excepting) == 1 else None

    def fits(self, piece: str, at: Position = SENTENCE_START, rules: Rules = Rules()) -> bool:
        """Whether ``piece`` may be written at ``at`` under ``rules``."""
        return _fits(self.vocabulary, rules, at, piece, self.pairs)

    def _anywhere(self, at: Position, rules: Rules) -> tuple[int, ...]:
        """Every token that fits at ``at``; where none does under the study's ``rules`` and
        the word pairs, every token that fits the vocabulary and the form alone (never seen
        where the LLM chooses; a row left unmasked would write anything)."""
        fitting = _fitting_anywhere(self.structure, self.vocabulary, rules, at, self.pairs)
        return fitting or _fitting_anywhere(self.structure, self.vocabulary, Rules(), at, None)

    def _excepting(
        self, scores: torch.Tensor, keep: list[int], at: Position, rules: Rules
    ) -> list[int]:
        """``keep``, or " otherwise" alone where the LLM's first choice calls the anatomy of a
        stated finding normal ("The lungs are clear" beside an infiltrate): "The lungs are
        otherwise clear" is the sentence it meant, consistent with the finding."""
        top = int(scores.argmax())
        pieces = self.structure.pieces
        if (
            top in keep
            or not at.sentence & EXCEPTABLE
            or not self.fits(pieces[top], at, dataclasses.replace(rules, normal=frozenset()))
        ):
            return keep
        return [self.excepting] if self.fits(pieces[self.excepting], at, rules) else keep

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        pieces = self.structure.pieces
        for row, row_ids in enumerate(input_ids.tolist()):
            if self.forced is not None and self.forced(row_ids, row, len(input_ids)) is not None:
                continue  # a header's or a lead's token: overwritten after, and often banned here
            rules = of_study(self.rules, row, len(input_ids)) if self.rules else Rules()
            if self.structure.impression_start(row_ids) is None:  # the findings describe
                rules = _describing(rules)
            at = position(pieces, row_ids)
            # only the rules' subjects of the sentence matter: the rest would split the cache
            subjects = frozenset(a for a, _ in rules.normal) | {EXCEPTING, EXISTENTIAL}
            names = frozenset(w for w in at.sentence if w.startswith(FINDING_PREFIXES))
            at = dataclasses.replace(at, sentence=at.sentence & subjects | names)
            keep = []
            for k in (self.top_k, self.wider_k):  # wider: the likely ending may be banned
                top = scores[row].topk(min(k, scores.shape[1]))
                alive = top.indices[torch.isfinite(top.values)].tolist()
                keep = [t for t in alive if self.fits(pieces[t], at, rules)]
                if keep:
                    break
            if not keep:
                anywhere = torch.tensor(self._anywhere(at, rules), dtype=torch.long)
                alive = torch.isfinite(scores[row, anywhere.to(scores.device)]).cpu()
                keep = anywhere[alive].tolist()
                if not keep and len(anywhere):  # the n-gram ban took the only endings
                    scores[row].fill_(float("-inf"))
                    scores[row, anywhere.to(scores.device)] = 0.0
                    continue
            if rules.normal and self.excepting is not None:
                keep = self._excepting(scores[row], keep, at, rules)
            opener = self.opening(row_ids, row, len(input_ids)) if self.opening else None
            if opener is not None and opener not in keep:
                keep.append(opener)
            if keep:
                kept = scores[row, keep].clone()
                scores[row].fill_(float("-inf"))
                scores[row, keep] = kept
        return scores

"""Report-structured decoding: logits processors that make every answer a well-formed report.

An answer is ``FINDINGS: …⏎IMPRESSION: …`` and nothing else:

* the first tokens are forced to ``FINDINGS:``, and the first token after a header starts
  with a space, as in every training target; a findings-conditioned report's findings
  sentences (``leads``: one per present or possible finding) are forced after ``FINDINGS:``
  and make its impression;
* in the findings, a newline or EOS never appears as such: their probability is the
  probability of closing the findings, and it moves to the forced ``⏎IMPRESSION:`` header
  (which is also forced once only ``reserve`` tokens of the budget are left); a section
  closes only after its first word;
* in the impression, the probability of a newline moves to EOS, so the report stops at the
  end of the impression (and not before its first token);
* no section writes a header of its own: ``:`` is banned right after "findings" or
  "impression";
* the repetition penalty and the n-gram ban see the body only (``OnBody``), so the headers
  are never penalised ("ImpressION:") and never make body tokens look repeated;
* with a report vocabulary (``mrg.text.vocabulary``), no word outside it is written: the
  constraint sees the whole word being built, not one sub-word token (``ClosedVocabulary``),
  and after a present finding no global-normal statement is begun ("No acute
  cardiopulmonary abnormality": ``mrg.text.states.GLOBAL_NORMAL_BIGRAMS``).

Every processor reads its state from each row's generated ids and keeps none, so the same
list serves greedy, sampling and beam search, in ``generate`` and in the streaming loop.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from functools import lru_cache

import torch
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerBase

from mrg.text.sections import FINDINGS, format_report
from mrg.text.states import NEGATIONS
from mrg.text.vocabulary import HEADER_WORDS

_HEADER_WORD_AT_END = re.compile(r"(findings|impression)\s*$", re.IGNORECASE)
_LETTER_RUNS = re.compile(r"[A-Za-z]+|[^A-Za-z]+")
_OPEN_WORD = re.compile(r"[A-Za-z]*$")
_CAPITAL_AFTER_SMALL = re.compile(r"[a-z][A-Z]")


class ReportStructure:
    """The header token ids of a tokenizer, and the vocabulary's newline and colon tokens."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_id: int):
        encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]
        self.tokenizer, self.eos_id = tokenizer, eos_id
        self.findings = encode(FINDINGS)
        # The impression header as a training target tokenizes it: after a sentence (alone,
        # a SentencePiece tokenizer would prefix the newline with a space token).
        before = encode(format_report("Normal.", ""))
        whole = encode(format_report("Normal.", "x"))[: -len(encode(" x"))]
        if whole[: len(before)] != before:
            raise ValueError("the tokenizer merges the findings' last token with the newline")
        self.impression = whole[len(before) :]
        pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        special = set(tokenizer.all_special_ids) | {eos_id}
        # what each token adds to the text; a special token ends a word
        self.pieces = ["\n" if i in special else p for i, p in enumerate(pieces)]
        self.newline_ids = torch.tensor(
            [i for i, p in enumerate(pieces) if "\n" in p or "\r" in p], dtype=torch.long
        )
        self.colon_ids = torch.tensor(
            [i for i, p in enumerate(pieces) if p.lstrip().startswith(":")], dtype=torch.long
        )
        self.not_spaced = torch.tensor([not (p[:1] == " " and p[1:2].strip()) for p in pieces])
        if self.impression[0] not in set(self.newline_ids.tolist()):
            raise ValueError("the tokenizer merges the newline before IMPRESSION with other text")

    def impression_start(self, ids: list[int]) -> int | None:
        """Index of the ``⏎IMPRESSION:`` header in ``ids`` (its newline occurs nowhere else)."""
        try:
            return ids.index(self.impression[0], len(self.findings))
        except ValueError:
            return None

    def body_ids(self, ids: list[int]) -> list[int]:
        """``ids`` without the two headers: the words the model chose."""
        start = self.impression_start(ids)
        if start is None:
            return ids[len(self.findings) :]
        return ids[len(self.findings) : start] + ids[start + len(self.impression) :]

    def ends_with_header_word(self, ids: list[int]) -> bool:
        return bool(_HEADER_WORD_AT_END.search(self.tokenizer.decode(ids[-4:])))


@lru_cache(maxsize=4)
def report_structure(tokenizer: PreTrainedTokenizerBase, eos_id: int) -> ReportStructure:
    """One ``ReportStructure`` per tokenizer (decoding the vocabulary takes a moment)."""
    return ReportStructure(tokenizer, eos_id)


def of_study(per_study: list, row: int, rows: int):
    """The entry of ``per_study`` for batch ``row`` of ``rows``: each study has ``rows //
    len(per_study)`` consecutive rows (one, or a beam's)."""
    return per_study[row // max(1, rows // len(per_study))]


def _force(scores: torch.Tensor, token: int) -> None:
    scores.fill_(float("-inf"))
    scores[token] = 0.0


class ReportStructureProcessor(LogitsProcessor):
    """Forces the headers and decides where each section ends (see the module docstring).

    ``leads`` (one list of token ids per study; rows ``i·r … i·r + r − 1`` of a batch with
    ``r`` rows per study, as beam search lays them out) are forced right after ``FINDINGS:``,
    where the LLM continues them, and make the whole impression: the impression of a report
    that names findings is their sentences (the LLM's own impressions after them were measured
    to call them "unremarkable" and, after the states, "Tuberculosis." in 33 of 98 test
    reports). A report that names none is written freely."""

    def __init__(
        self,
        structure: ReportStructure,
        max_new_tokens: int,
        reserve: int = 16,
        leads: list[list[int]] | None = None,
    ):
        self.structure, self.max_new_tokens, self.reserve = structure, max_new_tokens, reserve
        self.leads = leads

    def _lead(self, row: int, rows: int) -> list[int]:
        """The findings' sentences of ``row`` ([] where there are none)."""
        if not self.leads:
            return []
        return of_study(self.leads, row, rows)

    def forced(self, row_ids: list[int], row: int, rows: int) -> int | None:
        """The token ``row`` must take next whatever the LLM says: a header's, a lead's, or
        the end after a lead's impression; None where the LLM chooses."""
        s = self.structure
        lead = self._lead(row, rows)
        findings, n = s.findings + lead, len(row_ids)
        if n < len(findings):
            return findings[n]
        start = s.impression_start(row_ids)
        if start is not None and n - start < len(s.impression + lead):
            return (s.impression + lead)[n - start]
        if start is not None and lead:  # the impression of named findings is their sentences
            return s.eos_id
        return None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        s = self.structure
        header = s.impression
        newline = s.newline_ids.to(scores.device)
        for row, row_ids in enumerate(input_ids.tolist()):
            out, n = scores[row], len(row_ids)
            token = self.forced(row_ids, row, len(input_ids))
            if token is not None:
                _force(out, token)
                continue
            lead = self._lead(row, len(input_ids))
            findings = s.findings + lead
            start = s.impression_start(row_ids)
            if s.ends_with_header_word(row_ids):
                out[s.colon_ids.to(scores.device)] = float("-inf")
            closing = torch.cat([newline, newline.new_tensor([s.eos_id])])
            close = torch.logsumexp(out[closing], dim=0)
            out[closing] = float("-inf")
            written = n - len(findings) if start is None else n - start - len(header + lead)
            if not written:  # a section's first word: spaced, and the section cannot close yet
                out[s.not_spaced.to(scores.device)] = float("-inf")
                continue
            if start is None:  # findings: closing them opens the impression
                reserve = min(self.reserve, self.max_new_tokens // 4)
                if self.max_new_tokens - n <= len(header + lead) + reserve:
                    _force(out, header[0])
                else:
                    out[header[0]] = close
            else:  # impression: closing it ends the report
                out[s.eos_id] = close
        return scores


class UnlessForced(LogitsProcessor):
    """Runs ``processors`` unless ``structure`` forces every row's next token: it comes after
    them and overwrites a forced row, so their work there is lost (a lone report's headers
    and leads are a third of its tokens; the closed vocabulary's search took 3 ms of each)."""

    def __init__(self, processors: LogitsProcessorList, structure: ReportStructureProcessor):
        self.processors, self.structure = processors, structure

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows = input_ids.tolist()
        if all(self.structure.forced(ids, r, len(rows)) is not None for r, ids in enumerate(rows)):
            return scores
        return self.processors(input_ids, scores)


class OnBody(LogitsProcessor):
    """Applies a ``transformers`` processor that reads past ids to each row's body ids only."""

    def __init__(self, processor: LogitsProcessor, structure: ReportStructure):
        self.processor, self.structure = processor, structure

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row, row_ids in enumerate(input_ids.tolist()):
            body = torch.tensor([self.structure.body_ids(row_ids)], device=input_ids.device)
            if body.shape[1]:
                scores[row : row + 1] = self.processor(body, scores[row : row + 1])
        return scores


Bigrams = frozenset[tuple[str, str]]  # (word, next word) pairs never written
_SENTENCE_END = re.compile(r"[.!?:\n]")


@dataclass(frozen=True)
class Rules:
    """What one study's report may not write, besides words outside the vocabulary:
    ``stated``, prefixes of words never written (the findings its lead named); ``unstated``,
    prefixes of words written only in a sentence that already negates (the findings its
    condition does not state present or possible: "No pleural effusion." yes, "Pleural
    effusion." no); ``bigrams``, (word, next word) pairs never written; ``normal``, (word,
    prefix) pairs: no word with the prefix after the word in one sentence ("heart" …
    "normal…" beside cardiomegaly)."""

    stated: frozenset[str] = frozenset()
    unstated: frozenset[str] = frozenset()
    bigrams: Bigrams = frozenset()
    normal: Bigrams = frozenset()


@dataclass(frozen=True)
class Position:
    """Where the next token goes: the word before the open one (None after punctuation),
    whether the sentence so far negates, the letters of the open word, and the sentence's
    words so far."""

    previous: str | None = None
    negated: bool = False
    open_word: str = ""
    sentence: frozenset[str] = frozenset()


@lru_cache(maxsize=256)
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
def _fits(vocabulary: frozenset[str], rules: Rules, at: Position, piece: str) -> bool:
    """``ClosedVocabulary.fits``, remembered: a report's steps ask about the same few hundred
    (position, token) pairs again and again (5 ms of a 35 ms step before)."""
    if any(map(str.isdigit, piece)) or not piece.isascii():
        return False
    previous, negated, sentence = at.previous, at.negated, set(at.sentence)
    runs = _LETTER_RUNS.findall(at.open_word + piece)
    for i, run in enumerate(runs):
        if not run[0].isalpha():
            if _SENTENCE_END.search(run):
                negated, sentence = False, set()
            if run.strip():  # punctuation ends the phrase a bigram belongs to
                previous = None
            continue
        if _CAPITAL_AFTER_SMALL.search(run) or (run.isupper() and run.lower() in HEADER_WORDS):
            return False  # "volumE"; a header's word in capitals is a header, never body text
        banned = frozenset(b for a, b in rules.bigrams if a == previous)
        stated = rules.stated | frozenset(b for a, b in rules.normal if a in sentence)
        stated = stated if negated else stated | rules.unstated
        words, prefixes = allowed_words(vocabulary, stated, banned)
        if i == len(runs) - 1:
            return run.lower() in prefixes
        if run.lower() not in words:
            return False
        previous = run.lower()
        negated = negated or previous in NEGATIONS
        sentence.add(previous)
    return True


@lru_cache(maxsize=4096)
def _fitting_anywhere(
    structure: ReportStructure, vocabulary: frozenset[str], rules: Rules, at: Position
) -> tuple[int, ...]:
    """Every token of the tokenizer that ``_fits`` at ``at``: the last resort where none of
    the most likely does (tens of ms, once per position)."""
    return tuple(
        t for t, piece in enumerate(structure.pieces) if _fits(vocabulary, rules, at, piece)
    )


def position(pieces: list[str], ids: list[int], limit: int = 64) -> Position:
    """The ``Position`` at the end of ``ids``, read back to the start of the sentence (or
    ``limit`` tokens), however many tokens the open word spans."""
    tail = ""
    for token in reversed(ids[-limit:]):
        tail = pieces[token] + tail
        if _SENTENCE_END.search(tail):
            break
    sentence = _SENTENCE_END.split(tail)[-1]
    open_word = _OPEN_WORD.search(sentence).group()
    before = sentence[: len(sentence) - len(open_word)]
    previous = re.search(r"([A-Za-z]+) +$", before)
    words = frozenset(w.lower() for w in re.findall(r"[A-Za-z]+", before))
    negated = bool(words & NEGATIONS)
    return Position(previous.group(1).lower() if previous else None, negated, open_word, words)


class ClosedVocabulary(LogitsProcessor):
    """Masks every token that would make a word outside ``vocabulary``: a whole-word constraint.

    Of each row's ``top_k`` most likely tokens, those are kept whose text, appended to the
    word being written (read back to its first letter, however many tokens it spans), leaves
    every finished word in ``vocabulary`` and the open one a prefix of a word in it; all other
    tokens get −∞. Punctuation is free; digits and non-ASCII letters are never written
    (nothing here measures a size or knows a date), nor a capital after a small letter within
    a word ("volumE"). Where none of the ``top_k`` fits, the ``wider_k`` most likely are tried
    (the n-gram ban may have removed the likely ending of a word), then every token of the
    tokenizer, even one the n-gram ban took: a word is never left unfinished or misspelt.

    ``rules`` (one ``Rules`` per study, rows laid out as ``ReportStructureProcessor``'s leads)
    hold what else the study's report may not write: after its lead, no word naming a finding
    the lead named ("Cardiomegaly. No acute cardiomegaly."); a finding its condition does not
    state present or possible only in a sentence that negates; beside a present finding no
    global-normal statement (``mrg.text.states.GLOBAL_NORMAL_BIGRAMS``); and beside a present
    or possible finding no sentence calling its anatomy normal (``NORMAL_ANATOMY``)."""

    def __init__(
        self,
        structure: ReportStructure,
        vocabulary: frozenset[str],
        rules: list[Rules] | None = None,
        top_k: int = 64,
        wider_k: int = 1024,
    ):
        self.structure, self.rules = structure, rules
        self.top_k, self.wider_k = top_k, wider_k
        self.vocabulary = frozenset(vocabulary) | HEADER_WORDS

    def fits(self, piece: str, at: Position = Position(), rules: Rules = Rules()) -> bool:
        """Whether ``piece`` may be written at ``at`` under ``rules``."""
        return _fits(self.vocabulary, rules, at, piece)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        pieces = self.structure.pieces
        for row, row_ids in enumerate(input_ids.tolist()):
            rules = of_study(self.rules, row, len(input_ids)) if self.rules else Rules()
            at = position(pieces, row_ids)
            # only the rules' subjects of the sentence matter: the rest would split the cache
            subjects = frozenset(a for a, _ in rules.normal)
            at = dataclasses.replace(at, sentence=at.sentence & subjects)
            keep = []
            for k in (self.top_k, self.wider_k):  # wider: the likely ending may be banned
                top = scores[row].topk(min(k, scores.shape[1]))
                alive = top.indices[torch.isfinite(top.values)].tolist()
                keep = [t for t in alive if self.fits(pieces[t], at, rules)]
                if keep:
                    break
            if not keep:
                anywhere = torch.tensor(
                    _fitting_anywhere(self.structure, self.vocabulary, rules, at), dtype=torch.long
                )
                keep = anywhere[torch.isfinite(scores[row, anywhere.to(scores.device)])].tolist()
                if not keep and len(anywhere):  # the n-gram ban took the only endings
                    scores[row].fill_(float("-inf"))
                    scores[row, anywhere.to(scores.device)] = 0.0
                    continue
            if keep:
                kept = scores[row, keep].clone()
                scores[row].fill_(float("-inf"))
                scores[row, keep] = kept
        return scores

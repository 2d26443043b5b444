"""Report-structured decoding: logits processors that make every answer a well-formed report.

An answer is ``FINDINGS: …⏎IMPRESSION: …`` and nothing else:

* the first tokens are forced to ``FINDINGS:``, and the first token after a header starts
  with a space, as in every training target; a findings-conditioned report's findings
  sentences (``leads``: one per present or possible finding) are forced, and make its
  impression: right after ``FINDINGS:`` (``lead_at="start"``), after the LLM's sentence on the
  heart (``"heart"``, as a radiologist orders them: "The heart is normal in size. Possible
  infiltrate. The lungs are otherwise clear."), or where the LLM closes its own findings
  (``"end"``);
* in the findings, a newline or EOS never appears as such: their probability is the
  probability of closing the findings, and it moves to the forced ``⏎IMPRESSION:`` header
  (which is also forced at the first sentence end once only ``2 · reserve`` tokens of the
  budget are left, and wherever the findings stand at ``reserve``); a section
  closes only after its first word, the findings only at a sentence end ("The aorta is a
  normal" closed one), and (``anatomy_words``) only once they
  address the heart, the lungs and the pleura (``mrg.text.anatomy``) and describe the
  ``parts`` (the mediastinum and the bones: ``mrg.model.normal_anatomy``), or after that many
  words of the LLM's, and then they close at the next sentence end (with ``parts``, once
  every part is described too);
* in the impression, the probability of a newline moves to EOS, so the report stops at the
  end of the impression (and not before its first token);
* no section writes a header of its own: ``:`` is banned right after "findings" or
  "impression" (and anywhere in the body under a report vocabulary);
* the repetition penalty and the n-gram ban see the body only (``OnBody``), so the headers
  are never penalised ("ImpressION:") and never make body tokens look repeated;
* with a report vocabulary (``mrg.text.vocabulary``), no word outside it is written: the
  constraint sees the whole word being built, not one sub-word token
  (``mrg.model.closed_vocabulary.ClosedVocabulary``),
  and after a present finding no global-normal statement is begun ("No acute
  cardiopulmonary abnormality": ``mrg.text.states.GLOBAL_NORMAL_BIGRAMS``).

Every processor reads its state from each row's generated ids and keeps none, so the same
list serves greedy, sampling and beam search, in ``generate`` and in the streaming loop.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

import torch
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerBase

from mrg.config import LEAD_PLACES
from mrg.text.anatomy import unaddressed
from mrg.text.sections import FINDINGS, format_report
from mrg.text.states import described, unnamed

_HEADER_WORD_AT_END = re.compile(r"(findings|impression)\s*$", re.IGNORECASE)


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
        # a token no body holds and no section closes with: joins the sections apart
        self.closing_ids = torch.cat([self.newline_ids, self.newline_ids.new_tensor([eos_id])])
        closing = set(self.closing_ids.tolist())
        self.separator = min(set(tokenizer.all_special_ids) - closing, default=None)
        if self.separator is None:
            raise ValueError("the tokenizer has no special token besides the end of text")

    def impression_start(self, ids: list[int]) -> int | None:
        """Index of the ``⏎IMPRESSION:`` header in ``ids`` (its newline occurs nowhere else)."""
        try:
            return ids.index(self.impression[0], len(self.findings))
        except ValueError:
            return None

    def body_ids(self, ids: list[int], apart: bool = False) -> list[int]:
        """``ids`` without the two headers: the words the model chose (``apart``: the sections
        joined by ``separator``)."""
        start = self.impression_start(ids)
        if start is None:
            return ids[len(self.findings) :]
        joint = [self.separator] if apart else []
        return ids[len(self.findings) : start] + joint + ids[start + len(self.impression) :]

    def ends_sentence(self, ids: list[int]) -> bool:
        """Whether the text of ``ids`` ends with a full stop (or ! or ?)."""
        return self.is_stop(ids[-1])

    def is_stop(self, token: int) -> bool:
        """Whether ``token``'s text ends a sentence (a full stop, ! or ?)."""
        return self.pieces[token].rstrip().endswith((".", "!", "?"))

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
    ``r`` rows per study, as beam search lays them out) are forced in the findings (where:
    ``lead_at``, below), and make the whole impression: the impression of a report
    that names findings is their sentences (the LLM's own impressions after them were measured
    to call them "unremarkable" and, after the states, "Tuberculosis." in 33 of 98 test
    reports). A report that names none is written freely.

    ``lead_at`` says where the lead goes. ``"start"``: right after the header; the 135M LLM
    went on in its style, a list of negations ("Possible infiltrate. Possible nodule. No focal
    airspace."). ``"end"``: the LLM writes its findings first, and the probability of closing
    them goes to the lead's first token instead of the impression header: the lead closes the
    findings; before it, the LLM describes the chest as in a report, but its "The lungs are
    otherwise clear." then came before the infiltrate it excepts. ``"heart"``: at the first
    sentence end where the findings address the heart (the lead's sentences count: a
    cardiomegaly's lead opens the findings), or at the close if that comes first; the LLM
    goes on after it and closes the findings itself. The lead's first token is never written
    otherwise, so its first place in the findings is where the lead began (stateless, like
    every processor here).

    With ``anatomy_words`` the findings cannot close before they address the heart, the lungs
    and the pleura (the lead's sentences count) unless the LLM has written that many words:
    the 135M LLM often closed after the heart and the lungs. With ``absent`` (one list of
    findings per study, laid out as ``leads``), nor before they name each finding its
    condition states absent: it closed after "No pneumothorax." beside an absent effusion.

    With ``parts`` (of ``mrg.text.states.TOPICS``) the findings also describe those parts
    before they close, and close at the first sentence end where they may: the LLM, made to
    go on past the heart, the lungs and the pleura, rambled ("The aorta is a small right upper
    lobe.") once it had described them.

    ``close_bias`` is added to the log-probability of closing a section wherever it may close
    at a sentence's end: the LLM, once it has said what the report must, went on describing
    the aorta, the spine and the vessels (45 words a report, against 36 in OpenI's)."""

    def __init__(
        self,
        structure: ReportStructure,
        max_new_tokens: int,
        reserve: int = 16,
        leads: list[list[int]] | None = None,
        lead_at: str = "start",
        anatomy_words: int = 0,
        absent: list[list[str]] | None = None,
        close_bias: float = 0.0,
        parts: Sequence[str] = (),
    ):
        self.structure, self.max_new_tokens, self.reserve = structure, max_new_tokens, reserve
        if lead_at not in LEAD_PLACES:
            raise ValueError(f"lead_at must be one of {LEAD_PLACES}, not {lead_at!r}")
        self.leads, self.lead_at, self.anatomy_words = leads, lead_at, anatomy_words
        self.absent, self.close_bias, self.parts = absent, close_bias, tuple(parts)

    def lead(self, row: int, rows: int) -> list[int]:
        """The findings' sentences of ``row`` ([] where there are none)."""
        if not self.leads:
            return []
        return of_study(self.leads, row, rows)

    def lead_start(self, row_ids: list[int], lead: list[int]) -> int | None:
        """Where in ``row_ids`` the findings' ``lead`` begins; None before it does (or where
        there is none)."""
        header = len(self.structure.findings)
        if not lead or len(row_ids) <= header:
            return None
        if self.lead_at == "start":
            return header
        end = self.structure.impression_start(row_ids)
        try:
            return row_ids.index(lead[0], header, len(row_ids) if end is None else end)
        except ValueError:
            return None

    def own(self, row_ids: list[int], lead: list[int]) -> list[int]:
        """The findings' tokens the LLM chose in ``row_ids``: its findings less the header and
        the lead."""
        s = self.structure
        end = s.impression_start(row_ids)
        findings = row_ids[len(s.findings) : end]
        start = self.lead_start(row_ids, lead)
        if start is None:
            return findings
        start -= len(s.findings)
        return findings[:start] + findings[start + len(lead) :]

    def lead_due(self, row_ids: list[int], lead: list[int]) -> bool:
        """Whether ``lead`` (not begun) begins next under ``lead_at="heart"``: at the findings'
        start or a sentence end where they, with the lead, address the heart."""
        s = self.structure
        own = row_ids[len(s.findings) :]
        if own and not s.ends_sentence(row_ids):
            return False
        return "heart" not in unaddressed(s.tokenizer.decode(own + lead))

    def may_close(self, own: list[int], lead: list[int], absent: Sequence[str] = ()) -> bool:
        """Whether findings of ``own`` (the LLM's tokens) and ``lead`` (forced, before or
        after them) may close: always without ``anatomy_words``, else once they address the
        heart, the lungs and the pleura, name each finding of ``absent`` (in any words:
        ``NAMING_PREFIXES``) and describe the ``parts``. Past ``anatomy_words`` words they must
        (``rambled``)."""
        if not self.anatomy_words:
            return True
        text = self.structure.tokenizer.decode(own + lead)
        return self.essential(text, absent) and not self.undescribed(text)

    @staticmethod
    def essential(text: str, absent: Sequence[str] = ()) -> bool:
        """Whether findings ``text`` address the heart, the lungs and the pleura, and name each
        finding of ``absent``."""
        return not unnamed(absent, text.lower()) and not unaddressed(text)

    def undescribed(self, text: str, parts: Sequence[str] | None = None) -> list[str]:
        """The ``parts`` (of ``mrg.text.states.TOPICS``; these of the processor's if None) that
        findings ``text`` do not describe."""
        said = described(re.findall(r"[a-z]+", text.lower()))
        return [part for part in (self.parts if parts is None else parts) if part not in said]

    def rambled(self, own: list[int]) -> bool:
        """Whether ``own`` (the LLM's findings tokens) holds ``anatomy_words`` words: the
        findings close at the next sentence end (left to the budget, one ran on to be cut
        mid-word: "The left lower lobe, which is normal, is normal without medi Pleural
        effusion.")."""
        if not self.anatomy_words:
            return False
        return len(self.structure.tokenizer.decode(own).split()) >= self.anatomy_words

    def forced(self, row_ids: list[int], row: int, rows: int) -> int | None:
        """The token ``row`` must take next whatever the LLM says: a header's, a lead's, or
        the end after a lead's impression; None where the LLM chooses."""
        s = self.structure
        lead = self.lead(row, rows)
        opening, n = s.findings + (lead if self.lead_at == "start" else []), len(row_ids)
        if n < len(opening):
            return opening[n]
        start = s.impression_start(row_ids)
        if self.lead_at != "start" and lead and start is None:
            begun = self.lead_start(row_ids, lead)
            if begun is None:
                due = self.lead_at == "heart" and self.lead_due(row_ids, lead)
                return lead[0] if due else None
            done = n - begun
            if done < len(lead):
                return lead[done]
            return s.impression[0] if self.lead_at == "end" else None
        if start is not None and n - start < len(s.impression + lead):
            return (s.impression + lead)[n - start]
        if start is not None and lead:  # the impression of named findings is their sentences
            return s.eos_id
        return None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        s = self.structure
        header = s.impression
        closing = s.closing_ids.to(scores.device)
        absent = lambda row: of_study(self.absent, row, len(input_ids)) if self.absent else ()
        for row, row_ids in enumerate(input_ids.tolist()):
            out, n = scores[row], len(row_ids)
            token = self.forced(row_ids, row, len(input_ids))
            if token is not None:
                _force(out, token)
                continue
            lead = self.lead(row, len(input_ids))
            start = s.impression_start(row_ids)
            if s.ends_with_header_word(row_ids):
                out[s.colon_ids.to(scores.device)] = float("-inf")
            close = torch.logsumexp(out[closing], dim=0)
            out[closing] = float("-inf")
            ahead = bool(lead) and self.lead_start(row_ids, lead) is None  # a lead still to come
            if ahead and start is None:  # the lead's first token: only where it begins
                out[lead[0]] = float("-inf")
            own = self.own(row_ids, lead)
            written = len(own) if start is None else n - start - len(header + lead)
            if not written:  # a section's first word: spaced, and the section cannot close yet
                out[s.not_spaced.to(scores.device)] = float("-inf")
                continue
            if start is None:  # findings: closing them opens the impression (or the lead)
                reserve = min(self.reserve, self.max_new_tokens // 4)
                then = lead[0] if ahead else header[0]
                left = self.max_new_tokens - n - len(header + lead) - len(lead) * ahead - reserve
                at_stop = s.ends_sentence(row_ids)
                if left <= 0 or at_stop and (left <= reserve or self.rambled(own)):
                    _force(out, then)
                elif at_stop and self.may_close(own, lead, absent(row)):
                    if self.parts:  # a radiologist's whole chest described: they close
                        _force(out, then)
                    else:
                        out[then] = close + self.close_bias
            else:  # impression: closing it ends the report
                out[s.eos_id] = close + self.close_bias * s.ends_sentence(row_ids)
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
    """Applies a ``transformers`` processor that reads past ids to each row's body ids only;
    ``apart``: with the sections kept apart, so that the n-gram ban never matches across
    them (the findings' "disease. No" banned the impression's first " No" after "… airspace
    disease.", and it read "Heart size and contour.")."""

    def __init__(self, processor: LogitsProcessor, structure: ReportStructure, apart: bool = False):
        self.processor, self.structure, self.apart = processor, structure, apart

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row, row_ids in enumerate(input_ids.tolist()):
            body = self.structure.body_ids(row_ids, self.apart)
            body = torch.tensor([body], device=input_ids.device)
            if body.shape[1]:
                scores[row : row + 1] = self.processor(body, scores[row : row + 1])
        return scores

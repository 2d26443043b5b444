"""Report-structured decoding: logits processors that make every answer a well-formed report.

An answer is ``FINDINGS: …⏎IMPRESSION: …`` and nothing else:

* the first tokens are forced to ``FINDINGS:``, and the first token after a header starts
  with a space, as in every training target;
* in the findings, a newline or EOS never appears as such: their probability is the
  probability of closing the findings, and it moves to the forced ``⏎IMPRESSION:`` header
  (which is also forced once only ``reserve`` tokens of the budget are left); a section
  closes only after its first word;
* in the impression, the probability of a newline moves to EOS, so the report stops at the
  end of the impression (and not before its first token);
* no section writes a header of its own: ``:`` is banned right after "findings" or
  "impression";
* the repetition penalty and the n-gram ban see the body only (``OnBody``), so the headers
  are never penalised ("ImpressION:") and never make body tokens look repeated.

Every processor reads its state from each row's generated ids and keeps none, so the same
list serves greedy, sampling and beam search, in ``generate`` and in the streaming loop.
"""

from __future__ import annotations

import re
from functools import lru_cache

import torch
from transformers import LogitsProcessor, PreTrainedTokenizerBase

from mrg.data.sections import FINDINGS, format_report

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


def _force(scores: torch.Tensor, token: int) -> None:
    scores.fill_(float("-inf"))
    scores[token] = 0.0


class ReportStructureProcessor(LogitsProcessor):
    """Forces the headers and decides where each section ends (see the module docstring).

    ``leads`` (one list of token ids per study; rows ``i·r … i·r + r − 1`` of a batch with
    ``r`` rows per study, as beam search lays them out) are forced right after ``FINDINGS:``:
    the findings' sentences a findings-conditioned report begins with, so that the LLM only
    continues them."""

    def __init__(
        self,
        structure: ReportStructure,
        max_new_tokens: int,
        reserve: int = 16,
        leads: list[list[int]] | None = None,
    ):
        self.structure, self.max_new_tokens, self.reserve = structure, max_new_tokens, reserve
        self.leads = leads

    def _opening(self, row: int, rows: int) -> list[int]:
        """The forced opening of ``row``: the findings header and its lead, if any."""
        if not self.leads:
            return self.structure.findings
        return self.structure.findings + self.leads[row // max(1, rows // len(self.leads))]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        s = self.structure
        header = s.impression
        newline = s.newline_ids.to(scores.device)
        for row, row_ids in enumerate(input_ids.tolist()):
            out, n = scores[row], len(row_ids)
            findings = self._opening(row, len(input_ids))
            if n < len(findings):
                _force(out, findings[n])
                continue
            start = s.impression_start(row_ids)
            if start is not None and n - start < len(header):
                _force(out, header[n - start])
                continue
            if s.ends_with_header_word(row_ids):
                out[s.colon_ids.to(scores.device)] = float("-inf")
            closing = torch.cat([newline, newline.new_tensor([s.eos_id])])
            close = torch.logsumexp(out[closing], dim=0)
            out[closing] = float("-inf")
            written = n - len(findings) if start is None else n - start - len(header)
            if not written:  # a section's first word: spaced, and the section cannot close yet
                out[s.not_spaced.to(scores.device)] = float("-inf")
                continue
            if start is None:  # findings: closing them opens the impression
                reserve = min(self.reserve, self.max_new_tokens // 4)
                if self.max_new_tokens - n <= len(header) + reserve:
                    _force(out, header[0])
                else:
                    out[header[0]] = close
            else:  # impression: closing it ends the report
                out[s.eos_id] = close
        return scores


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

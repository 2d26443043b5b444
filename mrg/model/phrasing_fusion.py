"""Shallow fusion with the report phrasing model: the LLM's choices, said as reports say them.

For each token t still allowed at a step (after the closed vocabulary: a few dozen),

    z'_t = z_t + λ · (log P_phr(text + piece_t) − log P_phr(text))

where P_phr is the checkpoint's word trigram model of its training reports
(``mrg.text.phrasing``) and the text is the section written so far (findings or impression).
Summed over a word's tokens the bias is λ · log P_phr(word | two tokens before), so between
"The lungs are clear." and "The air is clear." the LLM's own preference meets the reports'
(Gulcehre et al. 2015; Kannan et al. 2018 for the same fusion in speech). A bias, not forced
text: every word is still the LLM's pick among its likeliest, and forced tokens (headers, the
findings' lead) are left alone.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from mrg.model.decoding import ReportStructure
from mrg.text.phrasing import Phrasing, state


class PhrasingFusion(LogitsProcessor):
    """Adds ``weight`` × the phrasing model's log-probability increment to every finite score of
    a row in the report's body; rows with one allowed token, or more than ``max_tokens`` (the
    closed vocabulary's last resort), are left as they are."""

    def __init__(
        self,
        structure: ReportStructure,
        phrasing: Phrasing,
        weight: float,
        max_tokens: int = 256,
    ):
        self.structure, self.phrasing = structure, phrasing
        self.weight, self.max_tokens = weight, max_tokens

    def section(self, row_ids: list[int]) -> str | None:
        """The text of the section being written (None before the findings' header ends)."""
        s = self.structure
        if len(row_ids) < len(s.findings):
            return None
        start = s.impression_start(row_ids)
        if start is None:
            body = row_ids[len(s.findings) :]
        elif len(row_ids) >= start + len(s.impression):
            body = row_ids[start + len(s.impression) :]
        else:
            return None
        return "".join(s.pieces[t] for t in body)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        pieces = self.structure.pieces
        for row, row_ids in enumerate(input_ids.tolist()):
            text = self.section(row_ids)
            allowed = torch.isfinite(scores[row]).nonzero().flatten()
            if text is None or not 1 < len(allowed) <= self.max_tokens:
                continue
            context, open_word = state(text)
            bias = [
                self.phrasing.increment(context, open_word, pieces[t]) for t in allowed.tolist()
            ]
            scores[row, allowed] += self.weight * scores.new_tensor(bias)
        return scores

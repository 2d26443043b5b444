"""Naming what the condition states absent: after a negation, the absent findings' names lead.

Conditioned on "Absent: pleural effusion, pneumothorax", the frozen 135M LLM negates in its own
words ("There are no focal areas.", "free of acute pulmonary edema"), which name neither
finding: the report says less than its condition. ``AbsentNames`` adds a bias to the first
token of the next absent finding's name where the findings' sentence so far negates and its last
word is a negation cue:

    z'_t = z_t + b · 1[t = first(the first absent finding not yet named in the findings)]
    where the sentence negates (``NEGATIONS``) and its last word is in ``CUES`` (first in
    ChestX-ray14 order: "No pleural effusion or pneumothorax.", as 380 OpenI reports write it,
    where both names favoured let the LLM write "No pneumothorax or pleural effusion.", as 303
    do: BLEU-4 0.219 / 0.221 → 0.227 / 0.229 on 35 held-out OpenI dev reports), and
    z'_or = z_or + b where it negates and its last word names a finding ("no pneumothorax")
    while an absent finding is still unnamed: the list goes on ("or pleural effusion")
    z'_No = z_No + b at a sentence's start once the findings describe the lungs, while an
    absent finding is unnamed or the pleura unaddressed: a radiologist's order ("The heart is
    normal in size. The lungs are clear. No pleural effusion or pneumothorax. No focal
    consolidation."), where the LLM went on to the aorta, the spine and the vessels first
    (and, with nothing stated absent, 15 of 130 held-out OpenI reports never reached the pleura)

The LLM still chooses every word (a bias, not a forced token): "There is no" may go on
"evidence of focal lung disease", and "pleural" may go on "space". Only a name whose first
token has three letters or more is favoured (" at" of atelectasis is a word of its own). Under
beam search the bias stays in the score of the beams that took it. A finding is favoured until
the findings name it, in any state and in any words (``NAMING_PREFIXES``); a sentence on the
pleura favours the pleural findings only, one on focal or airspace disease the lungs' only; the
impression is left alone. ``ReportStructureProcessor`` keeps the findings open until each is
named (or ``anatomy_words`` words).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessor

from mrg.model.decoding import ReportStructure, of_study
from mrg.text.anatomy import unaddressed
from mrg.text.position import position
from mrg.text.states import (
    FINDING_PREFIXES,
    NAMING_PREFIXES,
    NEGATIONS,
    PLEURAL_FINDINGS,
    unnamed,
)
from mrg.text.taxonomy import spoken_name

# the words after which a negated sentence names what it negates: "no", "without", "or" in
# "no effusion or", "of" in "free of" and "no evidence of", "and" in "no effusion and",
# "focal" and "airspace" in "no focal airspace consolidation"
CUES = frozenset({"no", "without", "nor", "or", "of", "and", "focal", "airspace"})
# a sentence on the pleura negates pleural findings only ("The pleural space is free of" goes
# on with effusion, never "consolidation")
PLEURA_WORDS = frozenset({"pleura", "pleural"})
# and a sentence on focal or airspace disease negates the lungs' ("No focal consolidation.")
FOCAL_WORDS = frozenset({"focal", "airspace"})
FOCAL_FINDINGS = frozenset({"Consolidation", "Infiltration", "Pneumonia", "Atelectasis"})
# the words that name a finding in a negated list ("no pneumothorax" goes on with "or" while
# another absent finding is unnamed); "large" names cardiomegaly only beside the heart
NAMES = tuple(p for p in FINDING_PREFIXES if p != "large")


class AbsentNames(LogitsProcessor):
    """Adds ``bias`` to the names of each study's absent findings after a negation cue (see the
    module docstring). ``absent`` holds one list of findings per study, rows laid out as
    ``ReportStructureProcessor``'s leads, and ``named`` (laid out alike) each study's present
    or possible findings: where one is pleural, its sentence speaks for the pleura, and no
    " No" is favoured for it (with the lead after the LLM's findings, "No" there went on to
    negate the effusion the study states)."""

    def __init__(
        self,
        structure: ReportStructure,
        absent: list[list[str]],
        bias: float,
        named: list[list[str]] | None = None,
    ):
        self.structure, self.absent, self.bias, self.named = structure, absent, bias, named
        encode = lambda text: structure.tokenizer(text, add_special_tokens=False)["input_ids"]
        firsts = {f: encode(f" {spoken_name(f)}")[0] for f in NAMING_PREFIXES}
        # a first token of two letters is a word of its own (" at" of atelectasis): not favoured
        self.first = {f: t for f, t in firsts.items() if len(structure.pieces[t].strip()) >= 3}
        self.joiner, self.negation = encode(" or")[0], encode(" No")[0]

    def favoured(
        self, row_ids: list[int], absent: list[str], named: Sequence[str] = ()
    ) -> list[int]:
        """The first token of the finding of ``absent`` that the next token should name, after
        the findings' ``row_ids`` (none outside the findings, or after no cue); ``named``: the
        study's present or possible findings."""
        s = self.structure
        if len(row_ids) <= len(s.findings) or s.impression_start(row_ids) is not None:
            return []
        at = position(s.pieces, row_ids)
        last = at.open_word.lower() or at.previous
        if at.opening and not at.open_word:  # a sentence's start: the negations' turn?
            text = s.tokenizer.decode(row_ids[len(s.findings) :])
            left = unaddressed(text)
            pleura = "pleura" in left and not PLEURAL_FINDINGS.intersection(named)
            if "lungs" not in left and (pleura or unnamed(absent, text.lower())):
                return [self.negation]
            return []
        if not absent:
            return []
        if not last or not (at.negated or last in NEGATIONS):
            return []
        if at.sentence & PLEURA_WORDS:
            absent = [f for f in absent if f in PLEURAL_FINDINGS]
        elif at.sentence & FOCAL_WORDS or last in FOCAL_WORDS:
            absent = [f for f in absent if f in FOCAL_FINDINGS]
        text = s.tokenizer.decode(row_ids[len(s.findings) :]).lower()
        left = unnamed([f for f in absent if f in self.first], text)
        if not left:
            return []
        if last in CUES:
            return [self.first[left[0]]]
        return [self.joiner] if last.startswith(NAMES) else []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows = input_ids.tolist()
        for row, row_ids in enumerate(rows):
            named = of_study(self.named, row, len(rows)) if self.named else ()
            tokens = self.favoured(row_ids, of_study(self.absent, row, len(rows)), named)
            if tokens:
                scores[row, tokens] += self.bias
        return scores

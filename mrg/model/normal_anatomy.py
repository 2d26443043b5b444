"""A radiologist's description: the lungs after the findings, then the mediastinum and the bones.

OpenI's training reports describe the mediastinum in 67 % and the bones in 57 % ("The
mediastinum is unremarkable.", "Bony structures are intact."). Once its findings addressed the
heart, the lungs and the pleura, the frozen 135M LLM described the mediastinum in 30 % and the
bones in 9 % of held-out OpenI reports, and closed; made to write more words, it rambled ("The
aorta is a small right upper lobe.", "No pleural air space disease."). So, once the findings are
otherwise complete (they, with their lead, address the heart, the lungs and the pleura and name
every absent finding: ``ReportStructureProcessor.essential``), the next sentence opens the first
part of ``OPENERS`` they do not describe yet:

    z'_o1 = logsumexp_v z_v,  z'_v = −∞ (v ≠ o1)   at a sentence's start
    z'_ok = z_ok + b                               while the sentence so far is o_1 … o_{k-1}

where o is the part's opener ("The mediastinum is"). Where the findings' sentences follow the
heart's (``lead_at="heart"``), the sentence after them opens the lungs first ("The lungs are"),
and so does each later one until the LLM's own sentences describe them (a word of
``mrg.text.states.TOPICS`` for the lungs: lung, lungs, lobe, lobes; the opener's own "lungs"
does, so the LLM leaves it at most once a sentence): "The heart is normal in size and appearance.
Possible infiltrate. The lungs are otherwise clear." (without it, the LLM went on in lists of
negations: "No consolidation. No focal lung mass."). ``ReportStructureProcessor`` forbids the
close until every part is described (or ``anatomy_words`` words), and then makes it. The LLM
chooses the sentence's end ("unremarkable.") under the closed vocabulary and the phrasing model,
and may describe a part in its own words ("The thoracic spine is normal."); where it leaves an
opener, nothing is favoured until the next sentence. (Given only the probability of closing,
the LLM negated once more where every absent finding was named: "No focal areas of pulmonary
edema.", "No evidence of focal areas.".) Each opener begins its part's most frequent
sentence in OpenI's reports: "The mediastinum is unremarkable." (135 of 3,955 reports), "No
acute bony abnormality." (73, and 51 "… abnormalities."; "The bony structures are normal.",
which the LLM wrote after "The bony structures are", in 2). The findings never write "No acute"
elsewhere (``mrg.model.closed_vocabulary``), which keeps the opener's next token (``next``).
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from mrg.model.decoding import ReportStructureProcessor, of_study

OPENERS = {"mediastinum": "The mediastinum is", "bones": "No acute bony"}
LUNGS_OPENER = "The lungs are"


class NormalAnatomy(LogitsProcessor):
    """Opens the lungs after the lead (``shape.lead_at == "heart"``) and then the first part of
    ``shape.parts`` that each row's findings do not describe, and adds ``bias`` to its
    opener's later tokens (see the module docstring); ``shape`` decides where the findings
    close, and holds each study's lead and absent findings."""

    def __init__(self, shape: ReportStructureProcessor, bias: float):
        self.shape, self.bias = shape, bias
        tokenizer = shape.structure.tokenizer
        encode = lambda text: tuple(tokenizer(f" {text}", add_special_tokens=False)["input_ids"])
        self.openers = {part: encode(OPENERS[part]) for part in shape.parts}
        if shape.lead_at == "heart":
            self.openers["lungs"] = encode(LUNGS_OPENER)

    def favoured(self, row_ids: list[int], row: int, rows: int) -> tuple[tuple[int, ...], int]:
        """The opener ``row``'s next token continues and how many of its tokens the sentence
        holds; ((), 0) outside the findings, where no part is due (see the module docstring),
        or where the sentence left the opener."""
        shape, s = self.shape, self.shape.structure
        if s.impression_start(row_ids) is not None:
            return (), 0
        lead = shape.lead(row, rows)
        led = shape.lead_start(row_ids, lead) is not None
        if shape.lead_at == "end" and led:
            return (), 0  # the findings' closing sentences
        own = shape.own(row_ids, lead)
        stop = max((i for i, t in enumerate(own) if s.is_stop(t)), default=-1)
        sentence = tuple(own[stop + 1 :])
        n = len(sentence)
        lungs = led and "lungs" in self.openers  # the LLM's first sentence may open the lungs
        if (
            stop < 0
            and not lungs
            or not any(o[:n] == sentence and len(o) > n for o in self.openers.values())
        ):
            return (), 0  # checked first: decoding the text below is the step's dearest part
        opener = self.openers.get(self.due(own[: stop + 1], lead, lungs, row, rows), ())
        return (opener, n) if len(opener) > n and opener[:n] == sentence else ((), 0)

    def due(self, said: list[int], lead: list[int], lungs: bool, row: int, rows: int) -> str | None:
        """The part whose opener the next sentence takes, after the LLM's finished sentences
        ``said`` ("The bony" describes the bones before it says how) and ``lead``: the lungs
        where they may be opened (``lungs``: the lead is written, under ``lead_at="heart"``)
        and the LLM's sentences do not describe them; then, once the findings are otherwise
        complete, the first of ``shape.parts`` they do not describe."""
        shape, tokenizer = self.shape, self.shape.structure.tokenizer
        if lungs and shape.undescribed(tokenizer.decode(said), ["lungs"]):
            return "lungs"
        text = tokenizer.decode(said + lead)
        absent = of_study(shape.absent, row, rows) if shape.absent else ()
        left = shape.undescribed(text)
        return left[0] if left and shape.essential(text, absent) else None

    def next(self, row_ids: list[int], row: int, rows: int) -> int | None:
        """The opener's token ``row`` is favoured to take next; None where none is."""
        opener, n = self.favoured(row_ids, row, rows)
        return opener[n] if opener else None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows = input_ids.tolist()
        for row, row_ids in enumerate(rows):
            opener, n = self.favoured(row_ids, row, len(rows))
            if not opener:
                continue
            token = opener[n]
            if n == 0:  # the sentence opens the part: the row's whole mass on the opener's start
                mass = torch.logsumexp(scores[row], 0)
                scores[row] = float("-inf")
                scores[row, token] = mass
            else:
                scores[row, token] += self.bias
        return scores

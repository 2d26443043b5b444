"""The composed baseline that needs no training: probe → retrieved sentences → frozen LLM.

A linear probe on the frozen stem names the findings above one threshold (chosen on
validation); each named finding brings one sentence that OpenI reports use for it
(``finding_sentences``: the most frequent sentence that names that finding alone and claims no
prior study, size or side); the frozen LLM, with no soft prompt and no image, writes the report
from them through the same decoding processors as the model (``composed_reports``). A trained
system must beat it: it is free.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from sklearn.metrics import f1_score
from tqdm.auto import tqdm

from mrg.config import Decoding
from mrg.evaluation.text_quality import PRIOR_COMPARISON
from mrg.model.customizer import CustomizedPrompt
from mrg.model.mrg_model import MRGModel
from mrg.model.prompting import Context, render_chat
from mrg.text.labeler import ReportLabeler
from mrg.text.taxonomy import FINDINGS14, findings_sentences
from mrg.text.vocabulary import HEADER

SENTENCE_END = re.compile(r"(?<=\.)\s+")
# what nothing in the system predicts: a side, a place, a size, a grade, a count, a change;
# and hedges, which the labeler may misread
SPECIFIC = re.compile(
    r"\b(left|right|bilateral\w*|upper|lower|mid|middle|bas\w*|bibasilar|biapical|ap\w*|"
    r"lobe|lingula\w*|hil\w*|perihilar|central|peripheral|retrocardiac|small|large|tiny|"
    r"mild\w*|moderate\w*|severe\w*|minimal|trace|subtle|borderline|few|several|multiple|"
    r"single|new|worsen\w*|improv\w*|increas\w*|decreas\w*|resolv\w*|progress\w*|"
    r"versus|vs|possibl\w*|probabl\w*|may|suggest\w*|likely|suspicious|cannot|question\w*)\b|"
    r"\d|xxxx|\[|/|\.\.",
    re.IGNORECASE,
)
NO_FINDING = "No acute cardiopulmonary abnormality."


def finding_sentences(texts: Iterable[str], labeler: ReportLabeler) -> dict[str, str]:
    """Per finding, the most frequent report sentence whose only positive finding it is, with
    no prior-study claim and nothing specific (``SPECIFIC``); ``findings_sentences`` where
    no sentence qualifies."""
    counts: dict[str, Counter] = {f: Counter() for f in FINDINGS14}
    for text in texts:
        for sentence in SENTENCE_END.split(HEADER.sub(" ", text).strip()):
            sentence = " ".join(sentence.split())
            if not 1 <= len(sentence.split()) <= 8 or not sentence.endswith("."):
                continue
            if PRIOR_COMPARISON.search(sentence) or SPECIFIC.search(sentence):
                continue
            positive = [f for f in FINDINGS14 if labeler.label14(sentence)[f]]
            if len(positive) == 1:
                counts[positive[0]][sentence[:1].upper() + sentence[1:]] += 1
    return {
        f: (counts[f].most_common(1)[0][0] if counts[f] else findings_sentences([f]))
        for f in FINDINGS14
    }


def probe_threshold(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The one threshold over all findings of highest micro-F1 on (validation) ``labels``."""
    candidates = np.unique(np.round(probabilities, 3))
    scores = [
        f1_score(labels.ravel(), (probabilities >= t).ravel(), zero_division=0.0)
        for t in candidates
    ]
    return float(candidates[int(np.argmax(scores))])


def composed_context(model: MRGModel, users: Sequence[str]) -> Context:
    """The chat prompt [instruction][user] as embeddings (left-padded), with no soft prompt
    and no image: what the frozen LLM alone is given."""
    tokenizer = model.tokenizer
    ids = [
        tokenizer(render_chat(tokenizer, model.config.instruction, u), add_special_tokens=False)[
            "input_ids"
        ]
        for u in users
    ]
    width = max(len(i) for i in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    padded = torch.tensor([[pad] * (width - len(i)) + i for i in ids], device=model.device)
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=model.device)
    embeds = model.llm.get_input_embeddings()(padded)
    empty = embeds.new_zeros(len(ids), 0, embeds.shape[-1])
    return Context(embeds, mask, CustomizedPrompt(empty), global_feature=None)


def composed_user(named: Sequence[str], sentences: dict[str, str]) -> str:
    said = " ".join(sentences[f] for f in FINDINGS14 if f in set(named)) or NO_FINDING
    return f"The radiograph shows: {said}"


def composed_reports(
    model: MRGModel,
    named: Sequence[Sequence[str]],
    sentences: dict[str, str],
    decoding: Decoding,
    batch_size: int = 8,
) -> list[str]:
    """One report per study from its named findings' sentences, by the frozen LLM alone."""
    reports: list[str] = []
    for start in tqdm(range(0, len(named), batch_size), desc="composed baseline"):
        users = [composed_user(n, sentences) for n in named[start : start + batch_size]]
        reports += model.generate_from(composed_context(model, users), decoding)
    return reports

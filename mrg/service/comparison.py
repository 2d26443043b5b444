"""A generated report beside its reference: per-case language metrics and, per CheXpert
observation, whether both, only the reference (missed) or only the report (hallucinated)
state it, with the sentences that do."""

from __future__ import annotations

from mrg.evaluation.metrics import nlg_scores
from mrg.service.answers import Comparison, LabelRow
from mrg.text.labeler import LABEL_MAPS, POSITIVE, ReportLabeler
from mrg.text.taxonomy import CHEXPERT14


def compare(
    labeler: ReportLabeler, generated: str, reference: str, meteor: bool = False
) -> Comparison:
    """Per-case language metrics and CheXpert label agreement with the triggering sentences."""
    scores = nlg_scores([reference], [generated], meteor=meteor)
    metrics = {k: v for k, v in scores.corpus.items() if k != "CIDEr"}
    ref_sentences, gen_sentences = (
        positive_sentences(labeler, reference),
        positive_sentences(labeler, generated),
    )
    rows = []
    for observation in CHEXPERT14[1:]:
        in_ref, in_gen = ref_sentences.get(observation), gen_sentences.get(observation)
        if not in_ref and not in_gen:
            continue
        agreement = "matched" if in_ref and in_gen else ("missed" if in_ref else "hallucinated")
        rows.append(LabelRow(observation, agreement, in_ref or [], in_gen or []))
    notes = [n for n in scores.notes if not n.startswith("CIDEr")]
    return Comparison(metrics, notes, rows)


def positive_sentences(labeler: ReportLabeler, text: str) -> dict[str, list[str]]:
    """CheXpert observation → the sentences with a positive mention of it."""
    by_concept: dict[str, list[str]] = {}
    for mention in labeler.mentions(text):
        if mention.status == POSITIVE and mention.sentence not in by_concept.get(
            mention.concept, []
        ):
            by_concept.setdefault(mention.concept, []).append(mention.sentence)
    out: dict[str, list[str]] = {}
    for observation, concepts in LABEL_MAPS["chexpert"].items():
        sentences = [s for c in concepts for s in by_concept.get(c, [])]
        if sentences:
            out[observation] = list(dict.fromkeys(sentences))
    return out

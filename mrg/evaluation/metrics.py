"""Report-generation metrics as the field reports them.

Language metrics come from ``pycocoevalcap`` (the implementation R2Gen and R2GenGPT report
with) on R2Gen-cleaned text: BLEU-1..4, METEOR (needs Java; skipped with a note where it is
missing), ROUGE-L and CIDEr, corpus-level and per case.

Clinical efficacy compares the labels the report labeler assigns to the generated and the
reference report: precision, recall and F1, micro and macro, over the 14 CheXpert
observations and over the 5 common ones (as CheXagent and MAIRA-2 report them), with only
positive mentions counted as 1. The same functions score label vectors from any source
(e.g. NIH image labels against the labels of a generated report).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from mrg.text.cleaning import clean_report_iu_xray
from mrg.text.labeler import ReportLabeler
from mrg.text.taxonomy import CHEXPERT5, CHEXPERT14

log = logging.getLogger(__name__)

NLG_KEYS = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr")


@dataclass
class NLGScores:
    """Corpus scores, per-case scores (same keys, one list entry per case), and notes."""

    corpus: dict[str, float] = field(default_factory=dict)
    per_case: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def java_available() -> bool:
    return shutil.which("java") is not None


def nlg_scores(
    references: Sequence[str],
    hypotheses: Sequence[str],
    clean: Callable[[str], str] = clean_report_iu_xray,
    meteor: bool = True,
) -> NLGScores:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr between aligned lists of references and hypotheses."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if len(references) != len(hypotheses) or not references:
        raise ValueError("references and hypotheses must be non-empty and aligned")
    # One line, as R2Gen's reports are: the newline before IMPRESSION reads as a space.
    gts = {i: [clean(" ".join(r.split()))] for i, r in enumerate(references)}
    res = {i: [clean(" ".join(h.split()))] for i, h in enumerate(hypotheses)}
    out = NLGScores()
    bleu, bleu_cases = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        out.corpus[f"BLEU_{n + 1}"] = float(bleu[n])
        out.per_case[f"BLEU_{n + 1}"] = [float(x) for x in bleu_cases[n]]
    scorers = [("ROUGE_L", Rouge()), ("CIDEr", Cider())]
    if meteor and java_available():
        from pycocoevalcap.meteor.meteor import Meteor

        scorers.insert(0, ("METEOR", Meteor()))
    elif meteor:
        out.notes.append(
            "METEOR skipped: Java is not installed (pycocoevalcap runs METEOR 1.5 in Java)"
        )
        log.warning(out.notes[-1])
    for name, scorer in scorers:
        score, cases = scorer.compute_score(gts, res)
        out.corpus[name] = float(score)
        out.per_case[name] = [float(x) for x in cases]
        if hasattr(scorer, "close"):
            scorer.close()
    if len(references) == 1:
        out.notes.append("CIDEr of a single case is 0 by construction (its IDF needs a corpus)")
    return out


# --------------------------------------------------------------------------- clinical efficacy


@dataclass
class PRF:
    precision: float
    recall: float
    f1: float


def _prf(tp: int, fp: int, fn: int) -> PRF:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return PRF(p, r, 2 * p * r / (p + r) if p + r else 0.0)


@dataclass
class ClinicalScores:
    micro: PRF
    macro: PRF
    per_label: dict[str, PRF]
    support: dict[str, int]


def label_agreement(
    references: Sequence[Mapping[str, int]],
    predictions: Sequence[Mapping[str, int]],
    labels: Sequence[str],
) -> ClinicalScores:
    """Micro and macro P/R/F1 of binary label dicts; macro averages labels with reference support."""
    counts = {label: [0, 0, 0] for label in labels}
    for ref, pred in zip(references, predictions, strict=True):
        for label in labels:
            y, p = bool(ref.get(label)), bool(pred.get(label))
            counts[label][0] += y and p
            counts[label][1] += p and not y
            counts[label][2] += y and not p
    per_label = {label: _prf(*c) for label, c in counts.items()}
    support = {label: c[0] + c[2] for label, c in counts.items()}
    micro = _prf(*(sum(c[i] for c in counts.values()) for i in range(3)))
    supported = [per_label[label] for label in labels if support[label]]
    n = max(1, len(supported))
    macro = PRF(*(sum(getattr(s, k) for s in supported) / n for k in ("precision", "recall", "f1")))
    return ClinicalScores(micro, macro, per_label, support)


def chexpert_positive(labeler: ReportLabeler, text: str) -> dict[str, int]:
    """CheXpert observations as 1 (positive mention) or 0 (negative, uncertain or not mentioned)."""
    return {label: int(value == 1) for label, value in labeler.chexpert(text).items()}


def clinical_efficacy(
    references: Sequence[str], hypotheses: Sequence[str], labeler: ReportLabeler | None = None
) -> dict[str, ClinicalScores]:
    """CE scores over the 14 CheXpert observations and over the 5 common ones."""
    labeler = labeler or ReportLabeler()
    ref = [chexpert_positive(labeler, t) for t in references]
    hyp = [chexpert_positive(labeler, t) for t in hypotheses]
    return {
        "chexpert14": label_agreement(ref, hyp, CHEXPERT14),
        "chexpert5": label_agreement(ref, hyp, CHEXPERT5),
    }

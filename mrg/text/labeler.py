"""A rule-based radiology report labeler (no downloads): mentions, negation, uncertainty.

Labels:
* the 14 ChestX-ray14 / OpenI findings (``FINDINGS14``) plus ``normal``;
* the 14 CheXpert observations (``CHEXPERT14``), each positive (1), negative (0),
  uncertain (−1) or not mentioned (None), as the CheXpert labeler reports them.

Pipeline for one report: sentences → clauses (split at ';', 'but', 'however', 'although', …)
→ mentions (one regular expression per concept) → each mention's status from the cues
in its clause:
* negation before the mention whose scope reaches it (``no``, ``without``, ``free of``,
  ``negative for``, ``resolved``, ``clear of``, ``rather than`` …; a scope runs through
  lists — "no effusion, pneumothorax or consolidation" — and stops at a clause boundary
  or a positive statement such as ``there is``),
* negation after it (``… is not seen``, ``… has resolved``, ``… is absent``),
* uncertainty around it (``may``, ``possible``, ``cannot be excluded``, ``suspicious for``,
  ``versus``, ``or`` between two findings …), which wins over negation where both apply
  ("cannot be excluded" contains a negation but means "possible").
A concept's report-level status is positive if any mention is, else uncertain, else negative.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mrg.text.cleaning import split_sentences
from mrg.text.taxonomy import FINDINGS14

POSITIVE, NEGATIVE, UNCERTAIN = "positive", "negative", "uncertain"

_HEART = r"(?:heart|cardiac (?:silhouette|shadow|size)|cardiac|cardiomediastinal silhouette)"
_SIZE_WORDS = r"(?:size |silhouette |shadow |contour )?"
_DEGREE = r"(?:(?:is|are|not|appears?|remains?|appear to be|is again|again|now|slightly|mildly|moderately|markedly|severely|significantly|minimally|borderline|stably|still|somewhat|at least)\s+){0,4}"

# Concept → pattern. Concepts are the union of both label spaces; LABEL_MAPS map them.
CONCEPTS: dict[str, str] = {
    "atelectasis": r"atelecta\w*|collapsed?\b(?! vertebra)",
    "cardiomegaly": (
        r"cardiomegaly|cardiac enlargement|enlarge(?:d|ment of the) (?:heart|cardiac)(?: silhouette)?|"
        rf"{_HEART} {_SIZE_WORDS}{_DEGREE}(?:enlarged|increased|large|prominent)|"
        r"(?:enlarged|large|prominent) (?:\w+ )?(?:heart|cardiac silhouette)|"
        r"increase(?:d|s)? in (?:the )?(?:heart|cardiac) size|borderline (?:heart|cardiac) size|heart is borderline in size"
    ),
    "enlarged_cardiomediastinum": (
        r"(?:widen\w*|enlarged|prominent) (?:superior )?mediastin\w*|mediastin\w* (?:\w+ ){0,2}(?:widen\w*|enlarged)|"
        r"enlarged cardiomediastinal"
    ),
    "effusion": r"effusions?|pleural fluid|fluid in the (?:\w+ )?(?:fissure|pleural)|hydrothorax",
    "infiltration": r"infiltrat\w*",
    "opacity": r"opacit\w*|opacification|airspace (?:disease|process)|air space (?:disease|process)|densit(?:y|ies)",
    "mass": r"mass(?:es|-?like)?\b(?! effect)",
    "nodule": r"nodules?\b|(?:fibro)?nodular\b(?! (?:opacit|densit))",
    "lesion": r"lesions?",
    "pneumonia": r"pneumonia|pneumonitis|bronchopneumonia",
    "pneumothorax": r"pneumothora(?:x|ces)",
    "consolidation": r"consolidat\w*",
    "edema": r"edema|oedema",
    "emphysema": r"(?<!subcutaneous )(?<!soft tissue )emphysema\w*",
    "fibrosis": r"(?<!cystic )fibros\w*|fibrotic",
    "pleural_thickening": r"pleural (?:\w+ )?thickening|thickening of the (?:\w+ )?(?:pleura|fissures?)|fissur\w* thickening|pleural plaques?|apical (?:pleural )?(?:cap|capping)",
    "hernia": r"hernia\w*",
    "fracture": r"fractur\w*",
    "support_devices": (
        r"pacemaker|pacer|icd|defibrillator|(?:endotracheal|et|nasogastric|ng|feeding|chest|enteric) tubes?|"
        r"catheters?|picc|central (?:venous )?line|port-a-cath|(?:sternotomy|surgical) (?:wires?|clips?)|"
        r"stents?|valve (?:replacement|prosthesis)|prosthetic valve|tracheostomy|drains?"
    ),
    "pleural_other": r"pleural (?:\w+ )?thickening|pleural (?:\w+ )?scar\w*|fibrothorax|pleural plaques?",
}

LABEL_MAPS = {
    "chestxray14": {
        "Atelectasis": ("atelectasis",),
        "Cardiomegaly": ("cardiomegaly",),
        "Effusion": ("effusion",),
        "Infiltration": ("infiltration",),
        "Mass": ("mass",),
        "Nodule": ("nodule",),
        "Pneumonia": ("pneumonia",),
        "Pneumothorax": ("pneumothorax",),
        "Consolidation": ("consolidation",),
        "Edema": ("edema",),
        "Emphysema": ("emphysema",),
        "Fibrosis": ("fibrosis",),
        "Pleural_Thickening": ("pleural_thickening",),
        "Hernia": ("hernia",),
    },
    "chexpert": {
        "Enlarged Cardiomediastinum": ("enlarged_cardiomediastinum",),
        "Cardiomegaly": ("cardiomegaly",),
        "Lung Lesion": ("mass", "nodule", "lesion"),
        "Lung Opacity": (
            "opacity",
            "infiltration",
            "consolidation",
            "atelectasis",
            "pneumonia",
            "edema",
        ),
        "Edema": ("edema",),
        "Consolidation": ("consolidation",),
        "Pneumonia": ("pneumonia",),
        "Atelectasis": ("atelectasis",),
        "Pneumothorax": ("pneumothorax",),
        "Pleural Effusion": ("effusion",),
        "Pleural Other": ("pleural_other",),
        "Fracture": ("fracture",),
        "Support Devices": ("support_devices",),
    },
}

_CONCEPT_RE = {
    name: re.compile(rf"\b(?:{pattern})", re.IGNORECASE) for name, pattern in CONCEPTS.items()
}

_CLAUSE_SPLIT = re.compile(
    r";|\bbut\b|\bhowever\b|\balthough\b|\bthough\b|\bwhereas\b|\bexcept\b|\bwith the exception of\b|"
    r"\bwhich (?:is|are|may|could|likely)\b|\bconcerning for\b(?=.*\bno\b)",
    re.IGNORECASE,
)
_PRE_NEGATION = re.compile(
    r"\b(?:no|not|without|negative for|free of|clear of|absence of|absent|resolution of|resolved|"
    r"rather than|instead of|nor|neither|removal of|never|deny|denies|exclude[sd]?|ruled out|rule out|"
    r"no evidence of|no signs? of|no radiographic evidence of|not identified|nothing to suggest|"
    r"interval resolution of|resolving)\b",
    re.IGNORECASE,
)
# Words after which a negation's scope ends: a new positive statement.
_SCOPE_BREAK = re.compile(
    r"\b(?:there is|there are|there has been|is seen|are seen|is noted|are noted|is present|are present|"
    r"remains?|persistent|new|increased|with)\b",
    re.IGNORECASE,
)
_POST_NEGATION = re.compile(
    r"^[\w\s,-]{0,40}?\b(?:(?:is|are|has|have|was|were)\s+)?(?:not\s+(?:been\s+)?(?:seen|identified|present|visualized|"
    r"demonstrated|evident|appreciated|noted|detected|included|visible|enlarged)|no longer (?:seen|present|visualized|evident)|"
    r"(?:has|have)\s+(?:\w+\s+)?resolved|resolved|(?:is|are)\s+absent|cleared|unlikely|ruled out|excluded)\b",
    re.IGNORECASE,
)
_UNCERTAIN = re.compile(
    r"\b(?:may|might|could|can|possible|possibly|suspect\w*|suspicious|"
    r"suggest\w*|concern\w*|question\w*|equivocal|consider\w*|differential|"
    r"cannot be (?:excluded|ruled out|entirely excluded)|can not be (?:excluded|ruled out)|not (?:be )?excluded|"
    r"not ruled out|cannot exclude|can't exclude|indeterminate|uncertain|atypical|"
    r"worrisome|upper limits? of normal|top normal)\b|\?",
    re.IGNORECASE,
)
# Uncertainty placed after the mention ("… cannot be excluded"); other cues after it qualify later words.
_POST_UNCERTAIN = re.compile(
    r"^[\w\s,/-]{0,40}?\b(?:cannot be (?:entirely )?(?:excluded|ruled out)|can not be (?:excluded|ruled out)|"
    r"not (?:be )?(?:entirely )?excluded|not ruled out|(?:is|are) (?:possible|suspected|questioned|questionable)|"
    r"difficult to (?:entirely )?exclude)\b|^\s*\?",
    re.IGNORECASE,
)
_NO_CHANGE = re.compile(
    r"\bno (?:\w+ )?(?:change|changes|interval change|significant change)\b", re.IGNORECASE
)


@dataclass(frozen=True)
class Mention:
    """One concept mention: the sentence it is in, its character span there, and its status."""

    concept: str
    sentence: str
    start: int
    end: int
    status: str


def _clauses(sentence: str) -> list[tuple[int, str]]:
    """(offset, text) of each clause of a sentence."""
    clauses, position = [], 0
    for match in _CLAUSE_SPLIT.finditer(sentence):
        clauses.append((position, sentence[position : match.start()]))
        position = match.start()
    clauses.append((position, sentence[position:]))
    return clauses


def _negation_before(before: str) -> re.Match | None:
    """The last negation cue before the mention, if its scope reaches the mention."""
    cues = list(_PRE_NEGATION.finditer(before))
    if not cues:
        return None
    cue = cues[-1]
    if cue.group(0).lower() in ("no", "not") and _NO_CHANGE.match(before, cue.start()):
        return None  # "no change in the effusion" does not negate the effusion
    between = before[cue.end() :]
    if _SCOPE_BREAK.search(between) and not re.search(r"\b(?:or|and|nor)\b|,", between[-30:]):
        return None
    return cue if len(between.split()) <= 12 else None


def _status(clause: str, start: int, end: int) -> str:
    """Status of the mention at ``clause[start:end]``; the cue nearest the mention decides."""
    before, after = clause[:start], clause[end:]
    if re.search(r"\bnot\b", clause[start:end], re.IGNORECASE):
        return NEGATIVE  # a negation inside the mention: "heart is not enlarged"
    if _POST_UNCERTAIN.match(after):
        return UNCERTAIN
    if _POST_NEGATION.match(after):
        return NEGATIVE
    offset = max(0, len(before) - 60)
    uncertain = list(_UNCERTAIN.finditer(before, offset))
    negation = _negation_before(before)
    if negation and (not uncertain or negation.end() > uncertain[-1].end()):
        return NEGATIVE  # "possible effusion, no pneumothorax"
    if uncertain:
        return UNCERTAIN  # ties go to uncertainty: "cannot exclude pneumonia"
    return POSITIVE


class ReportLabeler:
    """Label reports in the ChestX-ray14 and CheXpert label spaces."""

    def mentions(self, text: str) -> list[Mention]:
        found = []
        for sentence in split_sentences(text):
            for offset, clause in _clauses(sentence):
                for concept, pattern in _CONCEPT_RE.items():
                    for match in pattern.finditer(clause):
                        status = _status(clause, match.start(), match.end())
                        found.append(
                            Mention(
                                concept,
                                sentence,
                                offset + match.start(),
                                offset + match.end(),
                                status,
                            )
                        )
        return found

    def concepts(self, text: str) -> dict[str, str]:
        """Concept → report-level status (positive > uncertain > negative); unmentioned concepts absent."""
        rank = {POSITIVE: 3, UNCERTAIN: 2, NEGATIVE: 1}
        out: dict[str, str] = {}
        for mention in self.mentions(text):
            if rank[mention.status] > rank.get(out.get(mention.concept, ""), 0):
                out[mention.concept] = mention.status
        return out

    def _mapped(self, text: str, space: str) -> dict[str, str | None]:
        concepts = self.concepts(text)
        rank = {POSITIVE: 3, UNCERTAIN: 2, NEGATIVE: 1, None: 0}
        out = {}
        for label, members in LABEL_MAPS[space].items():
            out[label] = max((concepts.get(c) for c in members), key=lambda s: rank[s])
        return out

    def statuses14(self, text: str) -> dict[str, str | None]:
        """ChestX-ray14 findings → positive / uncertain / negative, or None where not mentioned."""
        return self._mapped(text, "chestxray14")

    def label14(self, text: str, uncertain_as_positive: bool = False) -> dict[str, int]:
        """ChestX-ray14 findings as 1/0 (positive mention or not) plus ``normal``."""
        statuses = self._mapped(text, "chestxray14")
        accept = {POSITIVE, UNCERTAIN} if uncertain_as_positive else {POSITIVE}
        labels = {label: int(statuses[label] in accept) for label in FINDINGS14}
        labels["normal"] = int(not any(labels.values()))
        return labels

    def chexpert(self, text: str) -> dict[str, int | None]:
        """CheXpert observations: 1 positive, 0 negative, −1 uncertain, None not mentioned."""
        code = {POSITIVE: 1, NEGATIVE: 0, UNCERTAIN: -1, None: None}
        statuses = self._mapped(text, "chexpert")
        labels: dict[str, int | None] = {"No Finding": None}
        labels.update({label: code[status] for label, status in statuses.items()})
        findings = [v for k, v in labels.items() if k not in ("No Finding", "Support Devices")]
        labels["No Finding"] = 1 if not any(v in (1, -1) for v in findings) else None
        return labels

"""Finding states: how sure a report is of each ChestX-ray14 finding (PromptMRG's condition).

Each finding is ``present``, ``possible`` or ``absent``, or not stated at all. The findings
head gives them from calibrated probabilities (``mrg.model.findings``); the labeler reads
them back from report text (positive → present, uncertain → possible, negative → absent).

As a vector (what the customizer's affine heads see) the states are ``STATE_WIDTH`` = 43
entries: 14 present, 14 possible, 14 absent, then "normal" (1 where nothing is present or
possible). The first 14 entries are the 15-wide findings vector's own, so a vector of
either width names its present findings the same way (``named_findings``).

As text they enter the instruction (``states_words``: "Present: cardiomegaly. Possible:
pleural effusion. Absent: pneumothorax.") and open the report (``lead_sentences``:
"Cardiomegaly. Possible pleural effusion."). A present or possible finding rules out a
global-normal statement ("No acute cardiopulmonary abnormality."): ``GLOBAL_NORMAL`` finds one
in text, ``GLOBAL_NORMAL_BIGRAMS`` are the word pairs decoding never writes beside one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from mrg.text.taxonomy import FINDINGS14, finding_named, spoken_name

PRESENT, POSSIBLE, ABSENT = "present", "possible", "absent"
STATES = (PRESENT, POSSIBLE, ABSENT)
STATE_WIDTH = 3 * len(FINDINGS14) + 1
FROM_LABELER = {"positive": PRESENT, "uncertain": POSSIBLE, "negative": ABSENT}

FindingStates = dict[str, str]  # finding → state; findings not stated are left out

GLOBAL_NORMAL = re.compile(
    r"\b(?:no (?:acute|active) (?:cardiopulmonary |cardiothoracic |intrathoracic |chest )?"
    r"(?:abnormalit(?:y|ies)|disease|process|findings?)|normal chest|negative chest|"
    r"no acute (?:cardiopulmonary|cardiothoracic|intrathoracic)\b)",
    re.IGNORECASE,
)
# (word, next word) pairs that make a global-normal statement; banned after a present finding
GLOBAL_NORMAL_BIGRAMS = {
    "no": frozenset({"acute"}),  # beside a finding "No acute …" ended "No acute cardiac."
    "acute": frozenset(
        {
            "cardiopulmonary",
            "cardiac",
            "cardio",
            "cardiothoracic",
            "intrathoracic",
            "abnormality",
            "abnormalities",
            "disease",
            "process",
            "findings",
            "finding",
        }
    ),
    "active": frozenset({"disease", "cardiopulmonary", "process"}),
    "normal": frozenset({"chest"}),
    "negative": frozenset({"chest"}),
}

# all of them as (word, next word) pairs: never beside a finding, and never in the findings,
# where a radiologist describes (the conclusion is the impression's)
GLOBAL_NORMAL_PAIRS = frozenset((a, b) for a, nexts in GLOBAL_NORMAL_BIGRAMS.items() for b in nexts)


# the beginnings of words that hedge ("possible", "possibly"): a report whose findings the
# head states writes its hedges in the lead alone
HEDGES = frozenset({"possibl"})
# words that negate the findings after them in a sentence ("No pleural effusion or pneumothorax")
NEGATIONS = frozenset({"no", "not", "without", "negative", "free", "nor", "neither", "absent"})
# the words a finding is affirmed with (the labeler's patterns, by their first letters)
NAMING_PREFIXES = {
    "Atelectasis": ("atelecta", "collaps"),
    "Cardiomegaly": ("cardiomegal", "enlarge", "large"),  # "large heart", "heart is large"
    "Effusion": ("effusion", "hydrothora"),
    "Infiltration": ("infiltrat",),
    "Mass": ("mass",),
    "Nodule": ("nodul",),
    "Pneumonia": ("pneumoni", "bronchopneumoni"),
    "Pneumothorax": ("pneumothora",),
    "Consolidation": ("consolidat",),
    "Edema": ("edema", "oedema"),
    "Emphysema": ("emphysem",),
    "Fibrosis": ("fibros", "fibrotic"),
    "Pleural_Thickening": ("thickening",),
    "Hernia": ("hernia",),
}
# words that say again what a finding's sentence said: not written in a section once the
# finding is named ("No focal consolidation. No evidence of focal airspace disease.", "No
# focal infiltrates. No evidence of focal airspace disease.", "No evidence of focal lung
# opacity. Possible infiltrate."); they name no finding themselves (the labeler reads none in
# "airspace disease" or "opacity")
_AIRSPACE_OPACITY = frozenset({"airspace", "air", "opacity", "opacities", "opacification"})
RESTATING = {"consolidat": _AIRSPACE_OPACITY, "infiltrat": _AIRSPACE_OPACITY}
# all of them: a sentence names a finding once ("no pneumothorax or pneumothorax" is never written)
FINDING_PREFIXES = tuple(sorted({p for prefixes in NAMING_PREFIXES.values() for p in prefixes}))


_LUNG = (("lungs", "clear"), ("lungs", "normal"), ("lung", "clear"), ("lungs", "unremarkable"))
_PLEURA = (("pleural", "normal"), ("pleural", "clear"), ("pleural", "unremarkable"))
# (word, later word in the same sentence) that call a finding's anatomy normal; a sentence on
# the lungs with ``EXCEPTING`` calls the rest of them normal beside a focal finding ("The lungs
# are otherwise clear."), as radiologists do; the heart and pleura have no "rest"
EXCEPTING = "otherwise"
EXCEPTABLE = frozenset({"lungs", "lung"})
NORMAL_ANATOMY = {
    "Cardiomegaly": tuple(
        (a, b)
        for a in ("heart", "cardiac", "cardiomediastinal")
        for b in ("normal", "unremarkable", "within", "stable")
    ),
    "Effusion": _PLEURA + (("costophrenic", "clear"), ("costophrenic", "sharp")),
    "Pneumothorax": _PLEURA,
    "Pleural_Thickening": _PLEURA,
    **{
        f: _LUNG
        for f in (
            "Atelectasis",
            "Infiltration",
            "Mass",
            "Nodule",
            "Pneumonia",
            "Consolidation",
            "Edema",
            "Emphysema",
            "Fibrosis",
        )
    },
}


# the words a findings sentence describes a part of the chest with, and the parts: a section
# describes each part once ("The heart is normal in size." and, two sentences on, "The
# cardiomediastinal silhouette is normal.", "The heart size and contour are normal.")
_HEART, _MEDIASTINUM = frozenset({"heart"}), frozenset({"mediastinum"})
_BONES, _VESSELS = frozenset({"bones"}), frozenset({"vessels"})
TOPICS = {
    "heart": _HEART,
    "cardiac": _HEART,
    "cardiomediastinal": _HEART | _MEDIASTINUM,
    "cardio": _HEART | _MEDIASTINUM,  # "The cardio mediastinal silhouette"
    "cardiopulmonary": _HEART | _MEDIASTINUM,  # "The cardiopulmonary silhouette"
    "mediastinum": _MEDIASTINUM,
    "mediastinal": _MEDIASTINUM,
    "lungs": frozenset({"lungs"}),
    "lung": frozenset({"lungs"}),
    "lobe": frozenset({"lungs"}),  # "The right upper lobe is clear." after "The lungs are clear."
    "lobes": frozenset({"lungs"}),
    "pulmonary": _VESSELS,
    "vasculature": _VESSELS,
    "vascularity": _VESSELS,
    "aorta": frozenset({"aorta"}),
    "aortic": frozenset({"aorta"}),
    "osseous": _BONES,
    "bony": _BONES,
    "bones": _BONES,
    "skeletal": _BONES,
    "thoracic": _BONES,
    "spine": _BONES,
}
# a present or possible finding's sentence speaks for its part: no sentence of the LLM's has
# that part as its subject ("The heart is large." beside "Possible cardiomegaly." affirms it,
# and "The heart is normal" is ruled out); the lungs have "otherwise" (``EXCEPTING``)
FINDING_TOPICS = {"Cardiomegaly": "heart"}
# (word, next word) pairs that call the pleura normal as a whole: never beside a pleural finding
# ("There is no pneumothorax or pleural disease." beside a present effusion)
PLEURAL_NORMAL_BIGRAMS = frozenset(
    ("pleural", b)
    for b in ("disease", "abnormality", "abnormalities", "process", "space", "spaces", "fluid")
)
PLEURAL_FINDINGS = frozenset({"Effusion", "Pneumothorax", "Pleural_Thickening"})


def described(words: Iterable[str]) -> frozenset[str]:
    """The parts of the chest (``TOPICS``) that ``words`` describe."""
    return frozenset(part for w in words for part in TOPICS.get(w, ()))


def restating(named: Iterable[str]) -> frozenset[str]:
    """The words (``RESTATING``) that say again what the findings ``named`` (by their
    ``FINDING_PREFIXES``) said."""
    return frozenset(w for p in named for w in RESTATING.get(p, ()))


def topic_words(parts: Iterable[str]) -> frozenset[str]:
    """The words (``TOPICS``) that describe any of ``parts``."""
    parts = frozenset(parts)
    return frozenset(w for w, of in TOPICS.items() if of & parts)


def spoken_for(states: Mapping[str, str]) -> frozenset[str]:
    """The words no sentence of the LLM's opens with, for ``states``: the parts its present or
    possible findings' sentences speak for (``FINDING_TOPICS``)."""
    return topic_words(FINDING_TOPICS[f] for f in named(states) if f in FINDING_TOPICS)


def naming_prefixes(findings: Iterable[str]) -> frozenset[str]:
    """Every beginning of a word that names one of ``findings`` (``NAMING_PREFIXES``)."""
    return frozenset(p for f in findings for p in NAMING_PREFIXES[f])


def named(states: Mapping[str, str]) -> list[str]:
    """The findings ``states`` names as found: present or possible, in ChestX-ray14 order."""
    return [f for f in FINDINGS14 if states.get(f) in (PRESENT, POSSIBLE)]


def unnamed(findings: Iterable[str], text: str) -> list[str]:
    """The findings of ``findings`` that lower-case ``text`` does not name, in any words and any
    state (``NAMING_PREFIXES``)."""
    return [f for f in findings if not any(p in text for p in NAMING_PREFIXES[f])]


def normal_anatomy(states: Mapping[str, str]) -> frozenset[tuple[str, str]]:
    """The (word, later word) pairs that would call the anatomy of a present or possible
    finding of ``states`` normal in one sentence ("The heart is normal" beside cardiomegaly)."""
    return frozenset(pair for f in named(states) for pair in NORMAL_ANATOMY.get(f, ()))


def unstated_prefixes(states: Mapping[str, str]) -> frozenset[str]:
    """The naming words of the findings ``states`` does not state present or possible: a
    report written from them names those only to negate them."""
    found = set(named(states))
    return frozenset(
        p for f, prefixes in NAMING_PREFIXES.items() if f not in found for p in prefixes
    )


def contradicting_bigrams(states: Mapping[str, str]) -> frozenset[tuple[str, str]]:
    """The (word, next word) pairs decoding must not write for ``states``: a global-normal
    statement beside a present or possible finding (``global_normal_bigrams``), and the pleura
    called normal as a whole beside a pleural one (``PLEURAL_NORMAL_BIGRAMS``)."""
    pleural = PLEURAL_NORMAL_BIGRAMS if PLEURAL_FINDINGS & set(named(states)) else frozenset()
    return global_normal_bigrams(states) | pleural


def global_normal_bigrams(states: Mapping[str, str]) -> frozenset[tuple[str, str]]:
    """The (word, next word) pairs decoding must not write for ``states``: the global-normal
    statements where a finding is present or possible (a hedge beside "No acute
    cardiopulmonary abnormality." reads as a contradiction, and "The heart is large." beside a
    possible cardiomegaly reads as present), none otherwise."""
    return GLOBAL_NORMAL_PAIRS if {PRESENT, POSSIBLE} & set(states.values()) else frozenset()


def state_vector(states: Mapping[str, str]) -> list[float]:
    """The 43-entry condition of ``states``: present, possible and absent flags per finding,
    then 1 for normal where nothing is present or possible."""
    check(states)
    flags = [[1.0 if states.get(f) == s else 0.0 for f in FINDINGS14] for s in STATES]
    return flags[0] + flags[1] + flags[2] + [0.0 if named(states) else 1.0]


def states_of_vector(vector: Iterable[float]) -> FindingStates:
    """The states a condition vector holds: 43 entries (``state_vector``), or the 15-entry
    findings vector (its findings present, nothing else stated)."""
    values = list(vector)
    n = len(FINDINGS14)
    if len(values) == n + 1:
        return {f: PRESENT for f, v in zip(FINDINGS14, values) if v >= 0.5}
    if len(values) != STATE_WIDTH:
        raise ValueError(f"a condition has {n + 1} or {STATE_WIDTH} entries, got {len(values)}")
    states: FindingStates = {}
    for k, state in reversed(list(enumerate(STATES))):  # present wins over possible over absent
        for f, v in zip(FINDINGS14, values[k * n : (k + 1) * n]):
            if v >= 0.5:
                states[f] = state
    return {f: states[f] for f in FINDINGS14 if f in states}


def check(states: Mapping[str, str]) -> None:
    for finding, state in states.items():
        if finding not in FINDINGS14:
            raise ValueError(f"unknown finding {finding!r}; choose from {', '.join(FINDINGS14)}")
        if state not in STATES:
            raise ValueError(f"unknown state {state!r} of {finding}; choose from {STATES}")


# a finding's sentence names it as a report does where the condition's word says less
# ("Hernia.", "Possible nodule."); ChestX-ray14's hernias are hiatal hernias
LEAD_NAMES = {"Hernia": "hiatal hernia", "Edema": "pulmonary edema", "Nodule": "pulmonary nodule"}


def with_state(states: Mapping[str, str], state: str) -> list[str]:
    """The findings of ``states`` in ``state``, in ChestX-ray14 order."""
    return [f for f in FINDINGS14 if states.get(f) == state]


def _listed(findings: list[str]) -> str:
    return ", ".join(spoken_name(f) for f in findings) if findings else "none"


def states_words(states: Mapping[str, str]) -> str:
    """The states as words in the user turn: ``Present: cardiomegaly. Possible: none.
    Absent: pleural effusion, pneumothorax.``"""
    return " ".join(
        f"{state.capitalize()}: {_listed(with_state(states, state))}." for state in STATES
    )


def lead_sentences(states: Mapping[str, str], order: Iterable[str] | None = None) -> str:
    """One sentence per present or possible finding, present first: ``Cardiomegaly. Possible
    pleural effusion.`` ("" for none), each finding named as reports name it (``LEAD_NAMES``).
    ``order`` (most important first) sorts within a state."""
    ranked = list(order) if order is not None else list(FINDINGS14)
    sentences = []
    for state in (PRESENT, POSSIBLE):
        for finding in sorted(with_state(states, state), key=ranked.index):
            name = LEAD_NAMES.get(finding, spoken_name(finding))
            sentences.append(f"{name.capitalize()}." if state == PRESENT else f"Possible {name}.")
    return " ".join(sentences)


def manual_states(manual: Iterable[str] | Mapping[str, str]) -> FindingStates:
    """A condition set by hand as states: names are present; a mapping names each state
    (checked; in ChestX-ray14 order)."""
    if isinstance(manual, Mapping):
        states = {finding_named(f): s for f, s in manual.items()}
        check(states)
        return {f: states[f] for f in FINDINGS14 if f in states}
    chosen = {finding_named(f) for f in manual}
    return {f: PRESENT for f in FINDINGS14 if f in chosen}


def parse_states(text: str) -> FindingStates:
    """``"Effusion=possible, Cardiomegaly"`` → ``{"Cardiomegaly": "present", "Effusion":
    "possible"}``; a name alone is present; ``none`` (or "") states nothing."""
    states: FindingStates = {}
    for item in (part.strip() for part in text.split(",")):
        if not item or item.lower() == "none":
            continue
        name, _, state = item.partition("=")
        state = (state.strip() or PRESENT).lower()
        if state not in STATES:
            raise ValueError(
                f"unknown state {state!r} in {item!r}; choose from {', '.join(STATES)}"
            )
        states[finding_named(name)] = state
    return manual_states(states)


def states_from_statuses(statuses: Mapping[str, str | None]) -> FindingStates:
    """The labeler's report-level statuses (positive / uncertain / negative / None) as states."""
    return {f: FROM_LABELER[s] for f in FINDINGS14 if (s := statuses.get(f)) in FROM_LABELER}


def global_normal(text: str) -> bool:
    """Whether ``text`` says the whole study is normal ("No acute cardiopulmonary abnormality")."""
    return bool(GLOBAL_NORMAL.search(text))

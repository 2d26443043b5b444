"""What a radiologist reads, counted: the states a report states, its form, and its fidelity.

* ``content``: against each image's labels (NIH), the precision of the findings a report states
  present (hedges not counted), the share of normal images with none stated present, the
  findings stated present or possible per report, and micro-F1 with possible counted positive;
* ``form``: whether heart, lungs and pleura are all addressed (``mrg.text.anatomy``), words per report,
  a global-normal statement beside a present finding (``mrg.text.states.GLOBAL_NORMAL``), a
  finding both affirmed and negated, and the share of words outside a report vocabulary;
* ``state_fidelity``: given each report's condition (its states), the share of the stated
  findings whose state the labeler reads back from the report written, per state and in all.

Every count reads report text with the project's labeler, as the card's CE does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mrg.evaluation.text_quality import contradicted
from mrg.text.anatomy import ANATOMY, unaddressed
from mrg.text.labeler import ReportLabeler
from mrg.text.states import PRESENT, STATES, global_normal, named, states_from_statuses
from mrg.text.taxonomy import FINDINGS14
from mrg.text.vocabulary import words


def report_states(texts: Sequence[str], labeler: ReportLabeler) -> list[dict[str, str]]:
    """The states the labeler reads in each text (positive → present, uncertain → possible,
    negative → absent)."""
    return [states_from_statuses(labeler.statuses14(t)) for t in texts]


def _micro(decided: list[set[str]], truth: list[set[str]]) -> dict:
    hits = sum(len(d & t) for d, t in zip(decided, truth))
    stated, true = sum(map(len, decided)), sum(map(len, truth))
    precision, recall = hits / max(stated, 1), hits / max(true, 1)
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def content(
    texts: Sequence[str], image_labels: Sequence[Sequence[str]], labeler: ReportLabeler
) -> dict:
    """The content counts of ``texts`` against each image's ChestX-ray14 labels."""
    states = report_states(texts, labeler)
    present = [{f for f, s in st.items() if s == PRESENT} for st in states]
    found = [set(named(st)) for st in states]
    truth = [set(labels) & set(FINDINGS14) for labels in image_labels]
    normal = [not t for t in truth]
    return {
        "reports": len(texts),
        "present_precision": _micro(present, truth)["precision"],
        "present_per_report": sum(map(len, present)) / max(len(texts), 1),
        "normal_images": sum(normal),
        "normal_without_present": (
            sum(not p for p, n in zip(present, normal) if n) / sum(normal) if any(normal) else None
        ),
        "named_per_report": sum(map(len, found)) / max(len(texts), 1),
        "with_possible": _micro(found, truth),
    }


def form(
    texts: Sequence[str], labeler: ReportLabeler, vocabulary: frozenset[str] | None = None
) -> dict:
    """The form counts of ``texts`` (shares of reports, mean words per report)."""
    n = max(len(texts), 1)
    counts = [len(words(t)) for t in texts]
    states = report_states(texts, labeler)
    beside = sum(global_normal(t) and PRESENT in st.values() for t, st in zip(texts, states))
    out = {
        "reports": len(texts),
        "anatomy_all": sum(not unaddressed(t) for t in texts) / n,
        "anatomy": {part: sum(bool(p.search(t)) for t in texts) / n for part, p in ANATOMY.items()},
        "words_mean": sum(counts) / n,
        "words_in_range": sum(25 <= c <= 60 for c in counts) / n,
        "global_normal_beside_present": beside / n,
        "affirm_and_negate": sum(bool(contradicted(t, labeler)) for t in texts) / n,
    }
    if vocabulary is not None:
        written = [w for t in texts for w in words(t)]
        out["outside_vocabulary"] = sum(w not in vocabulary for w in written) / max(len(written), 1)
    return out


def state_fidelity(
    given: Sequence[Mapping[str, str]], texts: Sequence[str], labeler: ReportLabeler
) -> dict:
    """Of the findings each condition states, the share whose state the labeler reads back
    in the report written from it: in all, and per state (stated, read back)."""
    read = report_states(texts, labeler)
    per = {s: {"stated": 0, "read_back": 0} for s in STATES}
    for condition, written in zip(given, read):
        for finding, state in condition.items():
            per[state]["stated"] += 1
            per[state]["read_back"] += written.get(finding) == state
    stated = sum(p["stated"] for p in per.values())
    return {
        "fidelity": sum(p["read_back"] for p in per.values()) / max(stated, 1),
        "per_state": per,
        "reports": len(texts),
    }

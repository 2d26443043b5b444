"""How far the findings head's probabilities and states can be trusted, measured.

* ``calibration_report``: ECE and Brier per finding and over all 14, the expected against the
  labelled count of findings per image, and the reliability diagram's bins;
* ``states_report``: the head's states against the labels (precision of present, normal
  images with none present, findings named per image, micro-F1 with possible counted) beside
  the image-free constants;
* ``negated_shares``: how often real reports negate each finding (which may be stated absent).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from mrg.text.labeler import NEGATIVE, ReportLabeler
from mrg.text.states import POSSIBLE, PRESENT
from mrg.text.taxonomy import FINDINGS14


def negated_shares(reports: Iterable[str], labeler: ReportLabeler | None = None) -> np.ndarray:
    """Per finding, the share of ``reports`` that negate it (the labeler's report-level status
    is negative): which findings a real report states as absent, and how often."""
    labeler = labeler or ReportLabeler()
    counts, n = np.zeros(len(FINDINGS14)), 0
    for text in reports:
        statuses = labeler.statuses14(text)
        counts += [statuses[f] == NEGATIVE for f in FINDINGS14]
        n += 1
    return counts / max(n, 1)


def state_mask(states: list[dict[str, str]], *wanted: str) -> np.ndarray:
    """``[N, 14]``: whether each image's states put each finding in one of ``wanted``
    (``PRESENT, POSSIBLE``: the findings a report names)."""
    mask = [[s.get(f) in wanted for f in FINDINGS14] for s in states]
    return np.array(mask, dtype=bool).reshape(len(states), len(FINDINGS14))


def states_report(states: list[dict[str, str]], labels: np.ndarray, train_rate: np.ndarray) -> dict:
    """What the head's states say against the labels: precision of the findings stated
    present, the share of normal images with none present, findings named present or
    possible per image, micro-F1 with possible counted as positive, and the same micro-F1 of
    the image-free constants that name the 1–3 most frequent training findings."""
    present, named = state_mask(states, PRESENT), state_mask(states, PRESENT, POSSIBLE)
    truth = labels > 0
    normal = ~truth.any(1)

    def micro(decided: np.ndarray) -> dict:
        hits = float((decided & truth).sum())
        precision, recall = hits / max(decided.sum(), 1), hits / max(truth.sum(), 1)
        f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
        return {"precision": precision, "recall": recall, "f1": f1}

    constants = {}
    for k in (1, 2, 3):
        decided = np.zeros_like(truth)
        decided[:, np.argsort(-train_rate)[:k]] = True
        constants[f"top{k}"] = micro(decided)
    return {
        "images": len(states),
        "present_precision": micro(present)["precision"],
        "present_per_image": float(present.sum(1).mean()),
        "normal_images": int(normal.sum()),
        "normal_without_present": float((~present[normal].any(1)).mean()) if normal.any() else None,
        "named_per_image": float(named.sum(1).mean()),
        "with_possible": micro(named),
        "constants": constants,
        "stated_absent": {f: int(sum(s.get(f) == "absent" for s in states)) for f in FINDINGS14},
    }


def expected_calibration_error(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = 10
) -> float:
    """ECE: Σ_bins (n_bin / N) · |mean p − observed rate| over equal-width bins of p."""
    p, y = probabilities.ravel(), labels.ravel()
    which = np.minimum((p * bins).astype(int), bins - 1)
    return float(
        sum(
            (which == k).mean() * abs(p[which == k].mean() - y[which == k].mean())
            for k in range(bins)
            if (which == k).any()
        )
    )


def reliability(probabilities: np.ndarray, labels: np.ndarray, bins: int = 10) -> list[dict]:
    """The reliability diagram's bins: mean probability, observed rate and count per bin."""
    p, y = probabilities.ravel(), labels.ravel()
    which = np.minimum((p * bins).astype(int), bins - 1)
    return [
        {
            "bin": k,
            "mean_p": float(p[which == k].mean()),
            "rate": float(y[which == k].mean()),
            "count": int((which == k).sum()),
        }
        for k in range(bins)
        if (which == k).any()
    ]


def calibration_report(probabilities: np.ndarray, labels: np.ndarray) -> dict:
    """ECE and Brier per finding and over all 14, the expected against the labelled count of
    findings per image, and the reliability bins."""
    return {
        "ece": expected_calibration_error(probabilities, labels),
        "brier": float(((probabilities - labels) ** 2).mean()),
        "per_finding": {
            f: {
                "ece": expected_calibration_error(probabilities[:, c], labels[:, c]),
                "brier": float(((probabilities[:, c] - labels[:, c]) ** 2).mean()),
                "mean_p": float(probabilities[:, c].mean()),
                "rate": float(labels[:, c].mean()),
            }
            for c, f in enumerate(FINDINGS14)
        },
        "expected_count": float(probabilities.sum(1).mean()),
        "labelled_count": float(labels.sum(1).mean()),
        "reliability": reliability(probabilities, labels),
    }

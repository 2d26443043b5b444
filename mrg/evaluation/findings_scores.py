"""Ranking scores of the findings head: AUROC and average precision per finding, their
means over findings, 95 % bootstrap intervals, and the paired bootstrap of a difference.

Every function takes ``labels [N, 14]`` (0/1) and ``scores [N, 14]`` (any monotone score:
logits or probabilities) in ``FINDINGS14`` order. A mean counts the findings with at least
``min_positives`` positives; a bootstrap resamples images (rows) with replacement.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from sklearn.metrics import roc_auc_score

from mrg.text.taxonomy import FINDINGS14

MIN_TEST_POSITIVES = 5  # findings with fewer test positives are shown, not averaged
Metric = Callable[[np.ndarray, np.ndarray], float]


def per_finding(
    labels: np.ndarray, scores: np.ndarray, metric: Metric = roc_auc_score
) -> dict[str, float | None]:
    """``metric`` of each finding; None where the rows hold no positive or no negative."""
    out = {}
    for c, finding in enumerate(FINDINGS14):
        column = labels[:, c]
        out[finding] = (
            float(metric(column, scores[:, c])) if 0 < column.sum() < len(column) else None
        )
    return out


def auroc_per_finding(labels: np.ndarray, scores: np.ndarray) -> dict[str, float | None]:
    return per_finding(labels, scores, roc_auc_score)


def counted_findings(labels: np.ndarray, min_positives: int = MIN_TEST_POSITIVES) -> list[int]:
    """The columns a mean averages: findings with at least ``min_positives`` positives."""
    return [c for c in range(labels.shape[1]) if labels[:, c].sum() >= min_positives]


def mean_score(
    labels: np.ndarray,
    scores: np.ndarray,
    min_positives: int = MIN_TEST_POSITIVES,
    metric: Metric = roc_auc_score,
) -> float:
    """The mean of ``metric`` over the counted findings (NaN when none is)."""
    per = list(per_finding(labels, scores, metric).values())
    values = [per[c] for c in counted_findings(labels, min_positives) if per[c] is not None]
    return float(np.mean(values)) if values else float("nan")


def mean_auroc(
    labels: np.ndarray, scores: np.ndarray, min_positives: int = MIN_TEST_POSITIVES
) -> float:
    return mean_score(labels, scores, min_positives, roc_auc_score)


def bootstrap_scores(
    labels: np.ndarray,
    scores: np.ndarray,
    n: int = 1000,
    seed: int = 0,
    min_positives: int = MIN_TEST_POSITIVES,
    metric: Metric = roc_auc_score,
) -> dict[str, tuple[float, float]]:
    """95 % percentile intervals of each finding's ``metric`` and of the mean (``"mean"``)
    over the findings counted on the full rows, resampling images."""
    rng = np.random.default_rng(seed)
    counted = counted_findings(labels, min_positives)
    samples: dict[str, list[float]] = {f: [] for f in FINDINGS14} | {"mean": []}
    for _ in range(n):
        idx = rng.integers(0, len(labels), len(labels))
        per = per_finding(labels[idx], scores[idx], metric)
        for finding, value in per.items():
            if value is not None:
                samples[finding].append(value)
        means = [per[FINDINGS14[c]] for c in counted if per[FINDINGS14[c]] is not None]
        if means:
            samples["mean"].append(float(np.mean(means)))
    return {
        k: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5)))
        for k, v in samples.items()
        if len(v) >= n // 2
    }


def bootstrap_auroc(
    labels: np.ndarray, scores: np.ndarray, n: int = 1000, seed: int = 0
) -> dict[str, tuple[float, float]]:
    return bootstrap_scores(labels, scores, n, seed)


def paired_difference(
    labels: np.ndarray,
    scores: np.ndarray,
    reference: np.ndarray,
    n: int = 1000,
    seed: int = 0,
    min_positives: int = MIN_TEST_POSITIVES,
) -> tuple[float, float, float]:
    """Mean AUROC of ``scores`` minus that of ``reference`` on the same images: (the
    difference, its 95 % paired-bootstrap interval's low and high ends)."""
    rng = np.random.default_rng(seed)
    counted = counted_findings(labels, min_positives)

    def gap(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
        pairs = [
            (roc_auc_score(y[:, c], a[:, c]), roc_auc_score(y[:, c], b[:, c]))
            for c in counted
            if 0 < y[:, c].sum() < len(y)
        ]
        return float(np.mean([x - z for x, z in pairs]))

    samples = []
    for _ in range(n):
        idx = rng.integers(0, len(labels), len(labels))
        samples.append(gap(labels[idx], scores[idx], reference[idx]))
    low, high = np.percentile(samples, [2.5, 97.5])
    return gap(labels, scores, reference), float(low), float(high)

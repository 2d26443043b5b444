"""How much of the findings a frozen feature carries: a linear probe, scored like a report.

A report names a few findings; clinical efficacy counts them against the image's labels.
``probe_micro_f1`` asks what a report would score if it named, for each image, the ``k``
findings a logistic-regression probe on frozen image features finds most likely, and
``constant_micro_f1`` what it would score naming the ``k`` findings most frequent in
training for every image. The first is a ceiling for what an image encoder on top of the
same features can learn from the same images; the second needs no image.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.preprocessing import StandardScaler


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """``[N, L]`` scores → a 0/1 matrix with the ``k`` highest of each row set."""
    chosen = np.zeros_like(scores, dtype=int)
    np.put_along_axis(chosen, np.argsort(-scores, axis=1)[:, :k], 1, axis=1)
    return chosen


def micro_f1(truth: np.ndarray, predicted: np.ndarray) -> float:
    return float(f1_score(truth.ravel(), predicted.ravel(), zero_division=0.0))


def probe_scores(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, c: float = 0.01
) -> np.ndarray:
    """Per-label probabilities from one L2-regularised logistic regression per label
    (standardised features; a label never or always present in training scores its rate)."""
    scaler = StandardScaler().fit(train_x)
    train_x, test_x = scaler.transform(train_x), scaler.transform(test_x)
    scores = np.zeros((len(test_x), train_y.shape[1]))
    for label in range(train_y.shape[1]):
        column = train_y[:, label]
        if column.min() == column.max():
            scores[:, label] = column.mean()
            continue
        probe = LogisticRegression(C=c, max_iter=5000).fit(train_x, column)
        scores[:, label] = probe.predict_proba(test_x)[:, 1]
    return scores


def probe_micro_f1(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    ks: tuple[int, ...] = (1, 2, 3),
) -> dict[int, float]:
    scores = probe_scores(train_x, train_y, test_x)
    return {k: micro_f1(test_y, top_k(scores, k)) for k in ks}


def constant_micro_f1(
    train_y: np.ndarray, test_y: np.ndarray, ks: tuple[int, ...] = (1, 2, 3)
) -> dict[int, float]:
    frequency = np.broadcast_to(train_y.mean(axis=0), test_y.shape)
    return {k: micro_f1(test_y, top_k(frequency, k)) for k in ks}

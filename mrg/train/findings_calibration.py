"""Calibrating the findings head on labelled images it did not train on.

Given the head's raw logits z and the labels of such images (a validation split, or the
out-of-fold logits of cross-validation):

    (T_c, b_c)  Platt scaling: argmin NLL of σ(z_c / T_c + b_c), log T_c pulled towards 0
    t_c         the F1 operating point (fewer than 3 positives: the training rate's quantile)
    t⁺_c        the present point: the lowest threshold of precision ≥ 0.5 over at least 5
                true positives (∞: none)
    t°          the possible point, one for all findings: with the present ones named, each
                image's next most probable up to ``MAX_NAMED`` named where p ≥ t°, at the t°
                of best micro-F1 over all (image, finding) pairs (the CE a report scores;
                for calibrated p the best point of micro-F1 F* sits near F*/2)

and, from real reports, how often each finding is negated (``negated_shares``).
``fit_temperatures`` is the temperature-only calibration the head had before, kept as the
card's "before" row.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score

from mrg.model.findings import MAX_NAMED, FindingsHead


def fit_temperatures(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-finding T minimising the NLL of σ(z / T) on ``labels``, in [0.25, 4]."""
    log_t = torch.zeros(logits.shape[1], requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200)

    def closure():
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return log_t.detach().exp().clamp(0.25, 4.0)


def operating_points(
    probabilities: np.ndarray, labels: np.ndarray, train_rate: np.ndarray, min_positives: int = 3
) -> np.ndarray:
    """Per finding, the threshold of highest F1 on ``labels`` (ties: the higher threshold);
    with fewer than ``min_positives`` positives, the quantile naming it at its training rate."""
    thresholds = np.zeros(labels.shape[1])
    for c in range(labels.shape[1]):
        p, y = probabilities[:, c], labels[:, c]
        if y.sum() < min_positives:
            thresholds[c] = float(np.quantile(p, 1 - train_rate[c]))
            continue
        candidates = np.unique(p)
        scores = [f1_score(y, p >= t, zero_division=0.0) for t in candidates]
        best = max(range(len(candidates)), key=lambda i: (scores[i], candidates[i]))
        thresholds[c] = float(candidates[best])
    return thresholds


def fit_platt(
    logits: torch.Tensor, labels: torch.Tensor, l2: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per finding (T, b) minimising the NLL of σ(z / T + b) on ``labels`` (Platt scaling:
    the temperature and the prior, which the imbalance-aware loss shifted), with an L2 pull
    of log(1/T) towards 0 so that a finding with few positives keeps a sane slope."""
    log_a = torch.zeros(logits.shape[1], requires_grad=True)
    b = torch.zeros(logits.shape[1], requires_grad=True)
    optimizer = torch.optim.LBFGS([log_a, b], lr=0.5, max_iter=500)

    def closure():
        optimizer.zero_grad()
        nll = F.binary_cross_entropy_with_logits(logits * log_a.exp() + b, labels)
        loss = nll * logits.shape[1] + l2 * (log_a**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return (-log_a.detach()).exp(), b.detach()


def present_points(
    probabilities: np.ndarray, labels: np.ndarray, precision: float = 0.5, min_true: int = 5
) -> np.ndarray:
    """Per finding, the lowest threshold at which the images above it are positive at least
    ``precision`` of the time, with at least ``min_true`` true positives; ∞ where none is.
    (With 2, infiltration, emphysema and hernia had points of 2 of 4, 2 of 4 and 3 of 6
    images out of fold, and on the test split stated 3 findings present, none right.)"""
    points = np.full(labels.shape[1], np.inf)
    for c in range(labels.shape[1]):
        p, y = probabilities[:, c], labels[:, c]
        for t in np.unique(p):
            above = p >= t
            hits = y[above].sum()
            if hits >= min_true and hits / above.sum() >= precision:
                points[c] = float(t)
                break
    return points


def possible_point(
    probabilities: np.ndarray, labels: np.ndarray, present: np.ndarray, cap: int = MAX_NAMED
) -> float:
    """The possible point t° (module docstring): ``present`` ``[N, 14]`` is named; of the rest,
    each image's ``cap − #present`` most probable are the candidates, named where p ≥ t°
    (tied candidates all or none). Ties of F1: the higher t°; ∞ where naming none scores
    best."""
    truth = labels > 0
    rest = np.where(present, -np.inf, probabilities)
    rank = np.argsort(np.argsort(-rest, axis=1, kind="stable"), axis=1)
    slots = np.clip(cap - present.sum(1, keepdims=True), 0, None)
    candidate = ~present & (rank < slots)
    order = np.argsort(-probabilities[candidate], kind="stable")
    scores, hits = probabilities[candidate][order], truth[candidate][order]
    # the cuts p ≥ t° can make: none, or after the last of each run of equal scores
    cuts = np.unique([0, *(np.flatnonzero(np.diff(scores)) + 1), len(scores)])
    named = present.sum() + cuts
    true = (present & truth).sum() + np.concatenate([[0], np.cumsum(hits)])[cuts]
    f1 = 2 * true / np.maximum(named + truth.sum(), 1)
    best = cuts[int(np.argmax(f1))]  # the first maximum: the fewest named, the highest point
    return float(scores[best - 1]) if best > 0 else float("inf")


def calibrate(
    head: FindingsHead,
    logits: torch.Tensor,
    labels: torch.Tensor,
    train_rate: np.ndarray,
    negated: np.ndarray | None = None,
) -> None:
    """Set the head's calibration (T, b), F1 operating points, present points and possible
    point from the raw ``logits`` of labelled images it did not train on; ``negated``
    (``negated_shares`` of real reports) says which findings may be stated absent."""
    temperature, bias = fit_platt(logits, labels)
    head.temperature.copy_(temperature)
    head.bias.copy_(bias)
    probabilities = head.probabilities(logits).numpy()
    y = labels.numpy()
    head.threshold.copy_(torch.from_numpy(operating_points(probabilities, y, train_rate)))
    head.present_threshold.copy_(torch.from_numpy(present_points(probabilities, y)))
    present = probabilities >= head.present_threshold.numpy()
    head.possible_threshold.fill_(possible_point(probabilities, y, present))
    if negated is not None:
        head.negated_share.copy_(torch.from_numpy(negated))

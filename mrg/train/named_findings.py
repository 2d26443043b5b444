"""How far the findings head caps the CE of the findings a report names, out of fold.

    nested calibration  fold k's probabilities and states come from the shipped ``calibrate``
                        fitted on the other folds' out-of-fold logits: no image calibrates
                        its own score (``nested``)
    micro-F1            2·TP / (named + labelled) over all (image, finding) pairs, "possible"
                        counted as named: the CE the model card reports

What a report names, each a boolean ``[N, 14]``:

    states     what the shipped ``FindingsHead.states`` name: present or possible
               (``mrg.evaluation.calibration.state_mask``; possible ones fill up to
               ``MAX_NAMED`` an image)
    top_k      the ``k`` most probable findings of every image (``mrg.evaluation.probe``,
               as is ``micro_f1``)
    at_mean    one threshold over all pairs, so that images name ``mean`` findings on average;
               ``cap``: at most that many an image (the most probable), as the issue's rule
               of at most two possible findings a report asks; without it some images name
               four or more, which no report should hedge
"""

from __future__ import annotations

import numpy as np
import torch

from mrg.evaluation.probe import top_k
from mrg.model.findings import FindingsHead, FindingsHeadConfig
from mrg.text.states import FindingStates
from mrg.train.findings_calibration import calibrate


def nested(
    logits: torch.Tensor, labels: torch.Tensor, folds: np.ndarray
) -> tuple[np.ndarray, list[FindingStates]]:
    """(calibrated probabilities ``[N, 14]``, each image's states), each fold's from a
    calibration fitted on the other folds."""
    probabilities = np.zeros(tuple(logits.shape))
    states: list[FindingStates] = [{} for _ in range(len(logits))]
    for fold in np.unique(folds):
        fit, held = torch.from_numpy(folds != fold), folds == fold
        head = FindingsHead(FindingsHeadConfig(), load_weights=False)
        with torch.no_grad():
            calibrate(head, logits[fit], labels[fit], labels[fit].mean(0).numpy())
            p = head.probabilities(logits[torch.from_numpy(held)])
        probabilities[held] = p.numpy()
        for i, image_states in zip(np.flatnonzero(held), head.states(p)):
            states[i] = image_states
    return probabilities, states


def at_mean(probabilities: np.ndarray, mean: float, cap: int | None = None) -> np.ndarray:
    """One threshold over the pairs (each image's ``cap`` most probable where capped) so that
    images name ``mean`` findings on average (ties may add a few)."""
    eligible = (
        top_k(probabilities, cap).astype(bool)
        if cap is not None
        else np.ones(probabilities.shape, dtype=bool)
    )
    scores = np.where(eligible, probabilities, -1.0)
    count = min(round(mean * len(scores)), int(eligible.sum()))
    if count == 0:
        return np.zeros(probabilities.shape, dtype=bool)
    threshold = np.sort(scores, axis=None)[::-1][count - 1]
    return scores >= threshold

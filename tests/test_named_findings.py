"""What a report would name, out of fold (``mrg.train.named_findings``): synthetic logits."""

import numpy as np
import torch

from mrg.evaluation.calibration import state_mask
from mrg.evaluation.probe import micro_f1, top_k
from mrg.model.findings import MAX_NAMED
from mrg.text.states import ABSENT, POSSIBLE, PRESENT
from mrg.text.taxonomy import FINDINGS14
from mrg.train.named_findings import at_mean, nested


def named(states):
    return state_mask(states, PRESENT, POSSIBLE)


def synthetic(n: int = 100, seed: int = 0):
    """Labels at 15 % prevalence and logits that rank them better than chance; 5 folds."""
    rng = np.random.default_rng(seed)
    labels = torch.from_numpy((rng.random((n, len(FINDINGS14))) < 0.15).astype(np.float32))
    logits = 1.5 * labels + torch.from_numpy(rng.normal(size=labels.shape)).float() - 2.0
    return logits, labels, np.arange(n) % 5


def test_micro_f1_counts_pairs_over_all_images():
    assert micro_f1(np.zeros((2, 3), dtype=bool), np.zeros((2, 3))) == 0.0
    labels = np.array([[1, 0, 0], [1, 1, 0]])
    named = np.array([[True, True, False], [False, True, False]])
    assert micro_f1(labels, named) == 2 * 2 / (3 + 3)


def test_top_k_names_each_image_s_most_probable():
    p = np.array([[0.1, 0.5, 0.3], [0.9, 0.2, 0.4]])
    assert top_k(p, 2).tolist() == [[False, True, True], [True, False, True]]


def test_at_mean_uses_one_threshold_and_the_cap():
    p = np.array([[0.9, 0.8, 0.7], [0.2, 0.1, 0.05]])
    free = at_mean(p, 1.5)  # three pairs: all three of the first image
    assert free.tolist() == [[True, True, True], [False, False, False]]
    capped = at_mean(p, 1.5, cap=2)  # at most two an image: the second image's best comes in
    assert capped.tolist() == [[True, True, False], [True, False, False]]
    assert at_mean(p, 0.0).sum() == 0
    assert at_mean(p, 5.0, cap=2).sum() == 4  # never more than the eligible pairs
    tied = at_mean(np.array([[0.5, 0.5], [0.1, 0.2]]), 0.5)  # one pair asked, two tied
    assert tied.tolist() == [[True, True], [False, False]]


def test_nested_states_fill_up_to_max_named_and_beat_chance():
    logits, labels, folds = synthetic()
    p, states = nested(logits, labels, folds)
    assert p.shape == named(states).shape == tuple(labels.shape) and ((p > 0) & (p < 1)).all()
    for image in states:
        present = sum(s == PRESENT for s in image.values())
        assert sum(s == POSSIBLE for s in image.values()) <= max(0, MAX_NAMED - present)
    shuffled = np.random.default_rng(1).permutation(labels.numpy())
    assert micro_f1(labels.numpy(), named(states)) > micro_f1(shuffled, named(states))
    assert micro_f1(labels.numpy(), top_k(p, 2)) > micro_f1(shuffled, top_k(p, 2))


def test_a_state_mask_counts_present_and_possible_not_absent():
    states = [{"Effusion": PRESENT, "Nodule": POSSIBLE, "Pneumothorax": ABSENT}, {}]
    chosen = named(states)
    assert chosen[0, FINDINGS14.index("Effusion")] and chosen[0, FINDINGS14.index("Nodule")]
    assert chosen.sum() == 2 and state_mask(states, PRESENT).sum() == 1
    assert state_mask([], PRESENT).shape == (0, len(FINDINGS14))


def test_no_fold_is_calibrated_on_its_own_labels():
    logits, labels, folds = synthetic()
    p, _ = nested(logits, labels, folds)
    changed = labels.clone()
    changed[torch.from_numpy(folds == 0)] = 1.0 - changed[torch.from_numpy(folds == 0)]
    q, _ = nested(logits, changed, folds)
    assert np.allclose(p[folds == 0], q[folds == 0])  # fold 0's own labels do not move it
    assert not np.allclose(p[folds != 0], q[folds != 0])  # they calibrate the other folds

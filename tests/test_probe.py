"""The linear-probe ceiling and the constant baseline of the demo model card."""

import numpy as np
import pytest

from mrg.evaluation.probe import constant_micro_f1, micro_f1, probe_micro_f1, top_k


def one_label_data(n: int, informative: bool, seed: int):
    """Three labels, one per image; the first feature says which when ``informative``."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    x = rng.normal(size=(n, 8))
    if informative:
        x[:, 0] = labels * 4.0 + rng.normal(scale=0.1, size=n)
        x[:, 1] = (labels == 1) * 4.0
    return x, np.eye(3, dtype=int)[labels]


def test_top_k_sets_the_k_highest_scores():
    chosen = top_k(np.array([[0.1, 0.7, 0.3], [0.9, 0.2, 0.5]]), 2)
    assert chosen.tolist() == [[0, 1, 1], [1, 0, 1]]


def test_probe_reads_an_informative_feature_and_not_noise():
    train_x, train_y = one_label_data(300, informative=True, seed=0)
    test_x, test_y = one_label_data(100, informative=True, seed=1)
    assert probe_micro_f1(train_x, train_y, test_x, test_y, ks=(1,))[1] > 0.95
    train_x, train_y = one_label_data(300, informative=False, seed=0)
    test_x, test_y = one_label_data(300, informative=False, seed=1)
    assert probe_micro_f1(train_x, train_y, test_x, test_y, ks=(1,))[1] < 0.5


def test_constant_baseline_names_the_most_frequent_labels():
    train_y = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]])
    test_y = np.array([[1, 0, 0], [0, 0, 1]])
    # k=1 names label 0 for both: TP 1, FP 1, FN 1 → F1 0.5
    assert constant_micro_f1(train_y, test_y, ks=(1,))[1] == pytest.approx(0.5)
    assert micro_f1(test_y, np.zeros_like(test_y)) == 0.0

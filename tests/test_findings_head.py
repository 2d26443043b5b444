"""The findings head: its losses, calibration, operating points, decisions and persistence
(tiny synthetic data; the trained head's figures are in assets/findings_metrics.json)."""

import numpy as np
import pytest
import torch

from mrg.data.views import Views
from mrg.evaluation.findings_scores import bootstrap_auroc, mean_auroc
from mrg.model.findings import FindingsHead, FindingsHeadConfig
from mrg.text.taxonomy import FINDINGS14
from mrg.train.findings import asymmetric_loss, weighted_bce
from mrg.train.findings_calibration import fit_temperatures, operating_points


def test_asymmetric_loss_spares_easy_negatives_and_keeps_positives():
    targets = torch.tensor([[1.0, 0.0]])
    easy_negative = asymmetric_loss(torch.tensor([[5.0, -3.0]]), targets)
    hard_negative = asymmetric_loss(torch.tensor([[5.0, 3.0]]), targets)
    missed_positive = asymmetric_loss(torch.tensor([[-3.0, -3.0]]), targets)
    assert easy_negative < 0.01  # p = 0.047 is within the margin: no loss at all
    assert hard_negative > 1.0 and missed_positive > 3.0
    bce = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor([[5.0, -3.0]]), targets)
    assert easy_negative < bce  # plain BCE still pushes the easy negative


def test_weighted_bce_weighs_positives_by_their_rarity():
    logits, targets = torch.zeros(1, 2), torch.tensor([[1.0, 0.0]])
    plain = weighted_bce(logits, targets, torch.ones(2))
    heavy = weighted_bce(logits, targets, torch.tensor([9.0, 9.0]))
    assert torch.isclose(heavy, plain * 5)  # (9·log2 + log2) / 2 against (log2 + log2) / 2


def test_temperature_recovers_the_scale_of_overconfident_logits():
    torch.manual_seed(0)
    true_logits = torch.randn(4000, 2) * 2
    labels = torch.bernoulli(torch.sigmoid(true_logits))
    temperatures = fit_temperatures(true_logits * 3.0, labels)  # three times too confident
    assert torch.allclose(temperatures, torch.full((2,), 3.0), atol=0.3)


def test_operating_point_maximises_f1_and_falls_back_to_the_training_rate():
    p = np.array([[0.1, 0.2], [0.4, 0.3], [0.6, 0.9], [0.8, 0.1]])
    y = np.array([[0, 0], [0, 0], [1, 1], [1, 0]])
    thresholds = operating_points(p, y, train_rate=np.array([0.5, 0.25]), min_positives=2)
    assert thresholds[0] == pytest.approx(0.6)  # names exactly the two positives: F1 = 1
    assert thresholds[1] == pytest.approx(np.quantile(p[:, 1], 0.75))  # one positive only


def test_decisions_add_normal_where_nothing_reaches_its_operating_point():
    head = FindingsHead(load_weights=False)
    head.threshold.fill_(0.5)
    p = torch.full((2, len(FINDINGS14)), 0.2)
    p[0, FINDINGS14.index("Cardiomegaly")] = 0.7
    y = head.decide(p)
    assert y.shape == (2, 15)
    assert y[0, FINDINGS14.index("Cardiomegaly")] == 1 and y[0, -1] == 0
    assert y[1, :-1].sum() == 0 and y[1, -1] == 1


def test_only_the_chosen_parts_train_and_frozen_batchnorm_stays_in_eval():
    head = FindingsHead(FindingsHeadConfig(trainable="last_stages"), load_weights=False).train()
    trainable = {n.split(".")[1] for n, p in head.named_parameters() if p.requires_grad}
    assert "blocks" in trainable and "conv_head" in trainable
    assert not head.backbone.conv_stem.weight.requires_grad
    assert not head.backbone.bn1.training and head.backbone.bn2.training
    only_classifier = FindingsHead(FindingsHeadConfig(trainable="classifier"), load_weights=False)
    assert [n for n, p in only_classifier.named_parameters() if p.requires_grad] == [
        "classifier.weight",
        "classifier.bias",
    ]


def test_a_study_takes_the_mean_of_its_present_views_and_survives_a_round_trip(tmp_path):
    torch.manual_seed(0)
    head = FindingsHead(FindingsHeadConfig(image_size=64), load_weights=False).eval()
    head.temperature.fill_(2.0)
    images = torch.rand(1, 2, 1, 64, 64)
    both = head(Views(images, torch.tensor([[0, 1]]), torch.tensor([[True, True]])))
    front = head(Views(images[:, :1], torch.tensor([[0]]), torch.tensor([[True]])))
    masked = head(Views(images, torch.tensor([[0, 1]]), torch.tensor([[True, False]])))
    assert torch.allclose(masked, front, atol=1e-5) and not torch.allclose(both, front)
    # from the views' pooled features (the pass the gate made): the same reading
    probabilities, y = head.predict_pooled(head.features(images[0]))
    assert torch.allclose(probabilities, head.probabilities(both), atol=1e-6)
    assert torch.equal(y, head.decide(head.probabilities(both)))
    loaded = FindingsHead.from_pretrained(head.save_pretrained(tmp_path / "findings"))
    assert torch.equal(loaded.temperature, head.temperature)
    assert torch.allclose(
        loaded(Views(images, torch.tensor([[0, 1]]), torch.ones(1, 2, dtype=torch.bool))), both
    )


def test_views_of_another_side_are_read_at_the_heads_own():
    torch.manual_seed(0)
    head = FindingsHead(FindingsHeadConfig(image_size=64), load_weights=False).eval()
    small = torch.rand(1, 1, 1, 32, 32)
    index, mask = torch.tensor([[0]]), torch.tensor([[True]])
    seen = []
    hook = head.backbone.conv_stem.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    logits = head(Views(small, index, mask))
    hook.remove()
    assert seen == [torch.Size([1, 3, 64, 64])] and logits.shape == (1, len(FINDINGS14))
    # bilinear, antialiased when shrinking: the same reading as the views resized before
    resize = torch.nn.functional.interpolate
    for views in (small, torch.rand(1, 1, 1, 160, 160)):
        resized = resize(views[0], size=(64, 64), mode="bilinear", antialias=True).unsqueeze(0)
        assert torch.allclose(head(Views(views, index, mask)), head(Views(resized, index, mask)))


def test_auroc_is_averaged_over_findings_with_enough_positives_with_intervals():
    rng = np.random.default_rng(0)
    labels = np.zeros((60, len(FINDINGS14)))
    labels[:20, 0] = 1  # 20 positives, perfectly ranked
    labels[:2, 1] = 1  # 2 positives: shown, not averaged
    scores = rng.random(labels.shape)
    scores[:, 0] = labels[:, 0] + 0.1 * rng.random(60)
    assert mean_auroc(labels, scores) == 1.0
    intervals = bootstrap_auroc(labels, scores, n=50)
    assert intervals["mean"] == pytest.approx((1.0, 1.0)) and FINDINGS14[2] not in intervals

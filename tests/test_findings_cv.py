"""Cross-validating the findings head (``mrg.train.findings_cv``), its recipe and its scores
(tiny synthetic images; the measured table is assets/findings_cv.json)."""

import numpy as np
import pytest
import torch
from conftest import shared_path

from mrg.config import ConfigError
from mrg.evaluation.calibration import state_mask
from mrg.evaluation.findings_scores import paired_difference
from mrg.evaluation.probe import micro_f1
from mrg.model.encoder import EFFICIENTNET_LITES, efficientnet_lite_state_dict
from mrg.model.findings import FindingsHead, FindingsHeadConfig
from mrg.text.states import POSSIBLE, PRESENT
from mrg.text.taxonomy import FINDINGS14
from mrg.train.findings import (
    FindingsRecipe,
    LabelledImages,
    RandomGamma,
    augmentation,
    load_labelled,
    train_findings_head,
)
from mrg.train.findings_calibration import calibrate
from mrg.train.findings_cv import (
    CV_ROWS,
    CVRow,
    cross_validate,
    ensemble_logits,
    patient_folds,
)


def tiny_images(n: int = 20, seed: int = 0) -> LabelledImages:
    """``n`` random 40-px images, two per patient, every finding with positives."""
    rng = np.random.default_rng(seed)
    labels = torch.from_numpy((rng.random((n, len(FINDINGS14))) < 0.3).astype(np.float32))
    labels[0], labels[1] = 1.0, 0.0
    pixels = torch.from_numpy(rng.integers(0, 255, (n, 1, 40, 40), dtype=np.uint8))
    return LabelledImages(
        [f"{i}.png" for i in range(n)], pixels, labels, [str(i // 2) for i in range(n)]
    )


def test_folds_keep_each_patient_s_images_together_and_cover_every_fold():
    patients = [str(i // 3) for i in range(30)]
    folds = patient_folds(patients, k=5)
    assert sorted(set(folds)) == [0, 1, 2, 3, 4]
    for patient in set(patients):
        assert len({folds[i] for i, p in enumerate(patients) if p == patient}) == 1
    assert max(np.bincount(folds)) - min(np.bincount(folds)) <= 3


def test_an_ensemble_is_the_mean_of_its_members_logits():
    loud = torch.tensor([[10.0], [20.0]])
    assert torch.equal(ensemble_logits([loud, -loud / 2]), loud / 4)


def test_the_paired_gain_is_zero_for_the_same_scores_and_positive_for_better_ones():
    rng = np.random.default_rng(0)
    labels = (rng.random((200, len(FINDINGS14))) < 0.3).astype(float)
    noisy = labels + rng.normal(0, 1.0, labels.shape)
    sharper = labels + rng.normal(0, 0.3, labels.shape)
    same = paired_difference(labels, noisy, noisy, n=50)
    assert same == (0.0, 0.0, 0.0)
    gain, low, high = paired_difference(labels, sharper, noisy, n=50)
    assert 0 < low < gain < high


def test_a_recipe_rejects_what_it_cannot_do():
    with pytest.raises(ConfigError):
        FindingsRecipe(augment="flip").validate()
    with pytest.raises(ConfigError):
        FindingsRecipe(label_smoothing=0.6).validate()
    with pytest.raises(ConfigError):
        FindingsHeadConfig(backbone="resnet50").validate()
    assert CV_ROWS[next(iter(CV_ROWS))].early_stop  # the recipe before the table comes first


def test_every_row_loads_images_at_least_as_large_as_it_reads_them():
    for row in CV_ROWS.values():  # a crop from a smaller image would upsample it
        assert row.members or row.load_size >= row.config.image_size, row.name
    assert CV_ROWS["lite0-448"].config.image_size == 448


def test_labelled_images_load_at_the_side_asked():
    data = load_labelled(shared_path("nih_cxr14"), size=48)
    assert data.pixels.shape[1:] == (1, 48, 48) and data.pixels.dtype == torch.uint8
    assert len(data) == len(data.labels) == len(data.patients) > 700


def test_radiograph_augmentation_keeps_pixels_in_range_and_laterality():
    torch.manual_seed(0)
    image = torch.zeros(1, 64, 64)
    image[:, :, :16] = 1.0  # bright on the image's left
    gamma = RandomGamma(1.4)(torch.full((1, 4, 4), 0.5))
    assert 0.5**1.4 - 1e-6 <= gamma.min() <= 0.5 ** (1 / 1.4) + 1e-6
    transform = augmentation("radiograph", 48)
    for _ in range(10):
        out = transform(image)
        assert out.shape == (1, 48, 48)
        assert out[..., :12].mean() > out[..., -12:].mean()  # never flipped


def test_training_without_validation_keeps_the_last_epoch_and_mixes_targets():
    data = tiny_images()
    config = FindingsHeadConfig(trainable="classifier", image_size=32)
    recipe = FindingsRecipe(epochs=2, batch_size=8, label_smoothing=0.1, mixup=0.4)
    head, run = train_findings_head(data, None, config, recipe)
    assert run.val_auroc_by_epoch == [] and run.best_epoch == 2
    assert run.config["recipe"]["mixup"] == 0.4 and not head.training


def test_cross_validation_scores_every_image_once_and_resumes(tmp_path, monkeypatch):
    data = tiny_images(24)
    folds = patient_folds(data.patients, k=3)
    row = CVRow(
        "tiny",
        FindingsHeadConfig(trainable="classifier", image_size=32),
        FindingsRecipe(epochs=1, batch_size=8),
        early_stop=True,
    )
    logits = cross_validate(data, folds, row, tmp_path)
    assert logits.shape == (24, len(FINDINGS14)) and (logits != 0).all()
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == [
        "fold0.pt",
        "fold1.pt",
        "fold2.pt",
    ]

    def no_training(*args, **kwargs):
        raise AssertionError("a cached fold was trained again")

    monkeypatch.setattr("mrg.train.findings_cv.train_findings_head", no_training)
    assert torch.equal(cross_validate(data, folds, row, tmp_path), logits)


def test_calibration_from_out_of_fold_logits_sets_points_the_states_use():
    torch.manual_seed(0)
    labels = (torch.rand(300, len(FINDINGS14)) < 0.2).float()
    logits = 3 * labels + torch.randn(300, len(FINDINGS14))
    head = FindingsHead(load_weights=False)
    calibrate(head, logits, labels, labels.mean(0).numpy(), np.full(len(FINDINGS14), 0.5))
    assert (head.temperature != 1).all() and (head.threshold < 1).all()
    assert torch.isfinite(head.present_threshold).all()  # separable enough for precision 0.5
    assert head.negated_share.eq(0.5).all()
    # with a weaker signal one possible point for all findings names the likeliest beside
    # the present ones: the head's own states score best at it
    weak = labels + torch.randn(300, len(FINDINGS14))
    calibrate(head, weak, labels, labels.mean(0).numpy())
    point = head.possible_threshold
    assert point.eq(point[0]).all() and 0 < point[0] < 1

    def micro_f1_at(point: float) -> float:
        head.possible_threshold.fill_(point)
        named = state_mask(head.states(head.probabilities(weak)), PRESENT, POSSIBLE)
        return micro_f1(labels.numpy(), named)

    best = micro_f1_at(float(head.possible_threshold[0]))
    assert all(best >= micro_f1_at(t) for t in np.linspace(0.02, 0.6, 30))


@pytest.mark.parametrize("name", sorted(EFFICIENTNET_LITES))
def test_each_efficientnet_lite_s_imagenet_weights_map_onto_timm(name):
    weights = efficientnet_lite_state_dict(name)
    head = FindingsHead(FindingsHeadConfig(backbone=name))
    assert torch.equal(head.backbone.conv_stem.weight, weights["conv_stem.weight"])

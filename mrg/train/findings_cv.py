"""Cross-validation of the findings head over every labelled image, split by patient.

    folds      k groups of patients (``GroupKFold``): no patient's images in two folds
    a row      a (``FindingsHeadConfig``, ``FindingsRecipe``) trained k times, each time
               on the other folds, scoring its held-out fold: out-of-fold logits ``[N, 14]``
               ``early_stop``: one of the other folds is held for choosing the epoch (the
               recipe before this table) and the rest train
    an ensemble  the mean of its member rows' out-of-fold logits: no training of its own

Scores pool the out-of-fold logits of all images (each image is scored once, by the model
that did not see it): AUROC and average precision per finding with 95 % bootstrap
intervals, their means over findings, and each row's paired-bootstrap gain over the first
row. Each fold's logits are kept as ``<out>/<row>/fold<k>.pt``, so a run resumes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.model_selection import GroupKFold

from mrg.evaluation.findings_scores import (
    bootstrap_scores,
    mean_score,
    paired_difference,
    per_finding,
)
from mrg.model.findings import FindingsHeadConfig
from mrg.train.findings import (
    LOAD_SIZE,
    FindingsRecipe,
    LabelledImages,
    head_logits,
    train_findings_head,
)

log = logging.getLogger(__name__)
MIN_CV_POSITIVES = 20  # findings with fewer positives in all images are shown, not averaged


@dataclass
class CVRow:
    """One row of the table: a trained recipe, or an ensemble of other rows (``members``)."""

    name: str
    config: FindingsHeadConfig = field(default_factory=FindingsHeadConfig)
    recipe: FindingsRecipe = field(default_factory=FindingsRecipe)
    early_stop: bool = False
    members: tuple[str, ...] = ()
    load_size: int = LOAD_SIZE  # the side images are loaded at; the recipe crops from it


BEFORE = FindingsHeadConfig(trainable="last_stages", loss="weighted-bce")
LITE1 = FindingsHeadConfig(
    backbone="tf_efficientnet_lite1", image_size=240, trainable="last_stages", loss="weighted-bce"
)
LITE2 = FindingsHeadConfig(
    backbone="tf_efficientnet_lite2", image_size=260, trainable="last_stages", loss="weighted-bce"
)
LITE0_448 = FindingsHeadConfig(image_size=448, trainable="last_stages", loss="weighted-bce")
CV_ROWS = {  # the table's rows, in its order: the recipe before this table first
    row.name: row
    for row in (
        CVRow("recipe-before", BEFORE, FindingsRecipe(), early_stop=True),
        CVRow("all-images", BEFORE, FindingsRecipe()),
        CVRow("radiograph-aug", BEFORE, FindingsRecipe(augment="radiograph")),
        CVRow("lite2-260", LITE2, FindingsRecipe()),
        CVRow("asl", FindingsHeadConfig(trainable="last_stages", loss="asl"), FindingsRecipe()),
        CVRow("smoothing", BEFORE, FindingsRecipe(label_smoothing=0.1)),
        CVRow("lite1-240", LITE1, FindingsRecipe()),
        CVRow("lite0-448", LITE0_448, FindingsRecipe(augment="radiograph"), load_size=512),
        CVRow("ensemble-lite0-lite2", members=("all-images", "lite2-260")),
        CVRow("ensemble-aug-lite2", members=("radiograph-aug", "lite2-260")),
        CVRow("ensemble-three", members=("all-images", "radiograph-aug", "lite2-260")),
        CVRow("ensemble-224-448", members=("radiograph-aug", "lite0-448")),
    )
}


def patient_folds(patients: list[str], k: int = 5) -> np.ndarray:
    """Each image's fold in ``range(k)``; a patient's images share one fold."""
    folds = np.zeros(len(patients), dtype=int)
    splitter = GroupKFold(n_splits=k)
    for fold, (_, held) in enumerate(splitter.split(np.zeros(len(patients)), groups=patients)):
        folds[held] = fold
    return folds


def fold_logits(data: LabelledImages, folds: np.ndarray, fold: int, row: CVRow) -> torch.Tensor:
    """Train ``row`` without fold ``fold`` and return the logits of fold ``fold``'s images."""
    k = int(folds.max()) + 1
    held = np.flatnonzero(folds == fold)
    if row.early_stop:
        val_fold = (fold + 1) % k
        train = data.subset(np.flatnonzero((folds != fold) & (folds != val_fold)))
        val = data.subset(np.flatnonzero(folds == val_fold))
    else:
        train, val = data.subset(np.flatnonzero(folds != fold)), None
    head, run = train_findings_head(train, val, row.config, row.recipe)
    log.info(
        "%s fold %d: trained on %d images, epoch %d", row.name, fold, len(train), run.best_epoch
    )
    return head_logits(head, data.subset(held))


def cross_validate(data: LabelledImages, folds: np.ndarray, row: CVRow, out: Path) -> torch.Tensor:
    """``row``'s out-of-fold logits ``[N, 14]`` (each fold's kept under ``out/row.name``)."""
    folder = Path(out) / row.name
    folder.mkdir(parents=True, exist_ok=True)
    logits = torch.zeros(len(data), data.labels.shape[1])
    for fold in range(int(folds.max()) + 1):
        cached = folder / f"fold{fold}.pt"
        if not cached.is_file():
            torch.save(fold_logits(data, folds, fold, row), cached)
        logits[torch.from_numpy(folds == fold)] = torch.load(cached)
    return logits


def ensemble_logits(member_logits: list[torch.Tensor]) -> torch.Tensor:
    """The mean of the members' logits: what a head of several networks computes (the members
    share a loss, so their logits share a scale; standardising them with each held-out fold's
    own statistics scored higher when pooled, by aligning the folds rather than the members)."""
    return torch.stack(member_logits).mean(0)


def score_row(
    labels: np.ndarray,
    logits: np.ndarray,
    folds: np.ndarray,
    reference: np.ndarray | None,
    n_boot: int = 1000,
) -> dict:
    """A row's figures: per-finding AUROC and AP with intervals, the means over the counted
    findings with intervals, each fold's mean AUROC, and the gain over ``reference``."""
    figures: dict = {}
    for name, metric in (("auroc", roc_auc_score), ("ap", average_precision_score)):
        figures[name] = per_finding(labels, logits, metric)
        figures[f"{name}_interval"] = bootstrap_scores(
            labels, logits, n_boot, min_positives=MIN_CV_POSITIVES, metric=metric
        )
        figures[f"mean_{name}"] = mean_score(labels, logits, MIN_CV_POSITIVES, metric)
    figures["fold_mean_auroc"] = [
        mean_score(labels[folds == f], logits[folds == f], 5) for f in np.unique(folds)
    ]
    if reference is not None:
        gain, low, high = paired_difference(
            labels, logits, reference, n_boot, min_positives=MIN_CV_POSITIVES
        )
        figures["gain"] = {"mean_auroc": gain, "interval": [low, high]}
    return figures

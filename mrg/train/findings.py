"""Training the findings head on labelled NIH ChestX-ray14 images.

A ``FindingsRecipe`` says how: epochs, learning rate, augmentation (``basic``: a small
crop, shift and rotation, brightness and contrast; ``radiograph``: wider crops and
rotations, contrast and gamma; never a flip, for laterality), label smoothing, mixup and
the seed. ``train_findings_head`` trains the head's trainable parts
(``FindingsHeadConfig.trainable``) with its loss; with a validation set it keeps the epoch
of the best validation mean AUROC, without one it keeps the last epoch. Calibration is
``mrg.train.findings_calibration``; cross-validation is ``mrg.train.findings_cv``.

``nih_splits`` is the demo pairs' split (a hash of the NIH patient id), so a head trained
on train and validation never sees an image of the report model's test studies.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import f1_score
from torchvision.transforms import v2
from tqdm.auto import tqdm

from mrg.config import ConfigBase, ConfigError
from mrg.data.pairs import patient_split, read_nih_labels
from mrg.data.study import eval_transform, train_transform
from mrg.data.views import Views
from mrg.evaluation.findings_scores import (
    MIN_TEST_POSITIVES,
    auroc_per_finding,
    bootstrap_auroc,
    mean_auroc,
)
from mrg.evaluation.probe import probe_scores
from mrg.model.encoder import build_effnet_stem
from mrg.model.findings import FindingsHead, FindingsHeadConfig
from mrg.text.taxonomy import FINDINGS14

log = logging.getLogger(__name__)
LOAD_SIZE = 288  # images are kept at this side in memory; augmentation crops from it
AUGMENTATIONS = ("basic", "radiograph")


@dataclass
class LabelledImages:
    """Images ``[N, 1, S, S]`` (uint8), labels ``[N, 14]`` and each image's patient."""

    ids: list[str]
    pixels: torch.Tensor
    labels: torch.Tensor
    patients: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, rows) -> LabelledImages:
        rows = [int(r) for r in rows]
        return LabelledImages(
            [self.ids[r] for r in rows],
            self.pixels[rows],
            self.labels[rows],
            [self.patients[r] for r in rows] if self.patients else [],
        )


def load_labelled(nih_dir: str | Path, size: int = LOAD_SIZE) -> LabelledImages:
    """Every labelled NIH image present under ``nih_dir/images``, ``size`` px square."""
    nih_dir = Path(nih_dir)
    entries = [
        (row, nih_dir / "images" / row["image"])
        for row in read_nih_labels(nih_dir / "labels.csv")
        if (nih_dir / "images" / row["image"]).is_file()
    ]
    pixels = torch.stack(
        [
            torch.from_numpy(
                np.asarray(Image.open(p).convert("L").resize((size, size), Image.BILINEAR)).copy()
            ).unsqueeze(0)
            for _, p in tqdm(entries, desc="labelled NIH images", leave=False)
        ]
    )
    labels = torch.tensor([[f in row["labels"] for f in FINDINGS14] for row, _ in entries])
    return LabelledImages(
        [row["image"] for row, _ in entries],
        pixels,
        labels.float(),
        [row["patient"] for row, _ in entries],
    )


def nih_splits(nih_dir: str | Path) -> dict[str, LabelledImages]:
    """The labelled NIH images split by patient as the demo pairs are (train/val/test)."""
    data = load_labelled(nih_dir)
    names = [patient_split(p) for p in data.patients]
    return {
        split: data.subset([i for i, n in enumerate(names) if n == split])
        for split in ("train", "val", "test")
    }


@dataclass
class FindingsRecipe(ConfigBase):
    """How the head trains (what it is: ``FindingsHeadConfig``)."""

    epochs: int = 8
    lr: float = 3e-4
    batch_size: int = 16
    augment: str = "basic"  # basic | radiograph (module docstring)
    label_smoothing: float = 0.0  # targets y(1 − ε) + ε/2
    mixup: float = 0.0  # Beta(α, α) mixing of image pairs and their targets; 0: off
    seed: int = 0

    def validate(self) -> FindingsRecipe:
        if self.augment not in AUGMENTATIONS:
            raise ConfigError(f"augment must be one of {AUGMENTATIONS}, got {self.augment!r}")
        if not 0.0 <= self.label_smoothing < 0.5 or self.mixup < 0.0:
            raise ConfigError("label_smoothing must be in [0, 0.5) and mixup ≥ 0")
        return self


class RandomGamma(torch.nn.Module):
    """x ↦ x^γ with log γ uniform in [−log g, log g]: the exposure curves of radiographs."""

    def __init__(self, max_gamma: float = 1.4):
        super().__init__()
        self.log_max = math.log(max_gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gamma = math.exp((torch.rand(()).item() * 2 - 1) * self.log_max)
        return x.clamp(0, 1).pow(gamma)


def augmentation(name: str, size: int):
    """The training transform of ``FindingsRecipe.augment`` (no flips: laterality matters)."""
    if name == "basic":
        return train_transform(size)
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.7, 1.0), ratio=(0.85, 1.15), antialias=True),
            v2.RandomAffine(degrees=10, translate=(0.05, 0.05), scale=(0.95, 1.05)),
            v2.ColorJitter(brightness=0.2, contrast=0.25),
            RandomGamma(1.4),
        ]
    )


def asymmetric_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    gamma_neg: float = 4.0,
    gamma_pos: float = 0.0,
    clip: float = 0.05,
) -> torch.Tensor:
    """ASL (Ridnik et al., 2021): L+ = (1−p)^γ+ log p, L− = p_m^γ− log(1−p_m), p_m = max(p − m, 0);
    easy negatives are down-weighted and the rarest positives keep their full gradient."""
    p = torch.sigmoid(logits)
    p_shifted = (p - clip).clamp(min=0)
    positive = targets * (1 - p).pow(gamma_pos) * torch.log(p.clamp(min=1e-8))
    negative = (1 - targets) * p_shifted.pow(gamma_neg) * torch.log((1 - p_shifted).clamp(min=1e-8))
    return -(positive + negative).sum(dim=1).mean()


def weighted_bce(
    logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor
) -> torch.Tensor:
    """BCE with positives weighted by the training negatives/positives ratio of their finding."""
    return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight)


def as_views(pixels: torch.Tensor, transform) -> Views:
    """uint8 ``[N, 1, S, S]`` → ``Views`` of one frontal view each, through ``transform``."""
    images = torch.stack([transform(p.float() / 255.0).clamp(0, 1) for p in pixels])
    n = len(images)
    return Views(
        images.unsqueeze(1), torch.zeros(n, 1, dtype=torch.long), torch.ones(n, 1, dtype=torch.bool)
    )


@torch.no_grad()
def head_logits(head: FindingsHead, data: LabelledImages, batch_size: int = 32) -> torch.Tensor:
    """The head's raw logits ``[N, 14]`` of ``data`` in eval mode."""
    head.eval()
    transform = eval_transform(head.config.image_size)
    return torch.cat(
        [
            head(as_views(data.pixels[i : i + batch_size], transform))
            for i in range(0, len(data), batch_size)
        ]
    )


@dataclass
class FindingsRun:
    """What training the head measured (the model card's findings section)."""

    config: dict
    val_auroc_by_epoch: list[float]
    best_epoch: int
    splits: dict[str, list[str]] = field(default_factory=dict)
    test: dict = field(default_factory=dict)


def train_findings_head(
    train: LabelledImages,
    val: LabelledImages | None,
    config: FindingsHeadConfig,
    recipe: FindingsRecipe | None = None,
) -> tuple[FindingsHead, FindingsRun]:
    """Train on ``train``; keep the best validation epoch, or the last without ``val``.
    The head comes back uncalibrated (``findings_calibration.calibrate``)."""
    recipe = (recipe or FindingsRecipe()).validate()
    torch.manual_seed(recipe.seed)
    head = FindingsHead(config).to(memory_format=torch.channels_last)  # 1.5× faster on CPU
    positives = train.labels.sum(0)
    pos_weight = ((len(train) - positives) / positives.clamp(min=1)).clamp(max=30)
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=1e-4)
    steps = recipe.epochs * math.ceil(len(train) / recipe.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, recipe.lr, total_steps=steps, pct_start=0.1
    )
    transform = augmentation(recipe.augment, config.image_size)
    history, best, best_state = [], -1.0, None
    generator = torch.Generator().manual_seed(recipe.seed)
    mixing = np.random.default_rng(recipe.seed)  # mixup's λ per batch
    for epoch in range(recipe.epochs):
        head.train()
        order = torch.randperm(len(train), generator=generator)
        bar = tqdm(range(0, len(train), recipe.batch_size), desc=f"findings epoch {epoch + 1}")
        for start in bar:
            idx = order[start : start + recipe.batch_size]
            views = as_views(train.pixels[idx], transform)
            targets = train.labels[idx] * (1 - recipe.label_smoothing) + recipe.label_smoothing / 2
            if recipe.mixup > 0:
                lam = float(mixing.beta(recipe.mixup, recipe.mixup))
                partner = torch.randperm(len(idx), generator=generator)
                mixed = lam * views.images + (1 - lam) * views.images[partner]
                views = Views(mixed, views.ids, views.mask)
                targets = lam * targets + (1 - lam) * targets[partner]
            logits = head(views)
            loss = (
                asymmetric_loss(logits, targets)
                if config.loss == "asl"
                else weighted_bce(logits, targets, pos_weight)
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if val is None:
            continue
        auroc = mean_auroc(val.labels.numpy(), head_logits(head, val).numpy(), min_positives=3)
        history.append(auroc)
        log.info("findings epoch %d: validation mean AUROC %.3f", epoch + 1, auroc)
        if auroc > best:
            best, best_state = auroc, {k: v.clone() for k, v in head.state_dict().items()}
    if best_state is not None:
        head.load_state_dict(best_state)
    best_epoch = int(np.argmax(history)) + 1 if history else recipe.epochs
    run = FindingsRun(config.to_dict() | {"recipe": recipe.to_dict()}, history, best_epoch)
    return head.eval(), run


@torch.no_grad()
def stem_probe_scores(
    splits: dict[str, LabelledImages], scored: tuple[str, ...] = ("test",)
) -> dict[str, np.ndarray]:
    """The baseline the head must beat: a logistic-regression probe (``probe_scores``) on the
    report encoder's frozen EfficientNet-Lite0 stem (pooled stride-16 features), trained on
    the training split; per split of ``scored``, its probabilities ``[N, 14]``."""
    stem = build_effnet_stem().eval()
    transform = eval_transform(224)

    def pooled(data: LabelledImages) -> np.ndarray:
        views = as_views(data.pixels, transform)
        x = (views.images[:, 0].expand(-1, 3, -1, -1) - 0.5) / 0.5
        return torch.cat(
            [stem(x[i : i + 32])[-1].mean(dim=(2, 3)) for i in range(0, len(x), 32)]
        ).numpy()

    features = {name: pooled(splits[name]) for name in scored}
    rows = np.cumsum([0] + [len(f) for f in features.values()])
    scores = probe_scores(
        pooled(splits["train"]),
        splits["train"].labels.numpy(),
        np.concatenate(list(features.values())),
    )
    return {name: scores[rows[i] : rows[i + 1]] for i, name in enumerate(features)}


def test_report(
    head: FindingsHead,
    splits: dict[str, LabelledImages],
    logits: torch.Tensor | None = None,
    seed: int = 0,
) -> dict:
    """Test AUROC per finding with 95 % bootstrap intervals, the head beside the stem probe,
    and the head's decisions (micro-F1, share of images with a named finding); ``logits``:
    the head's raw test logits where the caller has them already."""
    test = splits["test"]
    labels = test.labels.numpy()
    logits = head_logits(head, test) if logits is None else logits
    probabilities = head.probabilities(logits)
    decisions = head.decide(probabilities)[:, :-1].numpy()
    probe = stem_probe_scores(splits)["test"]
    positives = {f: int(n) for f, n in zip(FINDINGS14, labels.sum(0))}
    return {
        "images": len(test),
        "positives": positives,
        "head_auroc": auroc_per_finding(labels, probabilities.numpy()),
        "head_interval": bootstrap_auroc(labels, probabilities.numpy(), seed=seed),
        "head_mean_auroc": mean_auroc(labels, probabilities.numpy()),
        "probe_auroc": auroc_per_finding(labels, probe),
        "probe_interval": bootstrap_auroc(labels, probe, seed=seed),
        "probe_mean_auroc": mean_auroc(labels, probe),
        "counted": [f for f, n in positives.items() if n >= MIN_TEST_POSITIVES],
        "decision_micro_f1": float(f1_score(labels.ravel(), decisions.ravel(), zero_division=0.0)),
        "named_share": float((decisions.sum(1) > 0).mean()),
        "abnormal_share": float((labels.sum(1) > 0).mean()),
        "temperature": head.temperature.tolist(),
        "threshold": head.threshold.tolist(),
    }

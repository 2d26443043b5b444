"""Training the findings head on labelled NIH ChestX-ray14 images, then calibrating it.

1. train: the head's trainable parts (``FindingsHeadConfig.trainable``) with the chosen loss
   and radiograph augmentation (small affine, brightness, contrast; no flips), keeping the
   epoch with the best validation mean AUROC;
2. calibrate on validation: a temperature per finding (T_c minimising the validation NLL of
   σ(z_c / T_c), kept in [0.25, 4]), then an operating point per finding (the threshold of
   highest F1; where validation has fewer than 3 positives, the threshold that names the
   finding at its training rate);
3. score on test: AUROC per finding with a 95 % bootstrap interval, beside the frozen-stem
   linear probe on the same split.

The split is the demo pairs' (a hash of the NIH patient id), so the head never sees an image
of the report model's validation or test studies; ``FindingsRun.splits`` records the ids.
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
from sklearn.metrics import f1_score, roc_auc_score
from tqdm.auto import tqdm

from mrg.data.pairs import patient_split, read_nih_labels
from mrg.data.study import eval_transform, train_transform
from mrg.data.views import Views
from mrg.evaluation.probe import probe_scores
from mrg.model.encoder import build_effnet_stem
from mrg.model.findings import FindingsHead, FindingsHeadConfig
from mrg.text.taxonomy import FINDINGS14

log = logging.getLogger(__name__)
MIN_TEST_POSITIVES = 5  # findings with fewer test positives are shown, not averaged
LOAD_SIZE = 256  # images are kept at this side in memory; augmentation crops from it


@dataclass
class LabelledImages:
    """One split's images ``[N, 1, S, S]`` (uint8) and labels ``[N, 14]``."""

    ids: list[str]
    pixels: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.ids)


def nih_splits(nih_dir: str | Path) -> dict[str, LabelledImages]:
    """The labelled NIH images split by patient as the demo pairs are (train/val/test)."""
    nih_dir = Path(nih_dir)
    rows: dict[str, list] = {"train": [], "val": [], "test": []}
    for row in read_nih_labels(nih_dir / "labels.csv"):
        path = nih_dir / "images" / row["image"]
        if path.is_file():
            rows[patient_split(row["patient"])].append((row["image"], path, row["labels"]))
    splits = {}
    for name, entries in rows.items():
        pixels = torch.stack(
            [
                torch.from_numpy(
                    np.asarray(
                        Image.open(p).convert("L").resize((LOAD_SIZE, LOAD_SIZE), Image.BILINEAR)
                    ).copy()
                ).unsqueeze(0)
                for _, p, _ in entries
            ]
        )
        labels = torch.tensor([[f in labels for f in FINDINGS14] for *_, labels in entries])
        splits[name] = LabelledImages([i for i, *_ in entries], pixels, labels.float())
    return splits


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
    head.eval()
    transform = eval_transform(head.config.image_size)
    return torch.cat(
        [
            head(as_views(data.pixels[i : i + batch_size], transform))
            for i in range(0, len(data), batch_size)
        ]
    )


def auroc_per_finding(labels: np.ndarray, scores: np.ndarray) -> dict[str, float | None]:
    """AUROC of each finding; None where the split has no positive or no negative."""
    out = {}
    for c, finding in enumerate(FINDINGS14):
        column = labels[:, c]
        out[finding] = (
            float(roc_auc_score(column, scores[:, c])) if 0 < column.sum() < len(column) else None
        )
    return out


def mean_auroc(
    labels: np.ndarray, scores: np.ndarray, min_positives: int = MIN_TEST_POSITIVES
) -> float:
    values = [
        a
        for c, a in enumerate(auroc_per_finding(labels, scores).values())
        if a is not None and labels[:, c].sum() >= min_positives
    ]
    return float(np.mean(values)) if values else float("nan")


def bootstrap_auroc(
    labels: np.ndarray, scores: np.ndarray, n: int = 1000, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """95 % percentile intervals of each finding's AUROC and of the mean (``"mean"``) over
    findings with at least ``MIN_TEST_POSITIVES`` positives, resampling images."""
    rng = np.random.default_rng(seed)
    counted = [c for c in range(len(FINDINGS14)) if labels[:, c].sum() >= MIN_TEST_POSITIVES]
    samples: dict[str, list[float]] = {f: [] for f in FINDINGS14} | {"mean": []}
    for _ in range(n):
        idx = rng.integers(0, len(labels), len(labels))
        y, s = labels[idx], scores[idx]
        per = auroc_per_finding(y, s)
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


@dataclass
class FindingsRun:
    """What training the head measured (the model card's findings section)."""

    config: dict
    val_auroc_by_epoch: list[float]
    best_epoch: int
    splits: dict[str, list[str]]
    test: dict = field(default_factory=dict)


def train_findings_head(
    splits: dict[str, LabelledImages],
    config: FindingsHeadConfig,
    epochs: int = 8,
    lr: float = 3e-4,
    batch_size: int = 16,
    seed: int = 0,
) -> tuple[FindingsHead, FindingsRun]:
    """Train on ``splits["train"]``, keep the best validation epoch, then calibrate on val."""
    torch.manual_seed(seed)
    head = FindingsHead(config)
    train, val = splits["train"], splits["val"]
    positives = train.labels.sum(0)
    pos_weight = ((len(train) - positives) / positives.clamp(min=1)).clamp(max=30)
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(train) / batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    transform = train_transform(config.image_size)
    history, best, best_state = [], -1.0, None
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        head.train()
        order = torch.randperm(len(train), generator=generator)
        bar = tqdm(range(0, len(train), batch_size), desc=f"findings epoch {epoch + 1}")
        for start in bar:
            idx = order[start : start + batch_size]
            logits = head(as_views(train.pixels[idx], transform))
            targets = train.labels[idx]
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
        auroc = mean_auroc(val.labels.numpy(), head_logits(head, val).numpy(), min_positives=3)
        history.append(auroc)
        log.info("findings epoch %d: validation mean AUROC %.3f", epoch + 1, auroc)
        if auroc > best:
            best, best_state = auroc, {k: v.clone() for k, v in head.state_dict().items()}
    head.load_state_dict(best_state)
    calibrate(head, val, train.labels.mean(0).numpy())
    run = FindingsRun(
        config.to_dict(),
        history,
        int(np.argmax(history)) + 1,
        {name: data.ids for name, data in splits.items()},
    )
    return head.eval(), run


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
    probabilities: np.ndarray, labels: np.ndarray, precision: float = 0.5, min_true: int = 2
) -> np.ndarray:
    """Per finding, the lowest threshold at which the images above it are positive at least
    ``precision`` of the time, with at least ``min_true`` true positives; ∞ where none is."""
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


def calibrate(
    head: FindingsHead,
    val: LabelledImages,
    train_rate: np.ndarray,
    negated: np.ndarray | None = None,
) -> None:
    """Set the head's calibration (T, b), F1 operating points and present points from the
    validation split; ``negated`` (``negated_shares`` of real reports) says which findings
    may be stated absent."""
    logits = head_logits(head, val)
    temperature, bias = fit_platt(logits, val.labels)
    head.temperature.copy_(temperature)
    head.bias.copy_(bias)
    probabilities = head.probabilities(logits).numpy()
    labels = val.labels.numpy()
    head.threshold.copy_(torch.from_numpy(operating_points(probabilities, labels, train_rate)))
    head.present_threshold.copy_(torch.from_numpy(present_points(probabilities, labels)))
    if negated is not None:
        head.negated_share.copy_(torch.from_numpy(negated))


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


def test_report(head: FindingsHead, splits: dict[str, LabelledImages], seed: int = 0) -> dict:
    """Test AUROC per finding with 95 % bootstrap intervals, the head beside the stem probe,
    and the head's decisions (micro-F1, share of images with a named finding)."""
    test = splits["test"]
    labels = test.labels.numpy()
    logits = head_logits(head, test)
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

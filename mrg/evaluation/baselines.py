"""What a report generator must beat: reports written without the image (the most common or
a random training report, a constant naming the k most frequent findings), the findings
head's reading listed bare, and how well the frozen stem alone names findings (its ceiling).
"""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import torch

from mrg.config import EncoderConfig
from mrg.data.datasets import Collate, StudyDataset, StudyRecord
from mrg.evaluation.probe import constant_micro_f1, probe_micro_f1
from mrg.model.encoder import VisualEncoder
from mrg.text.sections import format_report
from mrg.text.taxonomy import FINDINGS14, findings_sentences


def baselines(
    train_reports: list[str], test_rows: list[dict], seed: int = 0
) -> dict[str, list[dict]]:
    common = Counter(train_reports).most_common(1)[0][0]
    rng = random.Random(seed)
    return {
        "baseline: most common report": [dict(r, generated=common) for r in test_rows],
        "baseline: random training report": [
            dict(r, generated=rng.choice(train_reports)) for r in test_rows
        ],
    }


def listed_findings_report(findings: list[str]) -> str:
    """A report that only lists ``findings`` (the image-free baselines and the head's own
    reading are written so): ``FINDINGS: Cardiomegaly. Pleural effusion.⏎IMPRESSION: …``."""
    text = findings_sentences(findings) or "No acute findings."
    return format_report(text, text)


def constant_findings_baselines(
    train_labels: list[list[str]], test_rows: list[dict], ks: tuple[int, ...] = (1, 2, 3)
) -> dict[str, list[dict]]:
    """For each k, every test image gets a report naming the k findings most frequent in
    training: what a reader scores without looking at the image."""
    frequency = Counter(f for labels in train_labels for f in labels)
    out = {}
    for k in ks:
        top = [f for f, _ in frequency.most_common(k)]
        text = listed_findings_report(top)
        out[f"baseline: constant, top {k} ({', '.join(top)})"] = [
            dict(r, generated=text) for r in test_rows
        ]
    return out


@torch.inference_mode()
def stem_features(
    records: list[StudyRecord], encoder_config: EncoderConfig, image_size: int = 224
) -> tuple[np.ndarray, np.ndarray]:
    """One row per image: the frozen EfficientNet-Lite0 stem's pooled features (the input of
    an encoder of ``encoder_config``, eval transform) and the image's NIH labels as a 0/1
    vector over FINDINGS14."""
    unique = list({r.image_paths[0]: r for r in records}.values())
    encoder = VisualEncoder(encoder_config).eval()
    collate, dataset = Collate(image_size, 1), StudyDataset(unique)
    features = []
    for start in range(0, len(unique), 16):
        batch = collate([dataset[i] for i in range(start, min(start + 16, len(unique)))])
        stem_map = encoder.stem(encoder.normalise(batch.views.images[:, 0]))
        features.append(stem_map.mean(dim=(2, 3)))
    labels = [[int(f in r.labels) for f in FINDINGS14] for r in unique]
    return torch.cat(features).numpy(), np.array(labels)


def findings_ceiling(
    train: list[StudyRecord], test: list[StudyRecord], encoder_config: EncoderConfig
) -> dict:
    """Micro-F1 of naming k findings per test image: linear probe on the stem vs a constant."""
    train_x, train_y = stem_features(train, encoder_config)
    test_x, test_y = stem_features(test, encoder_config)
    return {
        "probe": probe_micro_f1(train_x, train_y, test_x, test_y),
        "constant": constant_micro_f1(train_y, test_y),
    }

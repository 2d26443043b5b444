"""Studies (one or two views of one examination) and their conversion to model tensors.

``batch_tensors`` is where image tensors are born, as ``Views``: ``images [B, V, 1, S, S]`` in
[0, 1], ``ids [B, V]`` and ``mask [B, V]`` (False marks a missing view, zero-filled).
Training augmentation is anatomy-safe: small crops, rotations and contrast changes, never a
horizontal flip (left and right matter in a chest radiograph).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torchvision.transforms import v2

from mrg.data.views import VIEW_IDS, Views
from mrg.imaging import DEFAULT_LIMITS, ImageLimits, LoadedImage, load_image


@dataclass
class View:
    image: LoadedImage
    position: str = "unknown"  # frontal | lateral | unknown


@dataclass
class Study:
    """One examination: ordered views (frontal first), an id, and the reference report if known."""

    views: list[View]
    study_id: str = ""
    report: str = ""
    labels: list[str] = field(default_factory=list)


def study_from_sources(
    frontal: str | Path | bytes,
    lateral: str | Path | bytes | None = None,
    study_id: str = "",
    limits: ImageLimits = DEFAULT_LIMITS,
) -> Study:
    """Load one or two images; positions come from DICOM metadata, else from the argument order."""
    views = []
    for source, default in ((frontal, "frontal"), (lateral, "lateral")):
        if source is None:
            continue
        image = load_image(source, limits)
        views.append(View(image, image.meta.view if image.meta.view != "unknown" else default))
    return Study(views, study_id)


def eval_transform(size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return v2.Resize((size, size), antialias=True)


def train_transform(size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True),
            v2.RandomAffine(degrees=5, translate=(0.03, 0.03)),
            v2.ColorJitter(brightness=0.1, contrast=0.1),
        ]
    )


def view_tensor(
    image: LoadedImage, transform: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``[1, S, S]`` float in [0, 1]."""
    return transform(torch.from_numpy(image.pixels).unsqueeze(0)).clamp(0.0, 1.0)


def batch_tensors(
    studies: Sequence[Study], size: int, max_views: int = 2, transform: Callable | None = None
) -> Views:
    """Stack studies into ``Views``; extra views beyond ``max_views`` are dropped."""
    transform = transform or eval_transform(size)
    width = min(max_views, max(len(s.views) for s in studies))
    images = torch.zeros(len(studies), width, 1, size, size)
    view_ids = torch.full((len(studies), width), VIEW_IDS["unknown"], dtype=torch.long)
    view_mask = torch.zeros(len(studies), width, dtype=torch.bool)
    for i, study in enumerate(studies):
        for j, view in enumerate(study.views[:width]):
            images[i, j] = view_tensor(view.image, transform)
            view_ids[i, j] = VIEW_IDS[view.position]
            view_mask[i, j] = True
    return Views(images, view_ids, view_mask)

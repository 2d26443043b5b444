"""Fitting the chest-radiograph gate (``mrg.model.gate``) on training radiographs alone.

    μ, Σ = Ledoit–Wolf(f(x_train))          f: the findings head's pooled feature
    W = Lᵀ where Σ⁻¹ = L Lᵀ                 so that ‖W (f − μ)‖² = (f − μ)ᵀ Σ⁻¹ (f − μ)
    orientation net: cross-entropy over {x, rot90 x, rot180 x, rot270 x, 1 − x}
    max_distance = q_hi(d(x_val)),  min_upright = q_lo(p_upright(x_val))

The images go through the serving path (``load_image`` → ``eval_transform``), so the gate is
fitted on exactly what it will score.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from sklearn.covariance import LedoitWolf
from torch.nn import functional as F
from tqdm.auto import tqdm

from mrg.data.study import eval_transform, view_tensor
from mrg.imaging import load_image
from mrg.model.findings import FindingsHead
from mrg.model.gate import ORIENTATIONS, ChestGate, GateConfig, thumbnails


def radiograph_tensors(paths: Sequence[str | Path], size: int) -> torch.Tensor:
    """``[N, 1, S, S]``: each file as the findings head reads it."""
    transform = eval_transform(size)
    return torch.stack(
        [view_tensor(load_image(p), transform) for p in tqdm(paths, desc="images", leave=False)]
    )


@torch.inference_mode()
def head_features(head: FindingsHead, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """The head's pooled features ``[N, C]`` in eval mode."""
    head.eval()
    return torch.cat([head.features(images[i : i + batch]) for i in range(0, len(images), batch)])


def oriented(small: torch.Tensor, k: int) -> torch.Tensor:
    """``small`` as orientation ``k`` of ``ORIENTATIONS`` (rotations are counter-clockwise)."""
    return 1.0 - small if k == 4 else torch.rot90(small, k, (2, 3))


def train_orientation(
    gate: ChestGate, images: torch.Tensor, epochs: int = 40, lr: float = 3e-3, seed: int = 0
) -> None:
    """Train ``gate.orientation`` on every orientation of ``images``, with gamma and shift
    jitter so that exposure and framing do not decide."""
    generator = torch.Generator().manual_seed(seed)
    side = gate.config.thumbnail
    small = F.interpolate(images, (side, side), mode="bilinear", antialias=True)
    x = torch.cat([oriented(small, k) for k in range(len(ORIENTATIONS))])
    y = torch.arange(len(ORIENTATIONS)).repeat_interleave(len(small))
    net = gate.orientation.train()
    optimizer = torch.optim.AdamW(net.parameters(), lr, weight_decay=1e-3)
    for _ in tqdm(range(epochs), desc="orientation", leave=False):
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), 128):
            batch, target = x[order[i : i + 128]], y[order[i : i + 128]]
            gamma = torch.exp(0.3 * torch.randn(len(batch), 1, 1, 1, generator=generator))
            shift = torch.randint(-2, 3, (2,), generator=generator).tolist()
            batch = torch.roll(batch.clamp(1e-4, 1.0) ** gamma, shift, (2, 3))
            loss = F.cross_entropy(net(thumbnails(batch, side)), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    net.eval()


def fit_features(
    gate: ChestGate,
    head: FindingsHead,
    train_images: torch.Tensor,
    val_images: torch.Tensor,
    distance_quantile: float = 0.995,
) -> ChestGate:
    """μ and Σ (Ledoit–Wolf) of the head's features over ``train_images``, and ``max_distance``
    at a quantile of ``val_images``' distances: what a new head's backbone changes (the
    orientation net reads thumbnails, not the head's features, and is kept)."""
    features = head_features(head, train_images)
    covariance = LedoitWolf().fit(features.double().numpy())
    fitted = ChestGate(gate.config, features.shape[1])
    fitted.orientation.load_state_dict(gate.orientation.state_dict())
    fitted.mean.copy_(torch.from_numpy(covariance.location_).float())
    precision = torch.from_numpy(covariance.precision_)
    fitted.whitening.copy_(torch.linalg.cholesky((precision + precision.T) / 2).T.float())
    distances = fitted.scores(val_images, head_features(head, val_images))["distance"]
    fitted.config.max_distance = round(float(distances.quantile(distance_quantile)), 2)
    return fitted


def fit_gate(
    head: FindingsHead,
    train_images: torch.Tensor,
    val_images: torch.Tensor,
    distance_quantile: float = 0.995,
    upright_quantile: float = 0.005,
    epochs: int = 40,
) -> ChestGate:
    """The gate fitted on ``train_images``, its thresholds at quantiles of ``val_images``'
    scores (each refuses about ``1 − distance_quantile`` / ``upright_quantile`` of them)."""
    gate = ChestGate(GateConfig(), 1)
    train_orientation(gate, train_images, epochs)
    gate = fit_features(gate, head, train_images, val_images, distance_quantile)
    upright = gate.scores(val_images, head_features(head, val_images))["upright"]
    gate.config.min_upright = float(upright.quantile(upright_quantile))
    return gate

"""Grad-CAM for generated reports and for the findings head's findings (``pytorch-grad-cam``).

Score: the log-probability of the report under teacher forcing, log p(y | image) = Σ_t log
p(y_t | y_<t, image), over all report tokens or only those of one sentence. Target layer:
the encoder's last transformer block's first norm, reshaped from the token grid. Each view
of the study is one "image" in Grad-CAM's batch, so every view gets its own heatmap. The
frozen LLM passes gradients back to the visual tokens but is never updated. A
findings-conditioned report is scored under the findings it was written from.

Per finding (CheXNet's picture): the findings head's logit of that finding, target layer its
last convolution (``FindingsHead.target_layer``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from mrg.data.views import Views
from mrg.model.findings import FindingsHead
from mrg.model.mrg_model import MRGModel
from mrg.text.taxonomy import FINDINGS14


@dataclass
class Heatmap:
    """A normalised, non-negative map ``[H, W]`` in [0, 1] for one view, at the view's display size."""

    cam: np.ndarray
    view: str

    def overlay(self, grey: np.ndarray, alpha: float = 0.4) -> np.ndarray:
        """RGB uint8 overlay of the map (JET colour map) on a greyscale image in [0, 1]."""
        rgb = np.repeat(grey[..., None], 3, axis=-1).astype(np.float32)
        cam = np.asarray(
            Image.fromarray(self.cam).resize((grey.shape[1], grey.shape[0]), Image.BILINEAR)
        )
        return show_cam_on_image(rgb, np.clip(cam, 0, 1), use_rgb=True, image_weight=1.0 - alpha)


class ReportScore(nn.Module):
    """views ``[V, 1, H, W]`` → the report's (or one sentence's) log-probability, repeated per view."""

    def __init__(
        self,
        model: MRGModel,
        view_ids: torch.Tensor,
        report: str,
        char_span: tuple[int, int] | None,
        findings: torch.Tensor | None = None,
    ):
        """``view_ids [1, V]``: the study's; every view is present. ``findings``: y ``[1, 15]``."""
        super().__init__()
        self.model, self.view_ids, self.findings = model, view_ids, findings
        enc = model.tokenizer(report, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"][: model.config.max_report_tokens]
        offsets = enc["offset_mapping"][: len(ids)]
        if char_span is None:
            keep = [True] * len(ids)
        else:
            keep = [end > char_span[0] and start < char_span[1] for start, end in offsets]
        if not any(keep):
            raise ValueError(
                "the selected sentence has no tokens within the report's scored length"
            )
        self.report_ids = torch.tensor(ids, dtype=torch.long)
        self.keep = torch.tensor(keep)

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        model = self.model
        ids = self.view_ids.to(model.device)
        study = Views(views.unsqueeze(0), ids, torch.ones_like(ids, dtype=torch.bool))
        ctx = model.context(study, self.findings)
        ids = self.report_ids.to(model.device).unsqueeze(0)
        logits = model.teacher_forced(ctx, ids, torch.ones_like(ids)).logits
        start = ctx.embeds.shape[1]
        predicted = logits[0, start - 1 : start - 1 + ids.shape[1]].float().log_softmax(-1)
        token_logp = predicted.gather(-1, ids[0].unsqueeze(-1)).squeeze(-1)
        score = token_logp[self.keep.to(token_logp.device)].sum()
        return score.expand(views.shape[0])


def _reshape_transform(model: MRGModel):
    vit, grid = model.encoder.vit, model.encoder.grid_size

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, vit.num_prefix_tokens :]
        return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)

    return reshape


def explain(
    model: MRGModel,
    views: Views,
    report: str,
    char_span: tuple[int, int] | None = None,
    positions: list[str] | None = None,
    findings: torch.Tensor | None = None,
) -> list[Heatmap]:
    """One Grad-CAM heatmap per view of a single study (``views`` of one study, all present)."""
    was_training = model.training
    model.eval()
    scorer = ReportScore(model, views.ids, report, char_span, findings)
    try:
        with (
            torch.enable_grad(),
            GradCAM(
                model=scorer,
                target_layers=[model.encoder.target_layer],
                reshape_transform=_reshape_transform(model),
            ) as cam,
        ):
            maps = cam(
                input_tensor=views.images[0].to(model.device),
                targets=[lambda out: out] * views.images.shape[1],
            )
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    names = positions or ["unknown"] * views.images.shape[1]
    return [Heatmap(m.astype(np.float32), name) for m, name in zip(maps, names)]


class _HeadLogits(nn.Module):
    """views ``[V, 1, H, W]`` → the findings head's raw logits ``[V, 14]``, one row per view."""

    def __init__(self, head: FindingsHead):
        super().__init__()
        self.head = head

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        return self.head.classifier(self.head.features(views))


def explain_finding(
    head: FindingsHead, views: Views, finding: str, positions: list[str] | None = None
) -> list[Heatmap]:
    """Grad-CAM of ``finding``'s logit, one heatmap per view of a single study."""
    index = FINDINGS14.index(finding)
    head.eval()
    try:
        with torch.enable_grad(), GradCAM(_HeadLogits(head), [head.target_layer]) as cam:
            images = views.images[0].to(head.classifier.weight.device)
            maps = cam(images, targets=[ClassifierOutputTarget(index)] * images.shape[0])
    finally:
        head.zero_grad(set_to_none=True)
    names = positions or ["unknown"] * views.images.shape[1]
    return [Heatmap(m.astype(np.float32), name) for m, name in zip(maps, names)]

"""Image → findings: the classifier whose decisions condition the report.

    z = W · GAP(f(x)) + b            f: an EfficientNet-Lite (ImageNet) over each view
    p_c = σ(z_c / T_c + b_c)         T, b: per-finding temperature and bias (Platt), fitted
                                     out of fold at the data's own prevalence
    y_c = 1[p_c ≥ t_c], y_normal = 1[no y_c]   t: per-finding F1 operating points (out of fold)
    s_c = present   if p_c ≥ t⁺_c    t⁺: the point of precision ≥ 0.5 out of fold, over at
                                     least 5 true positives (∞: never)
          possible  if p_c ≥ t°, the most probable first, while fewer than ``MAX_NAMED``
                    findings are present or possible; t°: one point for all findings, of
                    best CE micro-F1 out of fold (a head saved before it: t°_c = t_c)
          absent    below both t_c and t°, for the findings real reports negate
                    (``negated_share`` ≥ ``NEGATED_SHARE``: effusion, pneumothorax,
                    consolidation in OpenI); a finding in the band but past ``MAX_NAMED``,
                    or above its F1 point, is not stated

The report model is conditioned on ``y`` (``[B, 15]``, the checkpoints before the states) or
on the states ``s`` (``mrg.text.states``, 43 entries); ``p`` is what the findings panel shows. A study with several views takes the mean of the present
views' logits. The head keeps its own backbone beside the report encoder's frozen stem: its
later stages and the classifier are trained on labelled images (``mrg.train.findings``),
which no report-writing stage touches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from mrg.config import ConfigBase, ConfigError
from mrg.data.views import Views
from mrg.model.encoder import EFFICIENTNET_LITES, efficientnet_lite_state_dict
from mrg.text.states import ABSENT, POSSIBLE, PRESENT, FindingStates, state_vector
from mrg.text.taxonomy import FINDINGS14

FINDINGS_FOLDER = "findings"  # beside the modes in a checkpoint folder
FINDINGS_CONFIG_NAME = "findings_config.json"
FINDINGS_WEIGHTS_NAME = "findings.safetensors"
TRAINABLE_PARTS = ("classifier", "last_stages", "all")
MAX_NAMED = 2  # present or possible findings a report names (possible ones fill up to it)
# absent from heads saved before the states (or before one possible point)
STATE_BUFFERS = {"bias", "present_threshold", "negated_share", "possible_threshold"}
NEGATED_SHARE = 0.2  # a finding real reports negate this often is stated absent when unlikely


def points_for_json(points: torch.Tensor) -> list[float | None]:
    """A buffer of per-finding points for JSON: ∞ (never reached), which JSON cannot hold, as
    None."""
    return [None if v == float("inf") else v for v in points.tolist()]


@dataclass
class FindingsHeadConfig(ConfigBase):
    """The findings classifier: backbone input, which parts train, and the loss."""

    backbone: str = "tf_efficientnet_lite0"  # an EfficientNet-Lite of ``EFFICIENTNET_LITES``
    image_size: int = 224  # ImageNet scale; the shipped head: 448 (CE +0.010 out of fold, docs)
    dropout: float = 0.2  # before the classifier
    trainable: str = "last_stages"  # classifier | last_stages (blocks 5-6 + conv head) | all
    loss: str = "asl"  # asl (asymmetric loss) | weighted-bce (positives weighted by neg/pos)

    def validate(self) -> FindingsHeadConfig:
        if self.backbone not in EFFICIENTNET_LITES:
            raise ConfigError(
                f"backbone must be one of {sorted(EFFICIENTNET_LITES)}, got {self.backbone!r}"
            )
        if self.trainable not in TRAINABLE_PARTS:
            raise ConfigError(f"trainable must be one of {TRAINABLE_PARTS}, got {self.trainable!r}")
        if self.loss not in ("asl", "weighted-bce"):
            raise ConfigError(f"loss must be asl or weighted-bce, got {self.loss!r}")
        return self


class FindingsHead(nn.Module):
    """``Views`` → 14 finding logits; calibrated probabilities and decisions on top."""

    def __init__(self, config: FindingsHeadConfig | None = None, load_weights: bool = True):
        super().__init__()
        self.config = (config or FindingsHeadConfig()).validate()
        self.backbone = timm.create_model(self.config.backbone, pretrained=False, num_classes=0)
        if load_weights:
            weights = efficientnet_lite_state_dict(self.config.backbone)
            wanted = self.backbone.state_dict().keys()
            self.backbone.load_state_dict({k: v for k, v in weights.items() if k in wanted})
        self.dropout = nn.Dropout(self.config.dropout)
        self.classifier = nn.Linear(self.backbone.num_features, len(FINDINGS14))
        n = len(FINDINGS14)
        self.register_buffer("temperature", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("threshold", torch.full((n,), 0.5))
        self.register_buffer("present_threshold", torch.full((n,), float("inf")))
        self.register_buffer("possible_threshold", torch.full((n,), 0.5))
        self.register_buffer("negated_share", torch.zeros(n))
        self.register_buffer("pixel_mean", torch.tensor(0.5), persistent=False)
        self.set_trainable(self.config.trainable)

    def set_trainable(self, part: str) -> None:
        """Freeze all but ``part``: the classifier, the last two stages and the conv head, or all."""
        for param in self.backbone.parameters():
            param.requires_grad_(part == "all")
        if part == "last_stages":
            for module in (*self.backbone.blocks[5:], self.backbone.conv_head, self.backbone.bn2):
                for param in module.parameters():
                    param.requires_grad_(True)

    def train(self, mode: bool = True) -> FindingsHead:
        """Frozen BatchNorm layers keep their ImageNet statistics (eval mode) while the rest trains."""
        super().train(mode)
        for module in self.backbone.modules():
            if isinstance(module, nn.BatchNorm2d) and not any(
                p.requires_grad for p in module.parameters()
            ):
                module.eval()
        return self

    def features(self, grey: torch.Tensor) -> torch.Tensor:
        """``[N, 1, S, S]`` in [0, 1] → pooled features ``[N, C]`` (TF-Lite normalisation)."""
        x = (grey.expand(-1, 3, -1, -1) - self.pixel_mean) / 0.5
        return self.backbone(x)

    def forward(self, views: Views) -> torch.Tensor:
        """Raw logits ``[B, 14]``: the mean over each study's present views. Views of another
        side (the report encoder's) are resized to the head's; callers that can load the
        images at ``config.image_size`` do (the service, the gate, the evaluation runner)."""
        b, v = views.images.shape[:2]
        images = views.images.flatten(0, 1).to(self.classifier.weight.device)
        side = self.config.image_size
        if images.shape[-2:] != (side, side):
            images = F.interpolate(images, size=(side, side), mode="bilinear", antialias=True)
        logits = self.classifier(self.dropout(self.features(images))).view(b, v, -1)
        mask = views.mask.to(logits.device, logits.dtype).unsqueeze(-1)
        return (logits * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated p = σ(z / T + b)."""
        return torch.sigmoid(logits / self.temperature + self.bias)

    def states(self, probabilities: torch.Tensor) -> list[FindingStates]:
        """Each study's states (module docstring): present above ``present_threshold``;
        possible from ``possible_threshold`` up, most probable first, until ``MAX_NAMED``
        are named; absent for the often-negated findings below both ``threshold`` and
        ``possible_threshold`` (a finding the head finds likelier is never stated absent)."""
        present_points, points = self.present_threshold.tolist(), self.possible_threshold.tolist()
        shares, f1_points = self.negated_share.tolist(), self.threshold.tolist()
        out = []
        for p in probabilities.tolist():
            states = {f: PRESENT for f, q, t in zip(FINDINGS14, p, present_points) if q >= t}
            band = [
                c
                for c in sorted(range(len(FINDINGS14)), key=lambda c: -p[c])
                if FINDINGS14[c] not in states and p[c] >= points[c]
            ]
            for c in band[: max(0, MAX_NAMED - len(states))]:
                states[FINDINGS14[c]] = POSSIBLE
            for c, f in enumerate(FINDINGS14):
                below = p[c] < min(points[c], f1_points[c])
                if f not in states and shares[c] >= NEGATED_SHARE and below:
                    states[f] = ABSENT
            out.append({f: states[f] for f in FINDINGS14 if f in states})
        return out

    def condition(self, probabilities: torch.Tensor, states: bool = False) -> torch.Tensor:
        """What a report model is conditioned on: the states ``[B, 43]`` (``state_vector`` of
        ``self.states``) or the decisions y ``[B, 15]`` (``decide``)."""
        if not states:
            return self.decide(probabilities)
        vectors = [state_vector(s) for s in self.states(probabilities)]
        return torch.tensor(vectors, dtype=probabilities.dtype, device=probabilities.device)

    def decide(self, probabilities: torch.Tensor) -> torch.Tensor:
        """The condition y ``[B, 15]``: 1 where p reaches the operating point, normal where none does."""
        named = (probabilities >= self.threshold).float()
        return torch.cat([named, (named.sum(-1, keepdim=True) == 0).float()], dim=-1)

    @torch.inference_mode()
    def predict(self, views: Views, states: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(calibrated probabilities ``[B, 14]``, ``condition``: y ``[B, 15]`` or the states
        ``[B, 43]``) in eval mode."""
        was_training = self.training
        self.eval()
        probabilities = self.probabilities(self(views))
        self.train(was_training)
        return probabilities, self.condition(probabilities, states)

    @torch.inference_mode()
    def predict_pooled(
        self, features: torch.Tensor, states: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``predict`` of one study from its views' pooled features ``[V, C]`` (``features``,
        in eval mode): the mean of the views' logits, as ``forward`` takes it."""
        logits = self.classifier(features).mean(0, keepdim=True)
        probabilities = self.probabilities(logits)
        return probabilities, self.condition(probabilities, states)

    @property
    def target_layer(self) -> nn.Module:
        """What per-finding Grad-CAM hooks: the last convolution before pooling."""
        return self.backbone.conv_head

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / FINDINGS_WEIGHTS_NAME), metadata={"format": "pt"})
        (directory / FINDINGS_CONFIG_NAME).write_text(
            json.dumps(self.config.to_dict(), indent=2) + "\n"
        )
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> FindingsHead:
        directory = Path(directory)
        config = FindingsHeadConfig.load(directory / FINDINGS_CONFIG_NAME)
        head = cls(config, load_weights=False)
        # a head saved before the states has no bias, present points or negation shares: its
        # defaults (0, never present, never absent) keep its probabilities and decisions; one
        # saved before the possible point names possible findings from their F1 points
        result = head.load_state_dict(
            load_file(str(directory / FINDINGS_WEIGHTS_NAME)), strict=False
        )
        if "possible_threshold" in result.missing_keys:
            head.possible_threshold.copy_(head.threshold)
        missing = set(result.missing_keys) - STATE_BUFFERS
        if missing or result.unexpected_keys:
            raise ConfigError(
                f"{directory} is not a findings head of this config: missing {sorted(missing)}, "
                f"unexpected {sorted(result.unexpected_keys)}"
            )
        return head.eval()

"""Is this a chest radiograph? The gate every view passes before a report is written.

Rules on what the file says, then two scores of each view's pixels, in this order:

    DICOM Modality outside projection X-ray / secondary capture → "modality"   (CT, MR, US, NM, PT…)
    a colour image (photograph, screenshot)                      → "colour"
    std(x) < min_contrast                                        → "blank"
    d(x) = √((f(x) − μ)ᵀ Σ⁻¹ (f(x) − μ)) > max_distance           → "not_a_chest_radiograph"
    p_upright(x) < min_upright  (frontal and unknown views only)  → "orientation"

f is the findings head's pooled feature (``FindingsHead.features``), μ and Σ its mean and
Ledoit–Wolf covariance over the NIH training radiographs. p_upright is a small CNN over a
32×32 thumbnail, trained on the same images to tell an upright radiograph from its rotations
by 90°, 180° and 270° and from its inversion (self-supervised: no new data). Pooled features
hardly change when a radiograph is rotated or inverted, so the two scores catch different
things. The NIH images are all frontal, so the orientation of a lateral view is not judged. ``mrg.train.gate`` fits both; ``scripts/build_gate.py`` chooses the thresholds on
validation radiographs and measures what is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from mrg.config import ConfigBase
from mrg.data.study import Study, batch_tensors
from mrg.imaging import GATED_MODALITIES, ImageMeta, not_a_radiograph
from mrg.model.findings import FindingsHead

GATE_FOLDER = "gate"  # beside the modes and the findings head in a checkpoint folder
GATE_CONFIG_NAME = "gate_config.json"
GATE_WEIGHTS_NAME = "gate.safetensors"
ORIENTATIONS = ("upright", "rotated 90°", "rotated 180°", "rotated 270°", "inverted")

NOT_A_RADIOGRAPH = (
    "This does not look like a chest radiograph (frontal or lateral); the model was trained "
    "on chest X-rays only."
)
MESSAGES = {
    "colour": "This is a colour image (a photograph or a screenshot?), not a radiograph; "
    "the model was trained on chest X-rays only.",
    "blank": "The image is blank (it has almost no contrast); upload a chest radiograph.",
    "not_a_chest_radiograph": NOT_A_RADIOGRAPH,
    "orientation": "This radiograph looks {orientation}. Upload it upright and with bone white "
    "(for a DICOM file, check that its photometric interpretation is right).",
}


@dataclass
class GateConfig(ConfigBase):
    """The thresholds (chosen on validation radiographs) and the thumbnail side."""

    max_distance: float = float("inf")  # Mahalanobis distance of the head's feature
    min_upright: float = 0.0  # p_upright
    min_contrast: float = 0.02  # standard deviation of the pixels in [0, 1]
    thumbnail: int = 32


@dataclass
class Screening:
    """The gate's verdict on a study: ``refused`` is the reason's code (None: accepted, or
    allowed anyway), ``message`` what a clinician reads; ``views`` the scores of each view."""

    refused: str | None = None
    message: str = ""
    allowed_anyway: bool = False  # the override was on and the gate would have refused
    views: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        """What the API, ``mrg generate --json`` and the review export record as ``gate``."""
        return {
            "refused": self.refused,
            "message": self.message,
            "allowed_anyway": self.allowed_anyway,
            "views": self.views,
        }

    def overridden(self, allow_anyway: bool) -> Screening:
        """This verdict, made without the override, as the override ``allow_anyway`` makes
        it (as ``screen`` would: a refusal becomes a warning)."""
        if self.refused is None or not allow_anyway:
            return self
        return Screening(None, self.message, allowed_anyway=True, views=self.views)

    @property
    def warning(self) -> str:
        """The line a report carries when it was written despite the gate."""
        return f"Written despite the gate: {self.message}" if self.allowed_anyway else ""


def thumbnails(images: torch.Tensor, side: int = 32) -> torch.Tensor:
    """``[N, 1, S, S]`` in [0, 1] → ``[N, 1, side, side]``, each zero-mean and unit-variance."""
    small = F.interpolate(images, (side, side), mode="bilinear", antialias=True)
    mean = small.mean((1, 2, 3), keepdim=True)
    return (small - mean) / (small.std((1, 2, 3), keepdim=True) + 1e-3)


class OrientationNet(nn.Module):
    """Thumbnail → logits over ``ORIENTATIONS``: three conv/pool stages and a linear layer."""

    def __init__(self, side: int = 32):
        super().__init__()
        stages = []
        for c_in, c_out in ((1, 16), (16, 32), (32, 64)):
            stages += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*stages, nn.Flatten(), nn.Dropout(0.3))
        self.classifier = nn.Linear(64 * (side // 8) ** 2, len(ORIENTATIONS))

    def forward(self, thumbs: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(thumbs))


class ChestGate(nn.Module):
    """The fitted scores: the head features' mean and whitening, and the orientation net."""

    def __init__(self, config: GateConfig, feature_dim: int):
        super().__init__()
        self.config = config
        self.register_buffer("mean", torch.zeros(feature_dim))
        # W with Wᵀ W = Σ⁻¹, so that d(x) = ‖W (f(x) − μ)‖
        self.register_buffer("whitening", torch.eye(feature_dim))
        self.orientation = OrientationNet(config.thumbnail)

    @torch.inference_mode()
    def scores(self, images: torch.Tensor, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per view ``[N]``: ``contrast``, ``distance`` and ``upright`` (p), and the most
        probable ``orientation`` (an index into ``ORIENTATIONS``)."""
        self.eval()
        distance = ((features - self.mean) @ self.whitening.T).norm(dim=-1)
        p = self.orientation(thumbnails(images, self.config.thumbnail)).softmax(-1)
        contrast = images.flatten(1).std(-1)
        return {
            "contrast": contrast,
            "distance": distance,
            "upright": p[:, 0],
            "orientation": p.argmax(-1),
        }

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / GATE_WEIGHTS_NAME), metadata={"format": "pt"})
        self.config.save(directory / GATE_CONFIG_NAME)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ChestGate:
        directory = Path(directory)
        config = GateConfig.load(directory / GATE_CONFIG_NAME)
        state = load_file(str(directory / GATE_WEIGHTS_NAME))
        gate = cls(config, state["mean"].numel())
        gate.load_state_dict(state)
        return gate.eval()


def rule_refusal(meta: ImageMeta) -> tuple[str, str] | None:
    """(code, message) where the file itself says it is no radiograph: its DICOM modality,
    or colour; else None."""
    if meta.format == "dicom" and meta.modality not in GATED_MODALITIES:
        return "modality", not_a_radiograph(meta.modality)
    if meta.colour:
        return "colour", MESSAGES["colour"]
    return None


def score_refusal(
    view: dict[str, float], config: GateConfig, lateral: bool = False
) -> tuple[str, str] | None:
    """(code, message) where a view's scores fall outside the thresholds; else None.
    A ``lateral`` view's orientation is not judged (the orientation net knows frontals)."""
    if view["contrast"] < config.min_contrast:
        return "blank", MESSAGES["blank"]
    if view["distance"] > config.max_distance:
        return "not_a_chest_radiograph", MESSAGES["not_a_chest_radiograph"]
    if not lateral and view["upright"] < config.min_upright:
        message = MESSAGES["orientation"].format(orientation=view["orientation"])
        return "orientation", message
    return None


def screen(
    metas: list[ImageMeta],
    images: torch.Tensor,
    features: torch.Tensor | None,
    gate: ChestGate | None,
    allow_anyway: bool = False,
    positions: list[str] | None = None,
) -> Screening:
    """The verdict on a study's views: ``images [V, 1, S, S]`` as the findings head reads
    them, ``features [V, C]`` its pooled features (None without a head or a gate: then only
    the rules and the contrast apply), ``positions`` each view's (frontal / lateral /
    unknown). The first refusal, view by view, is the study's."""
    views, refusal = [], None
    positions = positions or ["unknown"] * len(metas)
    for i, meta in enumerate(metas):
        view = {"contrast": round(float(images[i].std()), 4)}
        if gate is not None and features is not None:
            s = gate.scores(images[i : i + 1], features[i : i + 1])
            view |= {
                "distance": round(float(s["distance"][0]), 2),
                "upright": round(float(s["upright"][0]), 4),
                "orientation": ORIENTATIONS[int(s["orientation"][0])],
            }
        config = gate.config if gate is not None else GateConfig()
        lateral = positions[i] == "lateral"
        refusal = refusal or rule_refusal(meta) or score_refusal(_complete(view), config, lateral)
        views.append(view)
    if refusal is None:
        return Screening(views=views)
    code, message = refusal
    if allow_anyway:
        return Screening(None, message, allowed_anyway=True, views=views)
    return Screening(code, message, views=views)


def _complete(view: dict) -> dict:
    """A view's scores with the ones no gate computed set to pass."""
    return {"distance": 0.0, "upright": 1.0, "orientation": ORIENTATIONS[0]} | view


def read_study(
    study: Study,
    head: FindingsHead | None,
    gate: ChestGate | None,
    allow_anyway: bool = False,
) -> tuple[Screening, torch.Tensor | None]:
    """(``screen`` of every view of ``study`` as the findings head reads it (224 px without a
    head), the head's pooled features ``[V, C]`` of those views (None without a head)): one
    pass of the head serves the gate and the findings (``FindingsHead.predict_pooled``)."""
    size = head.config.image_size if head is not None else 224
    images = batch_tensors([study], size, len(study.views)).images[0]
    features = None
    if head is not None:
        with torch.inference_mode():
            features = head.eval().features(images)
    metas = [view.image.meta for view in study.views]
    positions = [view.position for view in study.views]
    screening = screen(metas, images, features, gate, allow_anyway, positions)
    return screening, features


def screen_study(
    study: Study,
    head: FindingsHead | None,
    gate: ChestGate | None,
    allow_anyway: bool = False,
) -> Screening:
    """The verdict of ``read_study``: the one path from a study to its verdict, for the
    service, the fit's measurements and the tests."""
    return read_study(study, head, gate, allow_anyway)[0]

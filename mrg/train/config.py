"""Training configuration: stages, optimisation, data, and named presets.

A run is one JSON-able ``TrainConfig``; ``train_preset(name)`` gives the starting points
(``demo-cpu``, ``iu-xray-llama2-7b-nf4``, ``mimic-cxr-llama2-7b-nf4``). ``validate`` checks
every field before any model or data is loaded and names the field it rejects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mrg.config import ConfigBase, ConfigError, ModelConfig
from mrg.presets import PRESETS, merged, model_preset, preset

MIXED_PRECISION = ("no", "bf16", "fp16")
ON_MISSING = ("error", "skip")
ALIGN_TARGETS = ("labels", "identity")


@dataclass
class StageConfig:
    """One training stage; ``epochs = 0`` skips it."""

    epochs: int = 0
    lr: float = 1e-4


@dataclass
class TrainConfig(ConfigBase):
    """One training run; the stages run in the order language → align → generate → joint."""

    model: ModelConfig = field(default_factory=ModelConfig)  # what is trained around which LLM
    annotation: str = ""  # R2Gen-style annotation.json (train/val/test)
    image_root: str = ""  # the folder the annotation's image paths are relative to
    output_dir: str = "runs/mrg"  # best/, last/, log.jsonl, train_config.json
    language_reports: str = ""  # OpenI NLMCXR_reports.tgz (or its folder) for the language stage
    # report language: the plain prompt alone learns OpenI report text (no image)
    language: StageConfig = field(default_factory=lambda: StageConfig(epochs=0, lr=1e-3))
    # contrastive alignment of the encoder with the frozen LLM's report embeddings
    align: StageConfig = field(default_factory=lambda: StageConfig(epochs=1, lr=5e-4))
    # report generation: teacher-forced LM loss on the report and EOS
    generate: StageConfig = field(default_factory=lambda: StageConfig(epochs=5, lr=1e-4))
    # joint: LM loss + joint_lambda · InfoNCE
    joint: StageConfig = field(default_factory=lambda: StageConfig(epochs=0, lr=5e-5))
    joint_lambda: float = 0.5  # weight of the contrastive loss in the joint stage
    align_dim: int = 256  # width of the contrastive heads' shared space
    align_targets: str = "labels"  # labels: label-aware soft targets | identity: CLIP's
    encoder_lr_scale: float = 1.0  # encoder lr / stage lr in the generate and joint stages
    batch_size: int = 8  # studies per step and process
    grad_accum: int = 1  # steps whose gradients are summed before an optimizer step
    weight_decay: float = 0.05  # AdamW, on weight matrices only (see Trainer.stage_groups)
    warmup_ratio: float = 0.05  # share of each stage's steps with a linear warm-up
    max_grad_norm: float = 1.0  # gradient clipping
    seed: int = 42  # model init, data order and augmentation
    mixed_precision: str = "no"  # no | bf16 | fp16 (accelerate's autocast)
    gradient_checkpointing: bool = False  # recompute the frozen LLM's activations in backward
    on_missing: str = "error"  # a missing image file: error | skip the study
    val_max_studies: int = 32  # validation studies whose reports are generated and scored
    val_max_new_tokens: int = 60  # the token budget of those reports
    max_steps_per_epoch: int = 0  # optimizer steps per epoch; 0: no cap (tests and smoke runs)
    num_workers: int = 0  # DataLoader worker processes
    # language stage of a findings-conditioned model: the share of each epoch's reports that
    # name a finding (drawn with replacement); 0 keeps the corpus' own share (about 1 in 7)
    language_abnormal_share: float = 0.0
    # language stage: loss weight of the tokens of sentences that name a finding (1: plain
    # mean); most tokens of even an abnormal report are normal boilerplate
    language_finding_weight: float = 1.0
    # the image stages leave the prompts (P, the book) as the language stage wrote them: the
    # prompt keeps the style of reports, the condition and the image change the content
    freeze_prompt_after_language: bool = False
    # a findings head folder: the image stages of a findings-conditioned model then train on
    # its decisions (what it will act on at test time) instead of the paired report's labels
    # (the labeler's, PromptMRG's true states)
    findings_head: str = ""

    def validate(self) -> TrainConfig:
        self.model.validate()
        for name in ("language", "align", "generate", "joint"):
            stage = getattr(self, name)
            if stage.epochs < 0:
                raise ConfigError(f"{name}.epochs must be >= 0, got {stage.epochs}")
            if stage.epochs and stage.lr <= 0:
                raise ConfigError(f"{name}.lr must be > 0, got {stage.lr}")
        if not any(getattr(self, n).epochs for n in ("language", "align", "generate", "joint")):
            raise ConfigError(
                "every stage has 0 epochs: set language.epochs, align.epochs, generate.epochs "
                "or joint.epochs"
            )
        checks = {  # field: (valid, what is allowed)
            "batch_size": (self.batch_size >= 1, ">= 1"),
            "grad_accum": (self.grad_accum >= 1, ">= 1"),
            "warmup_ratio": (0 <= self.warmup_ratio < 1, "in [0, 1)"),
            "max_grad_norm": (self.max_grad_norm > 0, "> 0"),
            "mixed_precision": (
                self.mixed_precision in MIXED_PRECISION,
                f"one of {MIXED_PRECISION}",
            ),
            "on_missing": (self.on_missing in ON_MISSING, f"one of {ON_MISSING}"),
            "joint_lambda": (self.joint_lambda >= 0, ">= 0"),
            "align_dim": (self.align_dim >= 1, ">= 1"),
            "align_targets": (self.align_targets in ALIGN_TARGETS, f"one of {ALIGN_TARGETS}"),
            "encoder_lr_scale": (self.encoder_lr_scale > 0, "> 0"),
            "max_steps_per_epoch": (self.max_steps_per_epoch >= 0, ">= 0 (0: no cap)"),
            "num_workers": (self.num_workers >= 0, ">= 0"),
            "language_abnormal_share": (0 <= self.language_abnormal_share < 1, "in [0, 1)"),
            "language_finding_weight": (self.language_finding_weight >= 1, ">= 1"),
        }
        for name, (ok, allowed) in checks.items():
            if not ok:
                raise ConfigError(f"{name} must be {allowed}, got {getattr(self, name)!r}")
        if self.annotation and not Path(self.annotation).is_file():
            raise ConfigError(f"annotation: file not found: {self.annotation}")
        if self.language_reports and not Path(self.language_reports).exists():
            raise ConfigError(f"language_reports: not found: {self.language_reports}")
        if self.findings_head and not Path(self.findings_head).is_dir():
            raise ConfigError(f"findings_head: folder not found: {self.findings_head}")
        if self.image_root and not Path(self.image_root).is_dir():
            raise ConfigError(f"image_root: folder not found: {self.image_root}")
        return self


TRAIN_PRESETS = tuple(PRESETS)  # the names; the overrides are in ``mrg.presets.PRESETS``


def train_preset(name: str, mode: str | None = None, **overrides: Any) -> TrainConfig:
    """The TrainConfig of preset ``name`` with its ModelConfig, plus field overrides."""
    data = merged(TrainConfig().to_dict(), preset(name)["train"])
    data["model"] = model_preset(name, mode).to_dict()
    data.update(overrides)
    return TrainConfig.from_dict(data)

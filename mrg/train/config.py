"""Training configuration: stages, optimisation, data, and named presets.

A run is one JSON-able ``TrainConfig``; ``train_preset(name)`` gives the starting points
(``demo-cpu``, ``iu-xray-llama2-7b-nf4``, ``mimic-cxr-llama2-7b-nf4``). ``validate`` checks
every field before any model or data is loaded and names the field it rejects.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mrg.config import ConfigError, ModelConfig, config_from_dict, model_preset


@dataclass
class StageConfig:
    """One training stage; ``epochs = 0`` skips it."""

    epochs: int = 0
    lr: float = 1e-4


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    annotation: str = ""
    image_root: str = ""
    output_dir: str = "runs/mrg"
    language_reports: str = ""  # OpenI NLMCXR_reports.tgz (or its folder) for the language stage
    language: StageConfig = field(default_factory=lambda: StageConfig(epochs=0, lr=1e-3))
    align: StageConfig = field(default_factory=lambda: StageConfig(epochs=1, lr=5e-4))
    generate: StageConfig = field(default_factory=lambda: StageConfig(epochs=5, lr=1e-4))
    joint: StageConfig = field(default_factory=lambda: StageConfig(epochs=0, lr=5e-5))
    joint_lambda: float = 0.5
    align_dim: int = 256
    align_targets: str = "labels"  # labels: label-aware soft targets | identity: CLIP's
    encoder_lr_scale: float = 1.0  # encoder lr / stage lr in the generate and joint stages
    batch_size: int = 8
    grad_accum: int = 1
    weight_decay: float = 0.05
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    seed: int = 42
    mixed_precision: str = "no"  # no | bf16 | fp16
    gradient_checkpointing: bool = False  # recompute the frozen LLM's activations in backward
    on_missing: str = "error"  # error | skip
    val_max_studies: int = 32
    val_max_new_tokens: int = 60
    max_steps_per_epoch: int = 0  # optimizer steps per epoch; 0: no cap (tests and smoke runs)
    num_workers: int = 0

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
        checks = {
            "batch_size": self.batch_size >= 1,
            "grad_accum": self.grad_accum >= 1,
            "warmup_ratio": 0 <= self.warmup_ratio < 1,
            "max_grad_norm": self.max_grad_norm > 0,
            "mixed_precision": self.mixed_precision in ("no", "bf16", "fp16"),
            "on_missing": self.on_missing in ("error", "skip"),
            "joint_lambda": self.joint_lambda >= 0,
            "align_dim": self.align_dim >= 1,
            "align_targets": self.align_targets in ("labels", "identity"),
            "encoder_lr_scale": self.encoder_lr_scale > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"{name} has an invalid value: {getattr(self, name)!r}")
        if self.annotation and not Path(self.annotation).is_file():
            raise ConfigError(f"annotation: file not found: {self.annotation}")
        if self.language_reports and not Path(self.language_reports).exists():
            raise ConfigError(f"language_reports: not found: {self.language_reports}")
        if self.image_root and not Path(self.image_root).is_dir():
            raise ConfigError(f"image_root: folder not found: {self.image_root}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return config_from_dict(cls, copy.deepcopy(data))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # Sized for a 2-core CPU: SmolLM2-135M frozen, small hybrid ViT, frozen CNN stem.
    "demo-cpu": {
        "align": {"epochs": 2, "lr": 5e-4},
        "generate": {"epochs": 6, "lr": 3e-4},
        "joint": {"epochs": 0, "lr": 1e-4},
        "batch_size": 8,
        "val_max_studies": 24,
        "val_max_new_tokens": 60,
    },
    # The recipe of assets/checkpoints (scripts/build_demo_checkpoints.py runs it on the
    # label-matched NIH/OpenI pairs): the prompt learns report language from OpenI text first,
    # alignment once, then short generation with the aligned encoder at 0.1x the lr (each
    # epoch costs 15-20 min on 2 cores: the whole build fits about an hour and a half).
    "demo-checkpoints": {
        "language": {"epochs": 2, "lr": 3e-3},
        "align": {"epochs": 3, "lr": 5e-4},
        "generate": {"epochs": 1, "lr": 1e-3},
        "encoder_lr_scale": 0.1,
        "batch_size": 8,
        "val_max_studies": 16,
        "val_max_new_tokens": 100,
    },
    # R2GenGPT's recipe: lr 1e-4, 15 epochs, batch 8, bf16, 60 report tokens (IU X-ray).
    "iu-xray-llama2-7b-nf4": {
        "align": {"epochs": 1, "lr": 1e-4},
        "generate": {"epochs": 15, "lr": 1e-4},
        "batch_size": 8,
        "mixed_precision": "bf16",
        "val_max_studies": 296,
        "val_max_new_tokens": 100,
    },
    # MIMIC-CXR: 5 epochs, 100 report tokens.
    "mimic-cxr-llama2-7b-nf4": {
        "align": {"epochs": 1, "lr": 1e-4},
        "generate": {"epochs": 5, "lr": 1e-4},
        "batch_size": 8,
        "mixed_precision": "bf16",
        "val_max_studies": 500,
        "val_max_new_tokens": 100,
    },
}


def train_preset(name: str, mode: str | None = None, **overrides: Any) -> TrainConfig:
    """The TrainConfig of preset ``name`` with its ModelConfig, plus field overrides."""
    if name not in TRAIN_PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(TRAIN_PRESETS)}")
    data = copy.deepcopy(TRAIN_PRESETS[name])
    data["model"] = model_preset(name, mode).to_dict()
    if name.startswith("demo-"):
        data["model"]["encoder"]["freeze_stem"] = True
    data.update(overrides)
    return TrainConfig.from_dict(data)

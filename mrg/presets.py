"""Named presets: the model and training values that differ from the config defaults.

``PRESETS`` is the one table (each value with its reason); ``model_preset`` builds a preset's
``ModelConfig``, ``mrg.train.config.train_preset`` its ``TrainConfig``.
"""

from __future__ import annotations

import copy
from typing import Any

from mrg.config import ConfigError, ModelConfig

LLAMA2_7B = "meta-llama/Llama-2-7b-chat-hf"

# Every named preset, for the model and for training, as overrides of the dataclass defaults
# above and of ``TrainConfig``'s (``mrg.train.config``); each value says why it differs.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # Offline on a 2-core CPU: the defaults are this model (SmolLM2-135M from PyPI, hybrid ViT
    # with an ImageNet EfficientNet-Lite0 stem).
    "demo-cpu": {
        "model": {
            # The stem's ImageNet features are all the pretraining there is offline; training
            # them on a few hundred radiographs would only forget them.
            "encoder": {"freeze_stem": True},
        },
        "train": {
            "align": {"epochs": 2, "lr": 5e-4},  # twice over a small set before generation
            "generate": {"epochs": 6, "lr": 3e-4},  # 135M frozen LLM: a larger lr than 7B's
            "joint": {"epochs": 0, "lr": 1e-4},
            "val_max_studies": 24,  # validation generation costs minutes on 2 cores
        },
    },
    # The recipe of assets/checkpoints (scripts/build_demo_checkpoints.py runs it on the
    # label-matched NIH/OpenI pairs): the prompt learns report language from OpenI text first,
    # alignment once, then short generation with the aligned encoder at 0.1x the lr (each
    # epoch costs 15-20 min on 2 cores: the whole build fits about an hour and a half).
    "demo-checkpoints": {
        "model": {
            "encoder": {"freeze_stem": True},  # as demo-cpu
            "customizer": {
                "prompt_length": 32,  # room for the language stage to steer 135M
                # the report is written from the findings head's states (present, possible,
                # absent; scripts/build_findings_head.py): an image-only prompt wrote a normal
                # report for every image, and present-only findings a classifier's list; the
                # affine heads see s beside v (static: words only)
                "conditioning": "visual+states",
            },
            # the states as words in the user turn too: the frozen LLM follows words
            # (measured: label fidelity of the language stage, assets/MODEL_CARD.md)
            "findings_prompt": "states",
            "max_views": 1,  # NIH ChestX-ray14 has frontal images only
        },
        "train": {
            # a soft prompt takes a large lr; two passes over the 1,134 reports, with the
            # states in view from the first step: the states' words and forced sentences are
            # new to the prompt, and one pass learned the form but not the negations
            "language": {"epochs": 2, "lr": 3e-3},
            "max_steps_per_epoch": 200,  # caps the language pass (image epochs are shorter)
            # 3 in 10 reports name a finding (1 in 7 in OpenI); every sentence weighs the
            # same: at 3x on the sentences stating a finding the prompt wrote lists of
            # negations and stopped (about 15 words, the anatomy in 4 % of test reports)
            "language_abnormal_share": 0.3,
            "align": {"epochs": 3, "lr": 5e-4},
            # 1e-3 with the prompt trainable rewrote the report language into chatbot prose
            # (test CE 0.197, BLEU-4 0.023): the prompt stays, the rest learns at 3e-4
            "generate": {"epochs": 1, "lr": 3e-4},
            "freeze_prompt_after_language": True,
            "encoder_lr_scale": 0.1,  # generation must not overwrite what alignment learned
            "val_max_studies": 16,
            "val_max_new_tokens": 100,  # whole reports, as the app writes them
        },
    },
    # R2GenGPT's recipe (IU X-ray) on a GPU host with hub access: LLaMA-2-7B in 4 bits, an
    # ImageNet ViT-B/16, lr 1e-4, 15 epochs, batch 8, bf16, 60 report tokens.
    "iu-xray-llama2-7b-nf4": {
        "model": {
            "llm": {"source": LLAMA2_7B, "quantization": "nf4", "dtype": "bfloat16"},
            "encoder": {"name": "vit_base_patch16_224", "pretrained": True},
            "customizer": {"prompt_length": 16, "book_size": 16, "hidden_dim": 512},
            "max_report_tokens": 60,  # IU X-ray findings are short
        },
        "train": {
            "align": {"epochs": 1, "lr": 1e-4},
            "generate": {"epochs": 15, "lr": 1e-4},
            "mixed_precision": "bf16",
            "val_max_studies": 296,  # the whole R2Gen validation split
            "val_max_new_tokens": 100,
        },
    },
    # MIMIC-CXR as R2GenGPT: 5 epochs, 100 report tokens, one (frontal) view.
    "mimic-cxr-llama2-7b-nf4": {
        "model": {
            "llm": {"source": LLAMA2_7B, "quantization": "nf4", "dtype": "bfloat16"},
            "encoder": {"name": "vit_base_patch16_224", "pretrained": True},
            "customizer": {"prompt_length": 16, "book_size": 16, "hidden_dim": 512},
            "max_views": 1,
        },
        "train": {
            "align": {"epochs": 1, "lr": 1e-4},
            "generate": {"epochs": 5, "lr": 1e-4},
            "mixed_precision": "bf16",
            "val_max_studies": 500,
            "val_max_new_tokens": 100,
        },
    },
}


def merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` applied, nested mappings merged key by key (a new dict)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def preset(name: str) -> dict[str, dict[str, Any]]:
    """The overrides of preset ``name``: ``{"model": …, "train": …}``."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def model_preset(name: str, mode: str | None = None) -> ModelConfig:
    """The ModelConfig of preset ``name`` (optionally with another customizer mode)."""
    config = ModelConfig.from_dict(merged(ModelConfig().to_dict(), preset(name)["model"]))
    if mode is not None:
        config.customizer.mode = mode
    if config.customizer.mode == "static":  # no affine heads: findings reach it as words only
        config.customizer.conditioning = "visual"
    return config.validate()

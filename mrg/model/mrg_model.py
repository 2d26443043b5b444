"""The MRG-LLM model: trainable encoder, projection and prompt customizer around a frozen LLM.

Sequence fed to the LLM as ``inputs_embeds`` (one row per study)::

    [instruction prefix] [customized prompt P'(v, y): L] [visual tokens: V·G²] ([findings words])
    [assistant prefix] ([report] [EOS])

The instruction and assistant prefix come from the tokenizer's chat template when the LLM has
one. ``y`` (``[B, 15]``: the 14 ChestX-ray14 findings and "normal", 0/1 decisions or
probabilities) is the findings condition: the customizer's affine heads see it with
``conditioning: visual+findings``, and with ``findings_prompt: words`` the findings it names
(entries ≥ 0.5) are written after the image ("Findings: cardiomegaly."). Rows whose words
differ in length are left-padded. Labels are −100 everywhere except the report and its EOS. Position ids are
``cumsum(attention_mask) − 1``, the rule ``generate`` uses, so a missing view (masked out)
is skipped identically in training and decoding.

Tensors are born in ``context`` (``mrg.model.prompting.ContextAssembly``) and die in the LLM
call: here for the loss (``forward``), in ``mrg.model.generation.ReportGeneration`` for
decoding. The LLM never receives gradients (all its parameters are frozen) but passes them
back to the trainable parts. This file holds the parts, the loss and persistence.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mrg.config import CONFIG_NAME, ConfigError, ModelConfig
from mrg.data.views import Views
from mrg.hub import base_model_id, hub_model_card, push_to_hub, resolve_checkpoint
from mrg.model.customizer import CustomizedPrompt, build_customizer
from mrg.model.encoder import VisualEncoder
from mrg.model.generation import ReportGeneration
from mrg.model.llm import load_frozen_llm
from mrg.model.prompting import Context, ContextAssembly, PromptTemplate, positions_from_mask
from mrg.text.phrasing import PHRASING_NAME, Phrasing
from mrg.text.vocabulary import VOCABULARY_NAME, read_vocabulary, write_vocabulary

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
IGNORE_INDEX = -100


@dataclass
class MRGOutput:
    loss: torch.Tensor
    logits: torch.Tensor
    prompt: CustomizedPrompt
    global_feature: torch.Tensor


_LEGACY_CONDITION = re.compile(r"^(customizer\.(?:affine\.trunk|query))\.([01])\.")


def _current_key(key: str) -> str:
    """A weight's name in this version: checkpoints written before the findings condition
    named the visual code ``affine.trunk.0/1`` and ``query.0/1`` (now ``….visual.0/1``)."""
    return _LEGACY_CONDITION.sub(r"\1.visual.\2.", key)


class MRGModel(ContextAssembly, ReportGeneration, nn.Module):
    """Frozen LLM + trainable (encoder, projection, customizer)."""

    def __init__(
        self,
        config: ModelConfig,
        llm: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        load_stem_weights: bool = True,
    ):
        super().__init__()
        self.config = config.validate()
        self.llm, self.tokenizer = llm, tokenizer
        embedding = llm.get_input_embeddings()
        llm_dim = embedding.embedding_dim
        self.encoder = VisualEncoder(config.encoder, load_stem_weights)
        self.projection = nn.Sequential(
            nn.Linear(self.encoder.embed_dim, llm_dim), nn.LayerNorm(llm_dim)
        )
        init_std = float(embedding.weight.detach().float().std())
        self.customizer = build_customizer(
            config.customizer, self.encoder.embed_dim, llm_dim, init_std
        )
        self.template = PromptTemplate.from_tokenizer(
            tokenizer, config.instruction, findings_words=config.findings_prompt == "words"
        )
        # the words a report may use (``mrg.text.vocabulary``): set in training, saved beside
        # the weights; None: any word
        self.report_vocabulary: frozenset[str] | None = None
        # how its training reports phrase things (``mrg.text.phrasing``): set and saved alike
        self.report_phrasing: Phrasing | None = None
        for part in (self.encoder, self.projection, self.customizer):
            part.to(llm.device)  # the LLM may be quantized and placed already: move only our parts

    # ----------------------------------------------------------------- properties

    @property
    def mode(self) -> str:
        return self.config.customizer.mode

    @property
    def device(self) -> torch.device:
        return self.projection[0].weight.device

    @property
    def llm_dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    def train(self, mode: bool = True) -> MRGModel:
        """Train the trainable parts; the LLM stays in eval mode (no dropout), except under
        activation checkpointing, which transformers applies to modules in training mode."""
        super().train(mode)
        self.llm.train(mode and self.llm.is_activation_checkpointing)
        return self

    def enable_llm_checkpointing(self) -> None:
        """Keep only each LLM layer's input in the forward pass and recompute the layer in
        backward: activation memory from O(layers) to O(1) layers, for one more forward.

        The gradient still flows through the frozen layers to ``inputs_embeds`` (non-reentrant
        checkpointing needs no input that requires grad). Refused for an LLM with dropout,
        which training mode would switch on.
        """
        dropout = getattr(self.llm.config, "attention_dropout", 0.0) or 0.0
        if dropout > 0 or any(isinstance(m, nn.Dropout) and m.p > 0 for m in self.llm.modules()):
            raise ConfigError("gradient_checkpointing needs an LLM without dropout")
        self.llm.activation_checkpointing_enable({"use_reentrant": False})

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters with ``requires_grad`` (never the LLM's): what ``save_pretrained`` writes."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def num_trainable_parameters(self) -> dict[str, int]:
        counts = {}
        for part in ("encoder", "projection", "customizer"):
            counts[part] = sum(
                p.numel() for p in getattr(self, part).parameters() if p.requires_grad
            )
        counts["total"] = sum(counts.values())
        counts["llm_frozen"] = sum(p.numel() for p in self.llm.parameters())
        return counts

    # ----------------------------------------------------------------- report targets

    def tokenize_reports(self, reports: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Report ids + EOS, right-padded: ``(ids [B, R], mask [B, R])``; truncated to max_report_tokens."""
        encoded = self.tokenizer(
            reports,
            add_special_tokens=False,
            truncation=True,
            max_length=self.config.max_report_tokens,
        )["input_ids"]
        return self._pad_reports(encoded)

    def token_weights(
        self, reports: list[str], emphasis: list[list[tuple[int, int]]], weight: float
    ) -> torch.Tensor:
        """``[B, R]`` loss weights aligned with ``tokenize_reports``: ``weight`` on tokens that
        overlap a character span of ``emphasis`` (a report's sentences that name a finding),
        1 elsewhere (EOS included)."""
        offsets = self.tokenizer(
            reports,
            add_special_tokens=False,
            truncation=True,
            max_length=self.config.max_report_tokens,
            return_offsets_mapping=True,
        )["offset_mapping"]
        width = max(len(o) for o in offsets) + 1
        weights = torch.ones(len(reports), width)
        for i, (row, spans) in enumerate(zip(offsets, emphasis)):
            for j, (start, end) in enumerate(row):
                if any(start < span_end and end > span_start for span_start, span_end in spans):
                    weights[i, j] = weight
        return weights.to(self.device)

    def _pad_reports(self, encoded: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row + EOS, right-padded: ``(ids [B, R], mask [B, R])``."""
        rows = [ids + [self.template.eos_id] for ids in encoded]
        width = max(len(r) for r in rows)
        pad = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.template.eos_id
        )
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return ids.to(self.device), mask.to(self.device)

    # ----------------------------------------------------------------- training

    def forward(
        self,
        views: Views,
        reports: list[str],
        findings: torch.Tensor | None = None,
    ) -> MRGOutput:
        """Teacher-forced LM loss over report tokens and EOS only."""
        ctx = self.context(views, findings)
        out = self.report_loss(ctx, reports)
        return MRGOutput(out.loss, out.logits, ctx.prompt, ctx.global_feature)

    def language_loss(
        self,
        reports: list[str],
        findings: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The report-language stage's loss: report tokens after [prefix][P][suffix], no image."""
        return self.report_loss(self.text_context(len(reports), findings), reports, weights).loss

    def report_loss(self, ctx: Context, reports: list[str], weights: torch.Tensor | None = None):
        """The LLM's output on [context][reports], labels on the report tokens and EOS only.

        With ``weights`` (``[B, R]``, ``token_weights``) the loss is the weighted mean
        Σ w_t CE_t / Σ w_t over those tokens (all ones: the plain mean)."""
        report_ids, report_mask = self.tokenize_reports(reports)
        context_labels = torch.full(
            ctx.attention_mask.shape, IGNORE_INDEX, dtype=torch.long, device=self.device
        )
        labels = torch.cat(
            [context_labels, report_ids.masked_fill(report_mask == 0, IGNORE_INDEX)], dim=1
        )
        if weights is None:
            return self.teacher_forced(ctx, report_ids, report_mask, labels)
        out = self.teacher_forced(ctx, report_ids, report_mask)
        w = torch.cat([torch.zeros_like(context_labels, dtype=weights.dtype), weights], dim=1)
        w = (w * (labels != IGNORE_INDEX))[:, 1:]
        token_loss = F.cross_entropy(
            out.logits[:, :-1].float().transpose(1, 2),
            labels[:, 1:],
            ignore_index=IGNORE_INDEX,
            reduction="none",
        )
        out.loss = (token_loss * w).sum() / w.sum()
        return out

    def teacher_forced(
        self,
        ctx: Context,
        report_ids: torch.Tensor,
        report_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
    ):
        """The LLM's output over [context][report ids]; logits at t predict token t + 1."""
        embeds = torch.cat([ctx.embeds, self.llm.get_input_embeddings()(report_ids)], dim=1)
        mask = torch.cat([ctx.attention_mask, report_mask], dim=1)
        return self.llm(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions_from_mask(mask),
            labels=labels,
        )

    # ----------------------------------------------------------------- persistence

    def save_pretrained(self, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write ``mrg_config.json``, the trainable weights (``model.safetensors``) and the
        report vocabulary (``report_vocabulary.txt``) where the model has one."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights = {
            k: (v.to(dtype) if dtype else v).contiguous().cpu()
            for k, v in self.trainable_state_dict().items()
        }
        save_file(
            weights, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "mode": self.mode}
        )
        (directory / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        if self.report_vocabulary:
            write_vocabulary(directory / VOCABULARY_NAME, self.report_vocabulary)
        if self.report_phrasing:
            self.report_phrasing.save(directory / PHRASING_NAME)
        return directory

    def push_to_hub(self, repo_id: str, card: str = "", private: bool = False) -> str:
        """Save (float16 trainable weights) and upload to ``repo_id`` with a Hub model card."""
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, dtype=torch.float16)
            readme = hub_model_card(
                repo_id, [self.mode], base_model_id(self.config.llm.source), card
            )
            return push_to_hub(tmp, repo_id, readme, private=private)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        llm: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        config_overrides: dict | None = None,
        subfolder: str = "",
    ) -> MRGModel:
        """Rebuild from ``save_pretrained`` output (a folder, or a Hub repo id with the mode in
        ``subfolder`` where the repo holds several), reusing ``llm``/``tokenizer`` when given."""
        directory = resolve_checkpoint(directory) / subfolder
        data = json.loads((directory / CONFIG_NAME).read_text())
        for section, values in (config_overrides or {}).items():
            data.setdefault(section, {}).update(values)
        config = ModelConfig.from_dict(data).validate()
        if llm is None or tokenizer is None:
            llm, tokenizer = load_frozen_llm(config.llm)
        model = cls(config, llm, tokenizer)
        model.load_trainable(directory)
        if (directory / VOCABULARY_NAME).is_file():
            model.report_vocabulary = read_vocabulary(directory / VOCABULARY_NAME)
        if (directory / PHRASING_NAME).is_file():
            model.report_phrasing = Phrasing.load(directory / PHRASING_NAME)
        return model

    def load_trainable(self, directory: str | Path, prefix: str = "") -> None:
        """Copy the trainable weights of ``directory/model.safetensors`` whose names start with
        ``prefix`` (e.g. ``"encoder."``: another mode's aligned encoder) in place; every key must match."""
        state = load_file(str(Path(directory) / WEIGHTS_NAME))
        state = {_current_key(k): v for k, v in state.items() if k.startswith(prefix)}
        expected = {k for k in self.trainable_state_dict() if k.startswith(prefix)}
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"checkpoint {directory} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor.to(params[name].dtype))

"""The MRG-LLM model: trainable encoder, projection and prompt customizer around a frozen LLM.

Sequence fed to the LLM as ``inputs_embeds`` (one row per study)::

    [instruction prefix] [customized prompt P'(v): L] [visual tokens: V·G²] [assistant prefix] ([report] [EOS])

The instruction and assistant prefix come from the tokenizer's chat template when the LLM has
one. Labels are −100 everywhere except the report and its EOS. Position ids are
``cumsum(attention_mask) − 1``, the rule ``generate`` uses, so a missing view (masked out)
is skipped identically in training and decoding.

Tensors are born in ``encode``/``context`` and die in the LLM call; the LLM never receives
gradients (all its parameters are frozen) but passes them back to the trainable parts.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation.logits_process import (
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from mrg.batching import Request
from mrg.config import CONFIG_NAME, DEFAULT_DECODING, ConfigError, Decoding, ModelConfig
from mrg.hub import base_model_id, hub_model_card, push_to_hub, resolve_checkpoint
from mrg.model.customizer import CustomizedPrompt, build_customizer
from mrg.model.decoding import OnBody, ReportStructureProcessor, report_structure
from mrg.model.encoder import VisualEncoder
from mrg.model.llm import load_frozen_llm
from mrg.model.views import Views

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
IMAGE_PLACEHOLDER = "<image>"
IGNORE_INDEX = -100


def _render_chat(tokenizer: PreTrainedTokenizerBase, instruction: str) -> str:
    """The chat prompt with the instruction as system message (replacing any default system
    prompt), or inside the user turn where the template has no system role."""
    system = [
        {"role": "system", "content": instruction},
        {"role": "user", "content": IMAGE_PLACEHOLDER},
    ]
    try:
        return tokenizer.apply_chat_template(system, add_generation_prompt=True, tokenize=False)
    except Exception:  # noqa: BLE001 — templates without a system role raise their own error types
        user = [{"role": "user", "content": f"{instruction}\n{IMAGE_PLACEHOLDER}"}]
        return tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)


@dataclass
class PromptTemplate:
    """Token ids around the image: ``prefix`` before P', ``suffix`` after the visual tokens."""

    prefix_ids: list[int]
    suffix_ids: list[int]
    eos_id: int

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase, instruction: str) -> PromptTemplate:
        if tokenizer.chat_template:
            before, after = _render_chat(tokenizer, instruction).split(IMAGE_PLACEHOLDER)
        else:
            before, after = f"{instruction}\n", "\nReport:"
        encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]
        prefix = encode(before)
        if tokenizer.bos_token_id is not None and not tokenizer.chat_template:
            prefix = [tokenizer.bos_token_id] + prefix
        eos = (
            tokenizer.convert_tokens_to_ids("<|im_end|>")
            if "<|im_end|>" in tokenizer.get_vocab()
            else None
        )
        return cls(prefix, encode(after), eos if eos is not None else tokenizer.eos_token_id)


@dataclass
class Context:
    """The model's input before the report: embeddings, mask, positions, and the prompt used."""

    embeds: torch.Tensor  # [B, T, D]
    attention_mask: torch.Tensor  # [B, T]
    prompt: CustomizedPrompt
    global_feature: torch.Tensor | None  # [B, d_v], the customizer's input v (None: no image)


@dataclass
class MRGOutput:
    loss: torch.Tensor
    logits: torch.Tensor
    prompt: CustomizedPrompt
    global_feature: torch.Tensor


def text_increments(tokenizer: PreTrainedTokenizerBase, ids: Iterable[int]) -> Iterator[str]:
    """Text increments of a stream of token ids; their concatenation is the decoded text.

    An increment is held back while the text ends in an incomplete multi-byte character."""
    seen: list[int] = []
    shown = ""
    for token in ids:
        seen.append(token)
        text = tokenizer.decode(seen, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue
        if len(text) > len(shown):
            yield text[len(shown) :]
            shown = text


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """``cumsum(mask) − 1`` with masked positions at 0: the rule ``generate`` applies."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


class MRGModel(nn.Module):
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
        self.template = PromptTemplate.from_tokenizer(tokenizer, config.instruction)
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

    # ----------------------------------------------------------------- inputs

    def embed_ids(self, ids: list[int] | torch.Tensor, batch: int) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        return self.llm.get_input_embeddings()(ids).unsqueeze(0).expand(batch, -1, -1)

    def context(self, views: Views) -> Context:
        """[prefix][P'(v)][visual tokens][suffix] as embeddings, with the attention mask."""
        features = self.encoder(views.to(self.device))
        prompt = self.customizer(features.global_)
        visual = self.projection(features.tokens)
        return self._assemble(prompt, visual, features.token_mask, features.global_)

    def text_context(self, batch: int) -> Context:
        """[prefix][P][suffix] with no image: the report-language stage's input.

        The visual tokens are absent rather than masked; since positions skip masked tokens
        (``positions_from_mask``), the two are the same computation, and absent is cheaper.
        """
        prompt = CustomizedPrompt(self.customizer.plain_prompt().unsqueeze(0).expand(batch, -1, -1))
        return self._assemble(prompt)

    def _assemble(
        self,
        prompt: CustomizedPrompt,
        visual: torch.Tensor | None = None,
        visual_mask: torch.Tensor | None = None,
        global_feature: torch.Tensor | None = None,
    ) -> Context:
        b, dtype = prompt.tokens.shape[0], self.llm_dtype
        ones = lambda n: torch.ones(b, n, dtype=torch.long, device=self.device)
        parts = [self.embed_ids(self.template.prefix_ids, b), prompt.tokens.to(dtype)]
        masks = [ones(len(self.template.prefix_ids)), ones(prompt.tokens.shape[1])]
        if visual is not None:
            parts.append(visual.to(dtype))
            masks.append(visual_mask.long())
        parts.append(self.embed_ids(self.template.suffix_ids, b))
        masks.append(ones(len(self.template.suffix_ids)))
        return Context(torch.cat(parts, dim=1), torch.cat(masks, dim=1), prompt, global_feature)

    def tokenize_reports(self, reports: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Report ids + EOS, right-padded: ``(ids [B, R], mask [B, R])``; truncated to max_report_tokens."""
        encoded = self.tokenizer(
            reports,
            add_special_tokens=False,
            truncation=True,
            max_length=self.config.max_report_tokens,
        )["input_ids"]
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
    ) -> MRGOutput:
        """Teacher-forced LM loss over report tokens and EOS only."""
        ctx = self.context(views)
        out = self.report_loss(ctx, reports)
        return MRGOutput(out.loss, out.logits, ctx.prompt, ctx.global_feature)

    def language_loss(self, reports: list[str]) -> torch.Tensor:
        """The report-language stage's loss: report tokens after [prefix][P][suffix], no image."""
        return self.report_loss(self.text_context(len(reports)), reports).loss

    def report_loss(self, ctx: Context, reports: list[str]):
        """The LLM's output on [context][reports], labels on the report tokens and EOS only."""
        report_ids, report_mask = self.tokenize_reports(reports)
        context_labels = torch.full(
            ctx.attention_mask.shape, IGNORE_INDEX, dtype=torch.long, device=self.device
        )
        labels = torch.cat(
            [context_labels, report_ids.masked_fill(report_mask == 0, IGNORE_INDEX)], dim=1
        )
        return self.teacher_forced(ctx, report_ids, report_mask, labels)

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

    # ----------------------------------------------------------------- decoding

    @torch.inference_mode()
    def generate(
        self,
        views: Views,
        decoding: Decoding = DEFAULT_DECODING,
    ) -> list[str]:
        """Batched decoding with ``transformers`` ``generate`` (greedy, beam or sampling)."""
        decoding.validate()
        ctx = self.context(views)
        kwargs = {
            "inputs_embeds": ctx.embeds,
            "attention_mask": ctx.attention_mask,
            "position_ids": positions_from_mask(ctx.attention_mask),
            "max_new_tokens": decoding.max_new_tokens,
            "logits_processor": self.processors(decoding),
            "eos_token_id": self.template.eos_id,
            "pad_token_id": self.tokenizer.pad_token_id,
            "do_sample": decoding.strategy == "sample",
            "num_beams": decoding.num_beams if decoding.strategy == "beam" else 1,
        }
        if decoding.strategy == "sample":  # the warpers are in ``processors``: no-ops here
            kwargs.update(temperature=1.0, top_p=1.0, top_k=0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        out = self.llm.generate(**kwargs)
        return [text.strip() for text in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def processors(self, decoding: Decoding) -> LogitsProcessorList:
        """Penalty and n-gram ban on the body, warpers, then the report structure (last, so
        that a forced header wins over everything before it)."""
        structure = report_structure(self.tokenizer, self.template.eos_id)
        processors = LogitsProcessorList()
        if decoding.repetition_penalty != 1.0:
            processors.append(
                OnBody(RepetitionPenaltyLogitsProcessor(decoding.repetition_penalty), structure)
            )
        if decoding.no_repeat_ngram_size:
            processors.append(
                OnBody(NoRepeatNGramLogitsProcessor(decoding.no_repeat_ngram_size), structure)
            )
        if decoding.strategy == "sample":
            processors.append(TemperatureLogitsWarper(decoding.temperature))
            processors.append(TopPLogitsWarper(decoding.top_p))
        processors.append(ReportStructureProcessor(structure, decoding.max_new_tokens))
        return processors

    @torch.inference_mode()
    def stream_ids(
        self,
        views: Views,
        decoding: Decoding = DEFAULT_DECODING,
    ) -> Iterator[int]:
        """Yield token ids of one study one at a time (KV cache on); stops at EOS.

        Closing the generator stops the computation at once: that is how a cancelled
        request frees the model.
        """
        decoding.validate()
        if decoding.strategy == "beam":
            raise ValueError("beam search is not streamable; use generate()")
        if views.batch_size != 1:
            raise ValueError("stream_ids decodes one study at a time")
        ctx = self.context(views)
        processors = self.processors(decoding)
        mask = ctx.attention_mask
        out = self.llm(
            inputs_embeds=ctx.embeds,
            attention_mask=mask,
            position_ids=positions_from_mask(mask),
            use_cache=True,
        )
        generated = torch.empty((1, 0), dtype=torch.long, device=self.device)
        for _ in range(decoding.max_new_tokens):
            scores = processors(generated, out.logits[:, -1].float())
            if decoding.strategy == "sample":
                next_id = torch.multinomial(scores.softmax(-1), 1)
            else:
                next_id = scores.argmax(-1, keepdim=True)
            if int(next_id) == self.template.eos_id:
                return
            yield int(next_id)
            generated = torch.cat([generated, next_id], dim=1)
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            position = positions_from_mask(mask)[:, -1:]
            out = self.llm(
                input_ids=next_id,
                attention_mask=mask,
                position_ids=position,
                past_key_values=out.past_key_values,
                use_cache=True,
            )

    def stream(
        self,
        views: Views,
        decoding: Decoding = DEFAULT_DECODING,
    ) -> Iterator[str]:
        """Yield text increments; their concatenation is the decoded report."""
        yield from text_increments(self.tokenizer, self.stream_ids(views, decoding))

    @torch.inference_mode()
    def decoding_request(
        self,
        views: Views,
        decoding: Decoding = DEFAULT_DECODING,
    ) -> Request:
        """One study's context and processors, for the continuous batcher (``mrg.batching``)."""
        decoding.validate()
        if decoding.strategy == "beam":
            raise ValueError("beam search is not streamable; use generate()")
        if views.batch_size != 1:
            raise ValueError("a decoding request holds one study")
        ctx = self.context(views)
        return Request(
            ctx.embeds,
            ctx.attention_mask,
            self.processors(decoding),
            decoding.max_new_tokens,
            self.template.eos_id,
            sample=decoding.strategy == "sample",
        )

    # ----------------------------------------------------------------- persistence

    def save_pretrained(self, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write ``mrg_config.json`` and the trainable weights (``model.safetensors``) only."""
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
        return model

    def load_trainable(self, directory: str | Path, prefix: str = "") -> None:
        """Copy the trainable weights of ``directory/model.safetensors`` whose names start with
        ``prefix`` (e.g. ``"encoder."``: another mode's aligned encoder) in place; every key must match."""
        state = load_file(str(Path(directory) / WEIGHTS_NAME))
        state = {k: v for k, v in state.items() if k.startswith(prefix)}
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

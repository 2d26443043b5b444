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

Tensors are born in ``encode``/``context`` and die in the LLM call; the LLM never receives
gradients (all its parameters are frozen) but passes them back to the trainable parts.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
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
from mrg.model.decoding import (
    ClosedVocabulary,
    OnBody,
    ReportStructureProcessor,
    report_structure,
)
from mrg.model.encoder import VisualEncoder
from mrg.model.llm import load_frozen_llm
from mrg.model.views import Views
from mrg.text.taxonomy import (
    FINDINGS14,
    findings_sentences,
    findings_words,
    named_findings,
    naming_words,
)
from mrg.text.vocabulary import VOCABULARY_NAME, read_vocabulary, write_vocabulary

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
IMAGE_PLACEHOLDER = "<image>"
FINDINGS_PLACEHOLDER = "<findings>"
IGNORE_INDEX = -100


def render_chat(tokenizer: PreTrainedTokenizerBase, instruction: str, user: str) -> str:
    """The chat prompt with the instruction as system message (replacing any default system
    prompt), or inside the user turn where the template has no system role."""
    system = [
        {"role": "system", "content": instruction},
        {"role": "user", "content": user},
    ]
    try:
        return tokenizer.apply_chat_template(system, add_generation_prompt=True, tokenize=False)
    except Exception:  # noqa: BLE001 — templates without a system role raise their own error types
        user_only = [{"role": "user", "content": f"{instruction}\n{user}"}]
        return tokenizer.apply_chat_template(user_only, add_generation_prompt=True, tokenize=False)


@dataclass
class PromptTemplate:
    """Token ids around the image: ``prefix`` before P', ``suffix`` after the visual tokens;
    with findings words, ``middle`` + the words' ids come between the two."""

    prefix_ids: list[int]
    suffix_ids: list[int]
    eos_id: int
    middle_ids: list[int] | None = None  # None: no findings words

    @classmethod
    def from_tokenizer(
        cls, tokenizer: PreTrainedTokenizerBase, instruction: str, findings_words: bool = False
    ) -> PromptTemplate:
        user = (
            f"{IMAGE_PLACEHOLDER}\n{FINDINGS_PLACEHOLDER}" if findings_words else IMAGE_PLACEHOLDER
        )
        if tokenizer.chat_template:
            before, after = render_chat(tokenizer, instruction, user).split(IMAGE_PLACEHOLDER)
        else:
            before, after = f"{instruction}\n", f"\n{user[len(IMAGE_PLACEHOLDER) :]}\nReport:"
        middle = None
        encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]
        if findings_words:
            between, after = after.split(FINDINGS_PLACEHOLDER)
            middle = encode(between)
        prefix = encode(before)
        if tokenizer.bos_token_id is not None and not tokenizer.chat_template:
            prefix = [tokenizer.bos_token_id] + prefix
        eos = (
            tokenizer.convert_tokens_to_ids("<|im_end|>")
            if "<|im_end|>" in tokenizer.get_vocab()
            else None
        )
        return cls(
            prefix, encode(after), eos if eos is not None else tokenizer.eos_token_id, middle
        )


@dataclass
class Context:
    """The model's input before the report: embeddings, mask, positions, and the prompt used."""

    embeds: torch.Tensor  # [B, T, D]
    attention_mask: torch.Tensor  # [B, T]
    prompt: CustomizedPrompt
    global_feature: torch.Tensor | None  # [B, d_v], the customizer's input v (None: no image)
    findings: torch.Tensor | None = None  # [B, 15], the condition y (None: not conditioned)


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


_LEGACY_CONDITION = re.compile(r"^(customizer\.(?:affine\.trunk|query))\.([01])\.")


def _current_key(key: str) -> str:
    """A weight's name in this version: checkpoints written before the findings condition
    named the visual code ``affine.trunk.0/1`` and ``query.0/1`` (now ``….visual.0/1``)."""
    return _LEGACY_CONDITION.sub(r"\1.visual.\2.", key)


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
        self.template = PromptTemplate.from_tokenizer(
            tokenizer, config.instruction, findings_words=config.findings_prompt == "words"
        )
        # the words a report may use (``mrg.text.vocabulary``): set in training, saved beside
        # the weights; None: any word
        self.report_vocabulary: frozenset[str] | None = None
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

    def _condition(self, findings: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """The findings condition on this device, checked: ``[B, 15]`` where the config uses it."""
        if not self.config.uses_findings:
            return None
        if findings is None:
            raise ValueError(
                "this model writes the report from findings: pass the findings vector y [B, 15]"
            )
        findings = torch.as_tensor(findings, dtype=torch.float32, device=self.device)
        if findings.shape != (batch, len(FINDINGS14) + 1):
            raise ValueError(
                f"findings must be [{batch}, {len(FINDINGS14) + 1}], got {tuple(findings.shape)}"
            )
        return findings

    def context(self, views: Views, findings: torch.Tensor | None = None) -> Context:
        """[prefix][P'(v, y)][visual tokens]([findings words])[suffix] as embeddings, with the
        attention mask. ``findings`` (y) is needed where the config conditions on it."""
        features = self.encoder(views.to(self.device))
        y = self._condition(findings, views.batch_size)
        prompt = self.customizer(features.global_, y)
        visual = self.projection(features.tokens)
        return self._assemble(prompt, visual, features.token_mask, features.global_, y)

    def text_context(self, batch: int, findings: torch.Tensor | None = None) -> Context:
        """[prefix][P]([findings words])[suffix] with no image: the report-language stage's input.

        The visual tokens are absent rather than masked; since positions skip masked tokens
        (``positions_from_mask``), the two are the same computation, and absent is cheaper.
        With the findings condition, P' = P(v = 0, y): the affine heads learn y's part here.
        """
        y = self._condition(findings, batch)
        if self.config.customizer.uses_findings:
            no_image = torch.zeros(batch, self.encoder.embed_dim, device=self.device)
            prompt = self.customizer(no_image, y)
        else:
            plain = self.customizer.plain_prompt()
            prompt = CustomizedPrompt(plain.unsqueeze(0).expand(batch, -1, -1))
        return self._assemble(prompt, findings=y)

    def _assemble(
        self,
        prompt: CustomizedPrompt,
        visual: torch.Tensor | None = None,
        visual_mask: torch.Tensor | None = None,
        global_feature: torch.Tensor | None = None,
        findings: torch.Tensor | None = None,
    ) -> Context:
        b, dtype = prompt.tokens.shape[0], self.llm_dtype
        ones = lambda n: torch.ones(b, n, dtype=torch.long, device=self.device)
        parts = [self.embed_ids(self.template.prefix_ids, b), prompt.tokens.to(dtype)]
        masks = [ones(len(self.template.prefix_ids)), ones(prompt.tokens.shape[1])]
        if visual is not None:
            parts.append(visual.to(dtype))
            masks.append(visual_mask.long())
        if self.template.middle_ids is None:
            parts.append(self.embed_ids(self.template.suffix_ids, b))
            masks.append(ones(len(self.template.suffix_ids)))
            embeds, mask = torch.cat(parts, dim=1), torch.cat(masks, dim=1)
        else:
            embeds, mask = self._with_words(
                torch.cat(parts, dim=1), torch.cat(masks, dim=1), findings
            )
        return Context(embeds, mask, prompt, global_feature, findings)

    def _with_words(
        self, embeds: torch.Tensor, mask: torch.Tensor, findings: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append each row's [middle][findings words][suffix], left-padding the shorter rows."""
        rows = []
        for y in findings.tolist():
            words = self.tokenizer(findings_words(named_findings(y)), add_special_tokens=False)[
                "input_ids"
            ]
            rows.append(self.template.middle_ids + words + self.template.suffix_ids)
        width = max(len(r) for r in rows)
        tails, tail_masks = [], []
        for row in rows:
            pad = width - len(row)
            tails.append(F.pad(self.embed_ids(row, 1)[0], (0, 0, pad, 0)))
            tail_masks.append(F.pad(torch.ones(len(row), dtype=torch.long), (pad, 0)))
        tail_mask = torch.stack(tail_masks).to(self.device)
        # left padding of the whole row: move each row's tail padding to its front
        full = torch.cat([embeds, torch.stack(tails).to(embeds.dtype)], dim=1)
        full_mask = torch.cat([mask, tail_mask], dim=1)
        order = torch.argsort(full_mask.ne(0).long(), dim=1, stable=True)  # padding first
        return full.gather(1, order.unsqueeze(-1).expand_as(full)), full_mask.gather(1, order)

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

    # ----------------------------------------------------------------- decoding

    @torch.inference_mode()
    def generate(
        self,
        views: Views | None,
        decoding: Decoding = DEFAULT_DECODING,
        findings: torch.Tensor | None = None,
    ) -> list[str]:
        """Batched decoding with ``transformers`` ``generate`` (greedy, beam or sampling).

        ``views=None`` writes from the findings alone, as the report-language stage trained
        (no image, ``text_context``): what the language stage's fidelity is measured on."""
        decoding.validate()
        if views is None:
            ctx = self.text_context(len(findings), findings)
        else:
            ctx = self.context(views, findings)
        return self.generate_from(ctx, decoding)

    @torch.inference_mode()
    def generate_from(self, ctx: Context, decoding: Decoding = DEFAULT_DECODING) -> list[str]:
        """The frozen LLM's reports after the context ``ctx`` (``generate``'s second half; also
        how a baseline with a context of its own writes through the same processors)."""
        decoding.validate()
        kwargs = {
            "inputs_embeds": ctx.embeds,
            "attention_mask": ctx.attention_mask,
            "position_ids": positions_from_mask(ctx.attention_mask),
            "max_new_tokens": decoding.max_new_tokens,
            "logits_processor": self.processors(decoding, ctx.findings),
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

    def leads(self, named: list[list[str]]) -> list[list[int]]:
        """Per study, the token ids of its named findings' sentences (" Cardiomegaly. Pleural
        effusion."; none where it names none)."""
        leads = []
        for findings in named:
            text = findings_sentences(findings)
            leads.append(
                self.tokenizer(f" {text}", add_special_tokens=False)["input_ids"] if text else []
            )
        return leads

    def processors(
        self, decoding: Decoding, findings: torch.Tensor | None = None
    ) -> LogitsProcessorList:
        """Penalty and n-gram ban on the body, warpers, then the report structure (last, so
        that a forced header wins over everything before it). With ``lead_with_findings``,
        the sentences of the findings y names are forced after the findings header and make
        the impression; with ``closed_vocabulary``, only words of ``report_vocabulary`` are
        written, and after such a lead no word that names one of its findings again."""
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
        named = [named_findings(y) for y in findings.tolist()] if findings is not None else None
        leads = self.leads(named) if decoding.lead_with_findings and named is not None else None
        if decoding.closed_vocabulary and self.report_vocabulary:
            stated = [naming_words(n) for n in named] if leads else None
            processors.append(ClosedVocabulary(structure, self.report_vocabulary, stated))
        processors.append(ReportStructureProcessor(structure, decoding.max_new_tokens, leads=leads))
        return processors

    @torch.inference_mode()
    def stream_ids(
        self,
        views: Views,
        decoding: Decoding = DEFAULT_DECODING,
        findings: torch.Tensor | None = None,
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
        ctx = self.context(views, findings)
        processors = self.processors(decoding, ctx.findings)
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
        findings: torch.Tensor | None = None,
    ) -> Iterator[str]:
        """Yield text increments; their concatenation is the decoded report."""
        yield from text_increments(self.tokenizer, self.stream_ids(views, decoding, findings))

    @torch.inference_mode()
    def decoding_request(
        self,
        views: Views,
        decoding: Decoding = DEFAULT_DECODING,
        findings: torch.Tensor | None = None,
    ) -> Request:
        """One study's context and processors, for the continuous batcher (``mrg.batching``)."""
        decoding.validate()
        if decoding.strategy == "beam":
            raise ValueError("beam search is not streamable; use generate()")
        if views.batch_size != 1:
            raise ValueError("a decoding request holds one study")
        ctx = self.context(views, findings)
        return Request(
            ctx.embeds,
            ctx.attention_mask,
            self.processors(decoding, ctx.findings),
            decoding.max_new_tokens,
            self.template.eos_id,
            sample=decoding.strategy == "sample",
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

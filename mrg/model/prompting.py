"""The model's context: the chat prompt's token ids around the image, and their assembly.

``PromptTemplate`` holds the ids before the customized prompt (``prefix``), between the
visual tokens and the findings words (``middle``) and after them (``suffix``);
``ContextAssembly`` (mixed into ``MRGModel``) builds ``Context`` from them, the customized
prompt and the visual tokens: the ``inputs_embeds`` and attention mask the LLM receives.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from mrg.data.views import Views
from mrg.model.customizer import CustomizedPrompt
from mrg.text.states import states_of_vector, states_words
from mrg.text.taxonomy import findings_words, named_findings

IMAGE_PLACEHOLDER = "<image>"
FINDINGS_PLACEHOLDER = "<findings>"


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
    findings: torch.Tensor | None = None  # [B, 15] y or [B, 43] s (None: not conditioned)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """``cumsum(mask) − 1`` with masked positions at 0: the rule ``generate`` applies."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


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


class ContextAssembly:
    """The input half of ``MRGModel``: [prefix][P'(v, y)][visual tokens]([findings words])
    [suffix] as embeddings. Reads the model's ``encoder``, ``projection``, ``customizer``,
    ``llm``, ``tokenizer``, ``template`` and ``config``."""

    def embed_ids(self, ids: list[int] | torch.Tensor, batch: int) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        return self.llm.get_input_embeddings()(ids).unsqueeze(0).expand(batch, -1, -1)

    def _condition(self, findings: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """The condition on this device, checked: ``[B, 15]`` findings or ``[B, 43]`` states,
        as the config says (None where it uses neither)."""
        width = self.config.condition_width
        if not width:
            return None
        if findings is None:
            raise ValueError(
                f"this model writes the report from findings: pass the condition [B, {width}]"
            )
        findings = torch.as_tensor(findings, dtype=torch.float32, device=self.device)
        if findings.shape != (batch, width):
            raise ValueError(f"findings must be [{batch}, {width}], got {tuple(findings.shape)}")
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
            text = (
                states_words(states_of_vector(y))
                if self.config.findings_prompt == "states"
                else findings_words(named_findings(y))
            )
            words = self.tokenizer(text, add_special_tokens=False)["input_ids"]
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

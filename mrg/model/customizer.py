"""Instance-level prompt customizers.

A customizer turns the image's global visual feature ``v ∈ R^{d_v}`` into ``L`` soft
prompt tokens ``P'(v) ∈ R^{L×D}`` in the LLM's embedding space.

* ``static``          P' = P                                  (R2GenGPT-like baseline)
* ``prompt-wise``     P' = γ(c) ⊙ P + β(c)
* ``promptbook-wise`` P' = Σ_k w_k(c) · (γ_k(c) ⊙ P_k + β_k(c)),
                      w(c) = softmax(q(c) · K^T / (τ·√d_k))   (optionally top-k, renormalised)

The condition ``c`` is ``v`` alone (``conditioning: visual``, the paper's form), ``v`` with
the findings vector ``y ∈ [0, 1]^15`` (``visual+findings``: the 14 ChestX-ray14 decisions
and "normal") or ``v`` with the states ``s ∈ {0, 1}^43`` (``visual+states``: present,
possible and absent per finding, and "normal"; ``mrg.text.states``), which enters the MLP's
hidden layer and the book's query beside ``v``: h = GELU(W_v LN(v) + W_y y + b).

γ and β are conditional affine (FiLM) transforms, one scale and one shift per embedding
channel, computed from ``c`` by a small MLP whose last layers are zero-initialised so that
γ = 1 and β = 0 at initialisation. The book's pages start as copies of one prompt, so every
mode starts from its *plain prompt* ``P`` whatever the image: P'(v) = P at initialisation.

The report-language stage trains only ``plain_prompt()`` (no image, affine heads left at
identity); ``set_plain_prompt`` hands a prompt trained that way to a model of any mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mrg.config import CustomizerConfig
from mrg.text.states import STATE_WIDTH
from mrg.text.taxonomy import FINDINGS14


@dataclass
class CustomizedPrompt:
    """Prompt tokens ``[B, L, D]`` and, for the promptbook, selection weights ``[B, K]``."""

    tokens: torch.Tensor
    selection: torch.Tensor | None = None


def usage_entropy(selection: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the batch-mean selection distribution; log(K) is uniform use, 0 collapse."""
    usage = selection.mean(dim=0)
    return -(usage * usage.clamp_min(1e-12).log()).sum()


class Condition(nn.Module):
    """(v, y) ↦ W_v LN(v) + b (+ W_y y where the findings condition): a ``[B, out]`` code."""

    def __init__(self, visual_dim: int, out_dim: int, findings_dim: int = 0):
        super().__init__()
        self.visual = nn.Sequential(nn.LayerNorm(visual_dim), nn.Linear(visual_dim, out_dim))
        self.findings = nn.Linear(findings_dim, out_dim, bias=False) if findings_dim else None

    def forward(self, visual: torch.Tensor, findings: torch.Tensor | None = None) -> torch.Tensor:
        code = self.visual(visual)
        if self.findings is None:
            return code
        if findings is None:
            raise ValueError("this customizer is conditioned on findings: pass the findings vector")
        return code + self.findings(findings.to(code.dtype))


class ConditionalAffine(nn.Module):
    """(v[, y]) ↦ (γ, β) with γ = 1 + Δγ, both ``[B, n, D]``; Δγ = β = 0 at initialisation."""

    def __init__(
        self, visual_dim: int, hidden_dim: int, embed_dim: int, n: int = 1, findings_dim: int = 0
    ):
        super().__init__()
        self.n, self.embed_dim = n, embed_dim
        self.trunk = Condition(visual_dim, hidden_dim, findings_dim)
        self.to_gamma = nn.Linear(hidden_dim, n * embed_dim)
        self.to_beta = nn.Linear(hidden_dim, n * embed_dim)
        for layer in (self.to_gamma, self.to_beta):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self, visual: torch.Tensor, findings: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.gelu(self.trunk(visual, findings))
        shape = (visual.shape[0], self.n, self.embed_dim)
        return 1.0 + self.to_gamma(h).view(shape), self.to_beta(h).view(shape)


class SinglePrompt(nn.Module):
    """One learned prompt ``P`` ``[L, D]``: the plain prompt of the static and prompt-wise modes."""

    def __init__(self, config: CustomizerConfig, embed_dim: int, init_std: float):
        super().__init__()
        self.prompt = nn.Parameter(torch.randn(config.prompt_length, embed_dim) * init_std)

    def plain_prompt(self) -> torch.Tensor:
        return self.prompt

    def prompt_parameters(self) -> list[nn.Parameter]:
        return [self.prompt]

    @torch.no_grad()
    def set_plain_prompt(self, prompt: torch.Tensor) -> None:
        self.prompt.copy_(prompt)

    def no_weight_decay(self) -> set[str]:
        """Learned embeddings are not shrunk towards zero (timm's ``no_weight_decay`` contract)."""
        return {"prompt"}


class StaticPrompt(SinglePrompt):
    """P' = P: one learned prompt shared by every image."""

    def __init__(self, config: CustomizerConfig, visual_dim: int, embed_dim: int, init_std: float):
        super().__init__(config, embed_dim, init_std)

    def forward(
        self, visual: torch.Tensor, findings: torch.Tensor | None = None
    ) -> CustomizedPrompt:
        return CustomizedPrompt(self.prompt.unsqueeze(0).expand(visual.shape[0], -1, -1))


class PromptWise(SinglePrompt):
    """P' = γ(c) ⊙ P + β(c), γ and β broadcast over the L prompt tokens."""

    def __init__(self, config: CustomizerConfig, visual_dim: int, embed_dim: int, init_std: float):
        super().__init__(config, embed_dim, init_std)
        self.affine = ConditionalAffine(
            visual_dim, config.hidden_dim, embed_dim, findings_dim=findings_dim(config)
        )

    def forward(
        self, visual: torch.Tensor, findings: torch.Tensor | None = None
    ) -> CustomizedPrompt:
        gamma, beta = self.affine(visual, findings)  # [B, 1, D]
        return CustomizedPrompt(gamma * self.prompt.unsqueeze(0) + beta)


class PromptBook(nn.Module):
    """P' = Σ_k w_k(c) (γ_k(c) ⊙ P_k + β_k(c)) over a book of K learned prompts.

    The pages start equal (P_k = P), so P' = P at initialisation whatever w(v); they
    specialise through their selection-weighted gradients and their own affine heads.
    """

    def __init__(self, config: CustomizerConfig, visual_dim: int, embed_dim: int, init_std: float):
        super().__init__()
        k, key_dim = config.book_size, config.hidden_dim
        self.top_k, self.temperature = config.top_k, config.temperature
        page = torch.randn(config.prompt_length, embed_dim) * init_std
        self.book = nn.Parameter(page.repeat(k, 1, 1))
        self.keys = nn.Parameter(torch.randn(k, key_dim) / math.sqrt(key_dim))
        self.query = Condition(visual_dim, key_dim, findings_dim(config))
        self.affine = ConditionalAffine(
            visual_dim, config.hidden_dim, embed_dim, n=k, findings_dim=findings_dim(config)
        )

    def plain_prompt(self) -> torch.Tensor:
        """The book's mean page: P while the pages are equal (the language stage keeps them so,
        since every page receives the same gradient through the mean)."""
        return self.book.mean(dim=0)

    def prompt_parameters(self) -> list[nn.Parameter]:
        return [self.book]

    @torch.no_grad()
    def set_plain_prompt(self, prompt: torch.Tensor) -> None:
        self.book.copy_(prompt.expand_as(self.book))

    def no_weight_decay(self) -> set[str]:
        return {"book", "keys"}

    def selection(self, visual: torch.Tensor, findings: torch.Tensor | None = None) -> torch.Tensor:
        """w(c) ``[B, K]``: rows sum to one; with top-k, all but k entries are exactly zero."""
        query = self.query(visual, findings)
        logits = query @ self.keys.t() / (self.temperature * math.sqrt(self.keys.shape[1]))
        if self.top_k:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return F.softmax(logits, dim=-1)

    def forward(
        self, visual: torch.Tensor, findings: torch.Tensor | None = None
    ) -> CustomizedPrompt:
        weights = self.selection(visual, findings)  # [B, K]
        gamma, beta = self.affine(visual, findings)  # [B, K, D]
        modulated = gamma.unsqueeze(2) * self.book.unsqueeze(0) + beta.unsqueeze(2)  # [B, K, L, D]
        return CustomizedPrompt(torch.einsum("bk,bkld->bld", weights, modulated), weights)


def findings_dim(config: CustomizerConfig) -> int:
    """Width of the condition the affine heads see: 43 (the states, ``mrg.text.states``), 15
    (14 findings + normal), or 0."""
    if config.conditioning == "visual+states":
        return STATE_WIDTH
    return len(FINDINGS14) + 1 if config.uses_findings else 0


CUSTOMIZERS: dict[str, type[nn.Module]] = {
    "static": StaticPrompt,
    "prompt-wise": PromptWise,
    "promptbook-wise": PromptBook,
}


def build_customizer(
    config: CustomizerConfig, visual_dim: int, embed_dim: int, init_std: float
) -> nn.Module:
    config.validate()
    return CUSTOMIZERS[config.mode](config, visual_dim, embed_dim, init_std)

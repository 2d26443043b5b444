"""Alignment: symmetric InfoNCE between image and report embeddings.

    z_i = norm(W_img v_i),   t_j = norm(W_txt r_j),   s_ij = exp(τ) · z_i · t_j
    L = ½ [CE(s, T) + CE(sᵀ, T)],   T = S / rowsum(S)

``v`` is the encoder's global feature, ``r`` the frozen LLM's mean last hidden state over a
report's tokens (``ReportEmbeddingCache``; it never changes, so it is computed once per
report text and LLM). τ is learnable, initialised to log(1/0.07) as in CLIP.

``S`` is the identity (CLIP), or a label similarity of the reports as in MedCLIP's semantic
matching loss (``label_similarity``): many reports in a chest X-ray batch say the same thing
("no acute cardiopulmonary abnormality"), and the identity would push an image away from
reports that describe it as well as its own does.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mrg.text.cleaning import split_sentences
from mrg.text.labeler import ReportLabeler
from mrg.text.states import FindingStates, named, state_vector, states_from_statuses
from mrg.text.taxonomy import FINDINGS14, findings_vector

log = logging.getLogger(__name__)


class ContrastiveHeads(nn.Module):
    """Projections of image and report features into a shared space, and the temperature."""

    def __init__(self, visual_dim: int, text_dim: int, dim: int):
        super().__init__()
        self.image = nn.Sequential(nn.LayerNorm(visual_dim), nn.Linear(visual_dim, dim))
        self.text = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def no_weight_decay(self) -> set[str]:
        """Decay would pull the temperature towards exp(0) = 1, i.e. towards uniform logits."""
        return {"logit_scale"}

    def logits(self, visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``[B, B]`` image-to-report similarity logits."""
        z_image = F.normalize(self.image(visual), dim=-1)
        z_text = F.normalize(self.text(text.to(visual.dtype)), dim=-1)
        return self.logit_scale.clamp(max=math.log(100)).exp() * z_image @ z_text.t()

    @staticmethod
    def loss(logits: torch.Tensor, similarity: torch.Tensor | None = None) -> torch.Tensor:
        """Symmetric InfoNCE of ``[B, B]`` logits; targets T = S / rowsum(S) in both directions
        for a symmetric report similarity ``S`` with S_ii = 1 (default: identity)."""
        if similarity is None:
            similarity = torch.eye(logits.shape[0])
        similarity = similarity.to(logits.device, logits.dtype)
        targets = similarity / similarity.sum(dim=1, keepdim=True)
        return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))

    def forward(
        self, visual: torch.Tensor, text: torch.Tensor, similarity: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.loss(self.logits(visual, text), similarity)


def label_similarity(label_sets: Sequence[frozenset[str]]) -> torch.Tensor:
    """Jaccard similarity of the reports' label sets, S_ij = |L_i ∩ L_j| / |L_i ∪ L_j|.

    "normal" is the label of a report without findings, so S_ii = 1 and two normal reports
    are full positives; S is the identity when no two reports share a label.
    """
    n = len(label_sets)
    similarity = torch.zeros(n, n)
    for i, a in enumerate(label_sets):
        for j, b in enumerate(label_sets):
            similarity[i, j] = len(a & b) / len(a | b)
    return similarity


def retrieval_accuracy(logits: torch.Tensor, similarity: torch.Tensor | None = None) -> float:
    """Fraction of images whose most similar report is a full positive (S = 1): its own,
    or one with the same labels when ``similarity`` comes from ``label_similarity``."""
    if similarity is None:
        similarity = torch.eye(logits.shape[0])
    retrieved = similarity.to(logits.device).gather(1, logits.argmax(dim=1, keepdim=True))
    return (retrieved == 1).float().mean().item()


def retrieval_chance(similarity: torch.Tensor) -> float:
    """``retrieval_accuracy`` of a random ranking: the mean fraction of full positives per row."""
    return (similarity == 1).float().mean().item()


class ReportLabels:
    """The labeler's ChestX-ray14 label set of a report ("normal" when none), cached by text."""

    def __init__(self, labeler: ReportLabeler | None = None):
        self.labeler = labeler or ReportLabeler()
        self.table: dict[str, frozenset[str]] = {}
        self.state_table: dict[str, FindingStates] = {}

    def __call__(self, texts: Sequence[str]) -> list[frozenset[str]]:
        for text in texts:
            if text not in self.table:
                labels = self.labeler.label14(text)
                self.table[text] = frozenset(f for f in FINDINGS14 if labels[f]) or frozenset(
                    {"normal"}
                )
        return [self.table[t] for t in texts]

    def finding_spans(self, text: str, any_state: bool = False) -> list[tuple[int, int]]:
        """Character spans of the sentences of ``text`` that name a finding positively (or,
        with ``any_state``, that state one: present, possible or absent)."""
        spans, position = [], 0
        for sentence in split_sentences(text):
            start = text.find(sentence, position)
            if start < 0:
                continue
            position = start + len(sentence)
            if any_state:
                stated = any(self.labeler.statuses14(sentence).values())
            else:
                stated = any(self.labeler.label14(sentence)[f] for f in FINDINGS14)
            if stated:
                spans.append((start, position))
        return spans

    def without(self, text: str, findings: Sequence[str]) -> str:
        """``text`` less its sentences that state any of ``findings`` present or possible
        (the labeler's positive or uncertain mentions)."""
        kept = [
            sentence
            for sentence in split_sentences(text)
            if not set(named(states_from_statuses(self.labeler.statuses14(sentence))))
            & set(findings)
        ]
        return " ".join(kept)

    def states(self, texts: Sequence[str]) -> list[FindingStates]:
        """The labeler's states of each text (positive → present, uncertain → possible,
        negative → absent), cached by text."""
        for text in texts:
            if text not in self.state_table:
                self.state_table[text] = states_from_statuses(self.labeler.statuses14(text))
        return [self.state_table[t] for t in texts]

    def state_vectors(self, texts: Sequence[str]) -> torch.Tensor:
        """The states condition s ``[B, 43]`` of each text (``state_vector``)."""
        return torch.tensor([state_vector(s) for s in self.states(texts)], dtype=torch.float32)

    def vectors(self, texts: Sequence[str]) -> torch.Tensor:
        """The findings condition y ``[B, 15]`` of each text (``findings_vector``)."""
        return torch.tensor(
            [findings_vector(labels - {"normal"}) for labels in self(texts)], dtype=torch.float32
        )


class ReportEmbeddingCache:
    """Frozen-LLM report embeddings keyed by (LLM name, text); optionally persisted to a file."""

    def __init__(
        self, llm, tokenizer, llm_key: str, path: str | Path | None = None, max_tokens: int = 128
    ):
        self.llm, self.tokenizer, self.llm_key, self.max_tokens = (
            llm,
            tokenizer,
            llm_key,
            max_tokens,
        )
        self.path = Path(path) if path else None
        self.table: dict[str, torch.Tensor] = {}
        if self.path and self.path.is_file():
            self.table = torch.load(self.path, weights_only=True)
        self.computed = 0

    def key(self, text: str) -> str:
        return hashlib.sha1(f"{self.llm_key}\0{text}".encode()).hexdigest()

    @torch.inference_mode()
    def _embed(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer(
            texts,
            return_tensors="pt",
            padding=True,
            padding_side="right",
            truncation=True,
            max_length=self.max_tokens,
            add_special_tokens=False,
        ).to(self.llm.device)
        hidden = self.llm(**enc, output_hidden_states=True).hidden_states[-1].float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        return ((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)).cpu()

    def fill(self, texts: Sequence[str], batch_size: int = 16) -> None:
        """Compute the embeddings of texts not cached yet (with a progress bar), then persist."""
        missing = sorted({t for t in texts if self.key(t) not in self.table})
        for start in tqdm(
            range(0, len(missing), batch_size), desc="report embeddings", disable=not missing
        ):
            chunk = missing[start : start + batch_size]
            for text, vector in zip(chunk, self._embed(chunk)):
                self.table[self.key(text)] = vector
            self.computed += len(chunk)
        if missing and self.path:  # atomically: DDP ranks write the same table at once
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            torch.save(self.table, tmp)
            tmp.replace(self.path)

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        self.fill(texts)
        return torch.stack([self.table[self.key(t)] for t in texts])

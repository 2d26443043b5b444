"""What each training stage computes, trains, reads and is scored by.

``TrainingModule`` wraps the model with the contrastive heads: ``forward(batch, stage)`` gives
the stage's loss (language: report text alone; align: image ↔ report contrast; generate:
report loss; joint: both), ``stage_parameters``/``stage_groups`` what the stage trains;
``fitting_texts`` and ``language_sampler`` the report texts the language stage reads;
``validate`` the stage's validation record and its ``score`` to maximise.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
from timm.optim import param_groups_weight_decay
from torch import nn
from torch.utils.data import DataLoader, WeightedRandomSampler
from transformers import PreTrainedTokenizerBase
from transformers.trainer_pt_utils import LengthGroupedSampler

from mrg.config import ConfigError
from mrg.data.datasets import Batch
from mrg.model import Decoding, MRGModel
from mrg.model.findings import FindingsHead
from mrg.text.sections import format_report, split_sections
from mrg.text.states import lead_sentences, named
from mrg.train.config import TrainConfig
from mrg.train.losses import (
    ContrastiveHeads,
    ReportEmbeddingCache,
    ReportLabels,
    label_similarity,
    retrieval_accuracy,
    retrieval_chance,
)

log = logging.getLogger(__name__)
STAGES = ("language", "align", "generate", "joint")


class TrainingModule(nn.Module):
    """What DDP wraps: the MRG model, the contrastive heads, and the per-stage loss.

    ``report_labels`` (texts → label sets) makes the alignment targets label-aware
    (``label_similarity``); None keeps CLIP's identity targets.
    """

    def __init__(
        self,
        model: MRGModel,
        heads: ContrastiveHeads,
        embeddings: ReportEmbeddingCache,
        joint_lambda: float,
        report_labels: ReportLabels | None = None,
        finding_weight: float = 1.0,
        freeze_prompt: bool = False,
        findings_head: FindingsHead | None = None,
    ):
        """``finding_weight``: the language stage's loss weight on sentences naming a finding;
        ``freeze_prompt``: the image stages do not train the prompts; ``findings_head``
        (frozen): the image stages' y are its decisions, not the reports' labels."""
        super().__init__()
        self.findings_head = findings_head.eval().requires_grad_(False) if findings_head else None
        self.finding_weight, self.freeze_prompt = finding_weight, freeze_prompt
        self.model, self.heads = model, heads
        self.embeddings, self.joint_lambda = embeddings, joint_lambda
        self.report_labels = report_labels
        self.condition_labels = ReportLabels() if model.config.uses_findings else None
        self.span_labels = ReportLabels()

    def findings(self, reports: list[str]) -> torch.Tensor | None:
        """The condition of each report: its labeler states s (a states model) or labels y
        (PromptMRG trains on the true states too), or None for a model that is not
        conditioned on findings."""
        if self.condition_labels is None:
            return None
        if self.model.config.uses_states:
            return self.condition_labels.state_vectors(reports)
        return self.condition_labels.vectors(reports)

    def targets(self, reports: list[str]) -> list[str]:
        """The reports as a states model's decoding lets it write them: the sentences decoding
        forces (one per present or possible finding, ``lead_sentences``) open the findings and
        make the impression, and the report's own sentences stating those findings again are
        left out (decoding never names a lead's finding again), so that the LLM learns to go on
        after the lead with the rest of the report; other models' targets are the reports."""
        if not self.model.config.uses_states:
            return list(reports)
        out = []
        for report, states in zip(reports, self.condition_labels.states(reports)):
            sections, lead = split_sections(report), lead_sentences(states)
            if not lead:
                out.append(format_report(sections.findings, sections.impression))
                continue
            rest = self.span_labels.without(sections.findings, named(states))
            out.append(format_report(f"{lead} {rest}".strip(), lead))
        return out

    def image_findings(self, batch: Batch) -> torch.Tensor | None:
        """The image stages' condition: the paired reports' states for a states model (true
        states, as PromptMRG trains), else the findings head's decisions on the images where
        there is a head, else the paired reports' labels (``findings``)."""
        uses_states = self.model.config.uses_states
        if self.condition_labels is None or self.findings_head is None or uses_states:
            return self.findings(batch.reports)
        decisions = self.findings_head.predict(batch.views.to(self.model.device))[1]
        return decisions.clone()  # out of inference mode: y enters the trained affine heads

    def similarity(self, reports: list[str]) -> torch.Tensor:
        """The report similarity S of the alignment targets (identity without labels)."""
        if self.report_labels is None:
            return torch.eye(len(reports))
        return label_similarity(self.report_labels(reports))

    def forward(self, batch: Batch | list[str], stage: str) -> dict[str, torch.Tensor]:
        if stage == "language":  # batch: report texts, no image
            weights, targets = None, self.targets(batch)
            if self.finding_weight != 1.0 and self.training:  # validation: plain nats/token
                spans = [
                    self.span_labels.finding_spans(t, self.model.config.uses_states)
                    for t in targets
                ]
                weights = self.model.token_weights(targets, spans, self.finding_weight)
            loss = self.model.language_loss(targets, self.findings(batch), weights)
            return {"loss": loss, "lm_loss": loss.detach()}
        if stage == "align":
            features = self.model.encoder(batch.views.to(self.model.device))
            text = self.embeddings(batch.reports).to(self.model.device)
            logits = self.heads.logits(features.global_, text)
            similarity = self.similarity(batch.reports)
            loss = self.heads.loss(logits, similarity)
            return {
                "loss": loss,
                "align_loss": loss.detach(),
                "logits": logits.detach(),
                "similarity": similarity,
            }
        out = self.model(batch.views, self.targets(batch.reports), self.image_findings(batch))
        if stage == "generate":
            return {"loss": out.loss, "lm_loss": out.loss.detach()}
        text = self.embeddings(batch.reports).to(self.model.device)
        align = self.heads(out.global_feature, text, self.similarity(batch.reports))
        return {
            "loss": out.loss + self.joint_lambda * align,
            "lm_loss": out.loss.detach(),
            "align_loss": align.detach(),
        }

    def stage_parameters(self, stage: str) -> list[nn.Parameter]:
        return [p for group in self.stage_groups(stage) for p in group["params"]]

    def stage_groups(
        self, stage: str, encoder_lr_scale: float = 1.0, weight_decay: float = 0.0
    ) -> list[dict]:
        """Optimizer parameter groups of ``stage``, each with ``weight_decay`` and ``lr_scale``.

        Biases, norms, the temperature, the prompts, the book and its keys, and position
        embeddings take no weight decay (each part names its own, timm's rule). The encoder's
        learning rate is scaled by ``encoder_lr_scale`` in the report-writing stages
        (alignment trains it at full rate). The language stage trains the plain prompt only.
        """
        customizer = self.model.customizer
        if stage == "language" and self.model.config.customizer.uses_findings:
            # the prompts and the heads' findings code; the visual code sees v = 0 here
            prompts = {id(p) for p in customizer.prompt_parameters()}
            rest = [
                p
                for n, p in customizer.named_parameters()
                if id(p) not in prompts and ".visual." not in f".{n}" and p.requires_grad
            ]
            return [
                {"params": customizer.prompt_parameters(), "weight_decay": 0.0, "lr_scale": 1.0},
                {"params": rest, "weight_decay": 0.0, "lr_scale": 1.0},
            ]
        if stage == "language":
            return [
                {"params": customizer.prompt_parameters(), "weight_decay": 0.0, "lr_scale": 1.0}
            ]
        others = {
            "align": [self.heads],
            "generate": [self.model.projection, customizer],
            "joint": [self.model.projection, customizer, self.heads],
        }[stage]
        scale = 1.0 if stage == "align" else encoder_lr_scale
        parts = [(self.model.encoder, scale)] + [(part, 1.0) for part in others]
        frozen = {id(p) for p in customizer.prompt_parameters()} if self.freeze_prompt else set()
        groups = []
        for part, lr_scale in parts:
            skip = part.no_weight_decay() if hasattr(part, "no_weight_decay") else ()
            for group in param_groups_weight_decay(part, weight_decay, no_weight_decay_list=skip):
                params = [p for p in group["params"] if id(p) not in frozen]
                groups.append({**group, "params": params, "lr_scale": lr_scale})
        return groups


def fitting_texts(
    tokenizer: PreTrainedTokenizerBase, limit: int, texts: Sequence[str]
) -> list[str]:
    """The texts whose tokens fit ``limit`` (``max_report_tokens``): a cut-off report would
    teach the model to stop mid-sentence."""
    tokens = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
    kept = [t for t, ids in zip(texts, tokens) if len(ids) <= limit]
    if len(kept) < len(texts):
        log.info(
            "language stage: %d of %d reports exceed %d tokens, left out",
            len(texts) - len(kept),
            len(texts),
            limit,
        )
    return kept


def language_sampler(
    texts: list[str], batch_size: int, abnormal_share: float, generator: torch.Generator
):
    """Similar lengths together (less padding); or, with ``abnormal_share``, reports that
    name a finding drawn at that share, so a findings-conditioned prompt sees the condition
    change often (about 1 in 7 OpenI reports names one)."""
    if not abnormal_share:
        lengths = [len(t.split()) for t in texts]
        return LengthGroupedSampler(batch_size, lengths=lengths, generator=generator)
    abnormal = [labels != {"normal"} for labels in ReportLabels()(texts)]
    n_abnormal = sum(abnormal)
    if not 0 < n_abnormal < len(texts):
        raise ConfigError("language_abnormal_share needs both normal and abnormal reports")
    weights = [
        abnormal_share / n_abnormal if a else (1 - abnormal_share) / (len(texts) - n_abnormal)
        for a in abnormal
    ]
    return WeightedRandomSampler(weights, len(texts), replacement=True, generator=generator)


@torch.no_grad()
def validate(module: TrainingModule, stage: str, loader: DataLoader, config: TrainConfig) -> dict:
    """Validation loss (and retrieval accuracy, or BLEU-4/CIDEr/CE micro-F1) → ``score`` to maximise."""
    if stage == "language":  # held-out report texts: loss in nats per report token
        module.eval()
        losses = [module(texts, stage)["loss"].item() for texts in loader]
        loss = float(np.mean(losses)) if losses else float("nan")
        return {"val_loss": loss, "score": -loss if losses else -math.inf}
    if len(loader.dataset) == 0:  # no validation data: the caller falls back to the training loss
        return {"score": -math.inf}
    module.eval()
    losses, accuracies, chances, references, hypotheses = [], [], [], [], []
    remaining = config.val_max_studies
    for batch in loader:
        if batch is None:
            continue
        out = module(batch, stage)
        losses.append(out["loss"].item())
        if stage == "align":
            accuracies.append(retrieval_accuracy(out["logits"], out["similarity"]))
            chances.append(retrieval_chance(out["similarity"]))
        elif remaining > 0:
            take = min(remaining, len(batch.reports))
            decoding = Decoding(max_new_tokens=config.val_max_new_tokens)
            findings = module.image_findings(batch)
            findings = findings[:take] if findings is not None else None
            hypotheses += module.model.generate(batch.views[:take], decoding, findings)
            references += batch.reports[:take]
            remaining -= take
    record = {"val_loss": float(np.mean(losses))}
    if stage == "align":
        record["val_retrieval_acc"] = float(np.mean(accuracies))
        record["val_retrieval_chance"] = float(np.mean(chances))
        record["score"] = -record["val_loss"]
        return record
    from mrg.evaluation.metrics import clinical_efficacy, nlg_scores

    scores = nlg_scores(references, hypotheses, meteor=False)
    ce = clinical_efficacy(references, hypotheses)["chexpert14"].micro.f1
    record.update(val_bleu4=scores.corpus["BLEU_4"], val_cider=scores.corpus["CIDEr"], val_ce_f1=ce)
    # Wording (BLEU-4, CIDEr) and findings (CE) count alike: a model that writes one fluent
    # normal report for every image scores well on wording alone.
    record["score"] = (scores.corpus["BLEU_4"] + scores.corpus["CIDEr"] + ce) / 3
    record["val_example"] = hypotheses[0] if hypotheses else ""
    return record

"""Multi-stage training with Hugging Face ``accelerate``: language → alignment → generation → joint.

The report-language stage trains the plain prompt alone on report text with no image (the
frozen LLM learns the language of reports through its input prefix); alignment trains the
encoder contrastively; generation and joint train encoder, projection and customizer.

The same code runs on a CPU, one GPU and several: ``torchrun --nproc_per_node N -m mrg.cli
train …`` (or ``accelerate launch``) gives DDP, over NCCL on GPUs and gloo on CPUs; rank 0
alone writes checkpoints and logs, and at the end every rank checks that its trainable
weights equal rank 0's (``ranks_in_sync`` in the log). Per stage: AdamW over that stage's trainable parameters, cosine schedule with warm-up,
gradient accumulation and clipping. After every epoch: validation, ``<out>/last`` (model +
full training state, so a killed run resumes where it stopped) and, when it improves,
``<out>/best`` ((BLEU-4 + CIDEr + CE-14 micro-F1)/3, or −loss for the alignment stage or
when no metric can be computed). Each epoch's record holds the peak memory so far (CUDA
allocator where present, else the process's peak RSS). A JSON line per logged step and epoch goes to
``<out>/log.jsonl``; TensorBoard too when it is installed.
"""

from __future__ import annotations

import json
import logging
import math
import random
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from timm.optim import param_groups_weight_decay
from torch import nn
from torch.utils.data import DataLoader, WeightedRandomSampler
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup
from transformers.trainer_pt_utils import LengthGroupedSampler

from mrg.config import ConfigError
from mrg.data.datasets import Batch, Collate, StudyDataset, StudyRecord
from mrg.data.language import ReportCorpus
from mrg.model import Decoding, MRGModel
from mrg.text.vocabulary import report_vocabulary
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
STATE_NAME = "trainer_state.pt"


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
    ):
        """``finding_weight``: the language stage's loss weight on sentences naming a finding;
        ``freeze_prompt``: the image stages do not train the prompts."""
        super().__init__()
        self.finding_weight, self.freeze_prompt = finding_weight, freeze_prompt
        self.model, self.heads = model, heads
        self.embeddings, self.joint_lambda = embeddings, joint_lambda
        self.report_labels = report_labels
        self.condition_labels = ReportLabels() if model.config.uses_findings else None
        self.span_labels = ReportLabels()

    def findings(self, reports: list[str]) -> torch.Tensor | None:
        """The findings condition y of each report: its labeler labels (PromptMRG trains on the
        true states too), or None for a model that is not conditioned on findings."""
        if self.condition_labels is None:
            return None
        return self.condition_labels.vectors(reports)

    def similarity(self, reports: list[str]) -> torch.Tensor:
        """The report similarity S of the alignment targets (identity without labels)."""
        if self.report_labels is None:
            return torch.eye(len(reports))
        return label_similarity(self.report_labels(reports))

    def forward(self, batch: Batch | list[str], stage: str) -> dict[str, torch.Tensor]:
        if stage == "language":  # batch: report texts, no image
            weights = None
            if self.finding_weight != 1.0 and self.training:  # validation: plain nats/token
                spans = [self.span_labels.finding_spans(t) for t in batch]
                weights = self.model.token_weights(batch, spans, self.finding_weight)
            loss = self.model.language_loss(batch, self.findings(batch), weights)
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
        out = self.model(batch.views, batch.reports, self.findings(batch.reports))
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


@dataclass
class TrainResult:
    best_dir: Path | None = None
    last_dir: Path | None = None
    best_score: float = -math.inf
    history: list[dict] = field(default_factory=list)


def peak_memory(device: torch.device) -> dict:
    """Peak memory so far in MiB: the CUDA allocator's on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return {
            "peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20,
            "memory": "cuda",
        }
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"peak_memory_mib": rss_kib / 1024, "memory": "rss"}


class Trainer:
    """Runs the configured stages on ``model``; resumes from ``<output_dir>/last`` when asked."""

    def __init__(
        self,
        config: TrainConfig,
        model: MRGModel,
        train_records: Sequence[StudyRecord],
        val_records: Sequence[StudyRecord] = (),
        resume: bool = False,
        stop_after_epochs: int | None = None,
        language: ReportCorpus | None = None,
    ):
        """``language`` holds the report texts of the report-language stage (``report_corpus``)."""
        self.config = config.validate()
        if config.language.epochs and not (language and language.train):
            raise ConfigError(
                "language.epochs > 0 needs report texts: pass the OpenI reports "
                "(mrg train --language-reports NLMCXR_reports.tgz)"
            )
        self.output = Path(config.output_dir)
        self.output.mkdir(parents=True, exist_ok=True)
        set_seed(config.seed)
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),  # DDP over gloo when torchrun starts CPU ranks
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.grad_accum,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        self.model = model
        # the words the model may write: those its training reports use (mrg.text.vocabulary)
        model.report_vocabulary = report_vocabulary(
            [r.report for r in train_records] + list(language.train if language else [])
        )
        if config.gradient_checkpointing:
            model.enable_llm_checkpointing()
        heads = ContrastiveHeads(
            model.encoder.embed_dim, model.llm.config.hidden_size, config.align_dim
        )
        embeddings = ReportEmbeddingCache(
            model.llm,
            model.tokenizer,
            llm_key=config.model.llm.source,
            path=self.output / "report_embeddings.pt",
        )
        self.module = TrainingModule(
            model,
            heads.to(model.device),
            embeddings,
            config.joint_lambda,
            ReportLabels() if config.align_targets == "labels" else None,
            config.language_finding_weight,
            config.freeze_prompt_after_language,
        )
        self.train_set = StudyDataset(train_records, config.on_missing)
        self.val_set = StudyDataset(val_records, config.on_missing)
        image_size, views = config.model.encoder.image_size, config.model.max_views
        self.loader_generator = torch.Generator().manual_seed(config.seed)
        loader = DataLoader(
            self.train_set,
            batch_size=config.batch_size,
            shuffle=True,
            generator=self.loader_generator,
            collate_fn=Collate(image_size, views, train=True),
            num_workers=config.num_workers,
        )
        self.val_loader = DataLoader(
            self.val_set,
            batch_size=config.batch_size,
            collate_fn=Collate(image_size, views),
            num_workers=config.num_workers,
        )
        # Report texts only: the batch is a list of strings, of similar lengths (less padding).
        # Reports longer than max_report_tokens are left out rather than truncated, so that no
        # cut-off report teaches the model to stop mid-sentence.
        language_train = self._fitting(language.train if language else [])
        language_loader = DataLoader(
            language_train,
            batch_size=config.batch_size,
            sampler=self._language_sampler(language_train) if language_train else None,
            collate_fn=list,
        )
        self.language_val = DataLoader(
            self._fitting(language.val if language else []),
            batch_size=config.batch_size,
            collate_fn=list,
        )
        self.module, self.loader, self.language_loader = self.accelerator.prepare(
            self.module, loader, language_loader
        )
        self.position = {"stage": 0, "epoch": 0, "step": 0}
        self.best_score = -math.inf
        self.pending_state: dict | None = None
        self.stop_after_epochs = stop_after_epochs
        self.log_file = self.output / "log.jsonl"
        self.writer = self._tensorboard()
        if resume and (self.output / "last" / STATE_NAME).is_file():
            self._load_state(self.output / "last")
        if self.accelerator.is_main_process:
            config.save(self.output / "train_config.json")

    # ------------------------------------------------------------------ plumbing

    def _fitting(self, texts: Sequence[str]) -> list[str]:
        """The texts whose tokens fit ``max_report_tokens``."""
        limit = self.config.model.max_report_tokens
        tokens = (
            self.model.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
            if texts
            else []
        )
        kept = [t for t, ids in zip(texts, tokens) if len(ids) <= limit]
        if len(kept) < len(texts):
            log.info(
                "language stage: %d of %d reports exceed %d tokens, left out",
                len(texts) - len(kept),
                len(texts),
                limit,
            )
        return kept

    def _language_sampler(self, texts: list[str]):
        """Similar lengths together (less padding); or, with ``language_abnormal_share``, reports
        that name a finding drawn at that share, so a findings-conditioned prompt sees the
        condition change often (about 1 in 7 OpenI reports names one)."""
        share = self.config.language_abnormal_share
        if not share:
            lengths = [len(t.split()) for t in texts]
            return LengthGroupedSampler(
                self.config.batch_size, lengths=lengths, generator=self.loader_generator
            )
        abnormal = [labels != {"normal"} for labels in ReportLabels()(texts)]
        n_abnormal = sum(abnormal)
        if not 0 < n_abnormal < len(texts):
            raise ConfigError("language_abnormal_share needs both normal and abnormal reports")
        weights = [
            share / n_abnormal if a else (1 - share) / (len(texts) - n_abnormal) for a in abnormal
        ]
        return WeightedRandomSampler(
            weights, len(texts), replacement=True, generator=self.loader_generator
        )

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return (
            SummaryWriter(self.output / "tensorboard") if self.accelerator.is_main_process else None
        )

    def _log(self, record: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        with self.log_file.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self.writer.add_scalar(
                        f"{record.get('stage', '')}/{key}", value, record.get("step", 0)
                    )

    @property
    def unwrapped(self) -> TrainingModule:
        return self.accelerator.unwrap_model(self.module)

    def _rng_state(self) -> dict:
        return {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
            "loader": self.loader_generator.get_state(),
        }

    def _save_state(self, directory: Path, optimizer, scheduler) -> None:
        if not self.accelerator.is_main_process:
            return
        self.unwrapped.model.save_pretrained(directory)
        torch.save(
            {
                "position": dict(self.position),
                "best_score": self.best_score,
                "heads": self.unwrapped.heads.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": self._rng_state(),
            },
            directory / STATE_NAME,
        )

    def _load_state(self, directory: Path) -> None:
        state = torch.load(directory / STATE_NAME, weights_only=False)
        self.unwrapped.model.load_trainable(directory)
        self.unwrapped.heads.load_state_dict(state["heads"])
        self.position, self.best_score = state["position"], state["best_score"]
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        self.loader_generator.set_state(rng["loader"])
        self.pending_state = state
        log.info("resuming from %s at %s", directory, self.position)

    # ------------------------------------------------------------------ training

    def fit(self) -> TrainResult:
        result = TrainResult(best_score=self.best_score)
        if self.config.align.epochs or self.config.joint.epochs:
            reports = [r.target for r in self.train_set.records] + [
                r.target for r in self.val_set.records
            ]
            self.unwrapped.embeddings.fill(reports)
        epochs_run = 0
        for index, stage in enumerate(STAGES):
            stage_config = getattr(self.config, stage)
            if stage_config.epochs == 0 or index < self.position["stage"]:
                continue
            optimizer, scheduler = self._optimizer(stage, stage_config)
            if self.pending_state is not None and index == self.position["stage"]:
                optimizer.load_state_dict(self.pending_state["optimizer"])
                scheduler.load_state_dict(self.pending_state["scheduler"])
                self.pending_state = None
            else:
                self.position.update(stage=index, epoch=0, step=0)
                if stage == "language":  # the starting point, to compare the stage against
                    self._log({"stage": stage, "epoch": 0, **self._validate(stage)})
            while self.position["epoch"] < stage_config.epochs:
                if self.stop_after_epochs is not None and epochs_run >= self.stop_after_epochs:
                    return result
                record = self._train_epoch(stage, optimizer, scheduler)
                record.update(self._validate(stage))
                if record["score"] == -math.inf:
                    record["score"] = -record["train_loss"]
                self.position["epoch"] += 1
                # Only the image stages that write reports compete for "best".
                improved = stage in ("generate", "joint") and record["score"] > self.best_score
                if improved:
                    self.best_score = record["score"]
                    result.best_dir = self.output / "best"
                    if self.accelerator.is_main_process:
                        self.unwrapped.model.save_pretrained(result.best_dir)
                self._save_state(self.output / "last", optimizer, scheduler)
                result.last_dir, result.best_score = self.output / "last", self.best_score
                record.update(improved=improved)
                self._log(record)
                result.history.append(record)
                epochs_run += 1
            self.position.update(stage=index + 1, epoch=0, step=0)
        self.accelerator.wait_for_everyone()
        if self.accelerator.num_processes > 1:
            self._log(
                {"stage": "done", "ranks": self.accelerator.num_processes, **self._ranks_in_sync()}
            )
        return result

    def _ranks_in_sync(self) -> dict:
        """Whether every rank's trainable weights equal rank 0's (DDP keeps them equal)."""
        flat = torch.cat(
            [p.detach().float().flatten() for p in self.unwrapped.parameters() if p.requires_grad]
        )
        gathered = self.accelerator.gather(flat.unsqueeze(0))
        gap = (gathered - gathered[0]).abs().max().item()
        return {"ranks_in_sync": gap == 0.0, "max_rank_difference": gap}

    def _optimizer(self, stage: str, stage_config):
        groups = self.unwrapped.stage_groups(
            stage, self.config.encoder_lr_scale, self.config.weight_decay
        )
        for group in groups:
            group["lr"] = stage_config.lr * group.pop("lr_scale")
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=stage_config.lr)
        steps_per_epoch = math.ceil(len(self._loader(stage)) / self.config.grad_accum)
        if self.config.max_steps_per_epoch:
            steps_per_epoch = min(steps_per_epoch, self.config.max_steps_per_epoch)
        total = max(1, steps_per_epoch * stage_config.epochs)
        scheduler = get_cosine_schedule_with_warmup(
            optimizer, int(self.config.warmup_ratio * total), total
        )
        optimizer, scheduler = self.accelerator.prepare(optimizer, scheduler)
        return optimizer, scheduler

    def _train_epoch(self, stage: str, optimizer, scheduler) -> dict:
        module = self.module
        module.train()
        losses, samples, start = [], 0, time.perf_counter()
        loader = self._loader(stage)
        cap = self.config.max_steps_per_epoch * self.config.grad_accum or None
        bar = tqdm(
            loader,
            desc=f"{stage} epoch {self.position['epoch'] + 1}",
            disable=not self.accelerator.is_local_main_process,
            total=min(len(loader), cap) if cap else len(loader),
        )
        for i, batch in enumerate(bar):
            if cap and i >= cap:
                break
            if batch is None:
                continue
            with self.accelerator.accumulate(module):
                out = module(batch, stage)
                self.accelerator.backward(out["loss"])
                if self.accelerator.sync_gradients:
                    self.accelerator.clip_grad_norm_(
                        self.unwrapped.stage_parameters(stage), self.config.max_grad_norm
                    )
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            self.position["step"] += 1
            losses.append(out["loss"].item())
            samples += len(batch) if stage == "language" else len(batch.reports)
            rate = samples / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", samples_s=f"{rate:.2f}")
        elapsed = time.perf_counter() - start
        return {
            "stage": stage,
            "epoch": self.position["epoch"] + 1,
            "step": self.position["step"],
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
            "samples_per_s": samples / elapsed if elapsed else 0.0,
            "epoch_seconds": elapsed,
            "lr": scheduler.get_last_lr()[0],
            **peak_memory(self.accelerator.device),
            "skipped_images": list(self.train_set.skipped),
        }

    def _loader(self, stage: str) -> DataLoader:
        return self.language_loader if stage == "language" else self.loader

    @torch.no_grad()
    def _validate(self, stage: str) -> dict:
        """Validation loss (and retrieval accuracy, or BLEU-4/CIDEr/CE micro-F1) → ``score`` to maximise."""
        if stage == "language":  # held-out report texts: loss in nats per report token
            module = self.unwrapped.eval()
            losses = [module(texts, stage)["loss"].item() for texts in self.language_val]
            loss = float(np.mean(losses)) if losses else float("nan")
            return {"val_loss": loss, "score": -loss if losses else -math.inf}
        if len(self.val_set) == 0:  # no validation data: the caller falls back to the training loss
            return {"score": -math.inf}
        module = self.unwrapped
        module.eval()
        losses, accuracies, chances, references, hypotheses = [], [], [], [], []
        remaining = self.config.val_max_studies
        for batch in self.val_loader:
            if batch is None:
                continue
            out = module(batch, stage)
            losses.append(out["loss"].item())
            if stage == "align":
                accuracies.append(retrieval_accuracy(out["logits"], out["similarity"]))
                chances.append(retrieval_chance(out["similarity"]))
            elif remaining > 0:
                take = min(remaining, len(batch.reports))
                decoding = Decoding(max_new_tokens=self.config.val_max_new_tokens)
                findings = module.findings(batch.reports[:take])
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
        record.update(
            val_bleu4=scores.corpus["BLEU_4"], val_cider=scores.corpus["CIDEr"], val_ce_f1=ce
        )
        # Wording (BLEU-4, CIDEr) and findings (CE) count alike: a model that writes one fluent
        # normal report for every image scores well on wording alone.
        record["score"] = (scores.corpus["BLEU_4"] + scores.corpus["CIDEr"] + ce) / 3
        record["val_example"] = hypotheses[0] if hypotheses else ""
        return record

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
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from mrg.config import ConfigError
from mrg.data.datasets import Collate, StudyDataset, StudyRecord
from mrg.data.language import ReportCorpus
from mrg.model import MRGModel
from mrg.model.findings import FindingsHead
from mrg.text.phrasing import Phrasing
from mrg.text.vocabulary import report_vocabulary
from mrg.train.config import TrainConfig
from mrg.train.losses import (
    ContrastiveHeads,
    ReportEmbeddingCache,
    ReportLabels,
)
from mrg.train.stages import STAGES, TrainingModule, fitting_texts, language_sampler, validate

log = logging.getLogger(__name__)
STATE_NAME = "trainer_state.pt"


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
        reports = [r.report for r in train_records] + list(language.train if language else [])
        model.report_vocabulary = report_vocabulary(reports)
        model.report_phrasing = Phrasing.from_reports(reports)
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
            FindingsHead.from_pretrained(config.findings_head) if config.findings_head else None,
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
        language_train = fitting_texts(
            self.model.tokenizer,
            self.config.model.max_report_tokens,
            language.train if language else [],
        )
        language_loader = DataLoader(
            language_train,
            batch_size=config.batch_size,
            sampler=language_sampler(
                language_train,
                config.batch_size,
                config.language_abnormal_share,
                self.loader_generator,
            )
            if language_train
            else None,
            collate_fn=list,
        )
        self.language_val = DataLoader(
            fitting_texts(
                self.model.tokenizer,
                self.config.model.max_report_tokens,
                language.val if language else [],
            ),
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

    def _validate(self, stage: str) -> dict:
        loader = self.language_val if stage == "language" else self.val_loader
        return validate(self.unwrapped, stage, loader, self.config)

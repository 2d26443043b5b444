"""``mrg info``, ``mrg prepare`` and ``mrg train``: model sizes, datasets, training."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from mrg.cli.common import console, parse_value
from mrg.config import ConfigError


def info_command(args: argparse.Namespace) -> int:
    """Trainable parameter counts for each customizer mode of a preset (the LLM loaded once),
    and the dtype ``--dtype auto`` gives the LLM on this CPU, with the measurement behind it."""
    import torch

    from mrg.config import CUSTOMIZER_MODES
    from mrg.model import MRGModel
    from mrg.model.cpu_probe import cached_measurement, describe
    from mrg.model.llm import load_frozen_llm
    from mrg.presets import model_preset

    base = model_preset(args.preset)
    llm, tokenizer = load_frozen_llm(base.llm)
    table = Table(
        title=f"Trainable parameters — preset {args.preset} (LLM {base.llm.source}, frozen)"
    )
    for column in ("mode", "encoder", "projection", "customizer", "trainable total", "frozen LLM"):
        table.add_column(column, justify="right" if column != "mode" else "left")
    for mode in CUSTOMIZER_MODES:
        torch.manual_seed(0)
        counts = MRGModel(
            model_preset(args.preset, mode), llm, tokenizer
        ).num_trainable_parameters()
        table.add_row(
            mode,
            *(
                f"{counts[k]:,}"
                for k in ("encoder", "projection", "customizer", "total", "llm_frozen")
            ),
        )
    console.print(table)
    console.print(describe(cached_measurement()))
    return 0


def prepare_command(args: argparse.Namespace) -> int:
    """Build an annotation.json from the OpenI XML and an OpenI-named image folder."""
    from mrg.data.datasets import prepare_openi

    summary = prepare_openi(
        args.reports, args.images, args.out, require_findings=not args.allow_no_findings
    )
    table = Table(title=f"OpenI → {args.out}")
    table.add_column("")
    table.add_column("studies", justify="right")
    table.add_row("reports read", str(summary.reports))
    for reason, count in summary.dropped.most_common():
        table.add_row(f"dropped: {reason}", str(count))
    table.add_row("kept", str(summary.kept))
    for split in ("train", "val", "test"):
        table.add_row(f"  {split}", str(summary.per_split[split]))
    console.print(table)
    return 0 if summary.kept else 1


def train_config(args: argparse.Namespace):
    """Preset (or JSON file) + command-line overrides → a validated TrainConfig."""
    import json

    from mrg.train.config import TrainConfig, train_preset

    if args.config:
        config = TrainConfig.from_dict(json.loads(Path(args.config).read_text()))
    else:
        config = train_preset(args.preset, mode=args.mode)
    data = config.to_dict()
    for key, value in (
        ("annotation", args.annotation),
        ("image_root", args.images),
        ("output_dir", args.out),
        ("language_reports", args.language_reports),
        ("mixed_precision", args.mixed_precision),
        ("gradient_checkpointing", args.gradient_checkpointing),
    ):
        if value:
            data[key] = value
    for item in args.set or []:
        path, _, raw = item.partition("=")
        target = data
        *parents, leaf = path.split(".")
        for depth, name in enumerate([*parents, leaf]):
            fields = target if isinstance(target, dict) else {}
            if name not in fields:
                where = ".".join(parents[:depth]) or "the training config"
                choices = ", ".join(sorted(fields)) or "none: it is not a section"
                raise ConfigError(f"--set {item}: {where} has no field {name!r} ({choices})")
            if depth < len(parents):
                target = target[name]
        target[leaf] = parse_value(raw)
    return TrainConfig.from_dict(data).validate()


def train_command(args: argparse.Namespace) -> int:
    """Train a model end to end: alignment, generation, joint, as configured."""
    from mrg.data.datasets import load_annotation
    from mrg.data.language import HeldOut, report_corpus
    from mrg.model import MRGModel
    from mrg.model.llm import load_frozen_llm
    from mrg.train.trainer import Trainer

    config = train_config(args)  # fails here, before any heavy loading, on a bad field
    if not config.annotation or not config.image_root:
        raise SystemExit("mrg train: --annotation and --images are required")
    records = load_annotation(config.annotation, config.image_root)
    train = [r for r in records if r.split == "train"]
    val = [r for r in records if r.split == "val"]
    language = None
    if config.language.epochs:
        if not config.language_reports:
            raise SystemExit("mrg train: the language stage needs --language-reports")
        held_out = HeldOut.from_records(records)
        for path in args.hold_out or []:
            held_out.update(HeldOut.from_records(load_annotation(path, ".")))
        language = report_corpus(config.language_reports, held_out)
        console.print(
            f"language stage: {len(language.train)} reports (val {len(language.val)}), "
            f"{language.held_out} held out"
        )
    llm, tokenizer = load_frozen_llm(config.model.llm)
    model = MRGModel(config.model, llm, tokenizer)
    console.print(
        f"training {config.model.customizer.mode} on {len(train)} studies (val {len(val)}) → {config.output_dir}"
    )
    result = Trainer(config, model, train, val, resume=args.resume, language=language).fit()
    console.print(
        f"best checkpoint: {result.best_dir} (score {result.best_score:.4f}); last: {result.last_dir}"
    )
    if args.push_to_hub and result.best_dir:
        best = MRGModel.from_pretrained(result.best_dir, llm=llm, tokenizer=tokenizer)
        console.print(f"pushed to the Hub: {best.push_to_hub(args.push_to_hub)}")
    return 0

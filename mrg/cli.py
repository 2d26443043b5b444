"""The ``mrg`` command: info, generate, train, evaluate, prepare, demo.

Each subcommand parses its own flags and hands off to the module that does the work;
heavy imports happen inside the handlers so ``mrg --help`` is instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console(width=None if sys.stdout.isatty() else 120)


def _info(args: argparse.Namespace) -> int:
    """Trainable parameter counts for each customizer mode of a preset (the LLM loaded once)."""
    import torch

    from mrg.config import CUSTOMIZER_MODES, model_preset
    from mrg.model import MRGModel
    from mrg.model.llm import load_frozen_llm

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
    return 0


def _prepare(args: argparse.Namespace) -> int:
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


def _labeler_eval(args: argparse.Namespace) -> int:
    """Per-label precision/recall/F1 of the report labeler on the OpenI gold standard."""
    from mrg.evaluation.labeler_eval import SCORED, evaluate_on_gold

    result = evaluate_on_gold(args.gold, args.reports)
    table = Table(title=f"Report labeler vs OpenI radiologist labels ({result.reports} reports)")
    for column in ("label", "gold +", "TP", "FP", "FN", "precision", "recall", "F1"):
        table.add_column(column, justify="left" if column == "label" else "right")
    for label, score in result.per_label.items():
        note = "" if label in SCORED else " (not in gold; excluded)"
        table.add_row(
            label + note,
            str(score.tp + score.fn),
            str(score.tp),
            str(score.fp),
            str(score.fn),
            f"{score.precision:.3f}",
            f"{score.recall:.3f}",
            f"{score.f1:.3f}",
        )
    micro = result.micro
    table.add_row(
        "micro (13 labels)",
        "",
        str(micro.tp),
        str(micro.fp),
        str(micro.fn),
        f"{micro.precision:.3f}",
        f"{micro.recall:.3f}",
        f"{micro.f1:.3f}",
        style="bold",
    )
    table.add_row(
        "macro F1 (13 labels)", "", "", "", "", "", "", f"{result.macro_f1:.3f}", style="bold"
    )
    console.print(table)
    return 0


def _parse_value(text: str):
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _train_config(args: argparse.Namespace):
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
    ):
        if value:
            data[key] = value
    for item in args.set or []:
        path, _, raw = item.partition("=")
        target = data
        *parents, leaf = path.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = _parse_value(raw)
    return TrainConfig.from_dict(data).validate()


def _train(args: argparse.Namespace) -> int:
    """Train a model end to end: alignment, generation, joint, as configured."""
    from mrg.data.datasets import load_annotation
    from mrg.model import MRGModel
    from mrg.model.llm import load_frozen_llm
    from mrg.train.trainer import Trainer

    config = _train_config(args)  # fails here, before any heavy loading, on a bad field
    if not config.annotation or not config.image_root:
        raise SystemExit("mrg train: --annotation and --images are required")
    train = load_annotation(config.annotation, config.image_root, split="train")
    val = load_annotation(config.annotation, config.image_root, split="val")
    llm, tokenizer = load_frozen_llm(config.model.llm)
    model = MRGModel(config.model, llm, tokenizer)
    console.print(
        f"training {config.model.customizer.mode} on {len(train)} studies (val {len(val)}) → {config.output_dir}"
    )
    result = Trainer(config, model, train, val, resume=args.resume).fit()
    console.print(
        f"best checkpoint: {result.best_dir} (score {result.best_score:.4f}); last: {result.last_dir}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mrg", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="trainable parameter counts per customizer mode")
    info.add_argument("--preset", default="demo-cpu")
    info.set_defaults(func=_info)

    prepare = sub.add_parser("prepare", help="build an annotation.json from a raw dataset")
    prepare.add_argument("dataset", choices=["iu-xray"])
    prepare.add_argument(
        "--reports", required=True, help="NLMCXR_reports.tgz or its extracted folder"
    )
    prepare.add_argument(
        "--images", required=True, help="folder of OpenI PNGs (CXR1_1_IM-0001-3001.png)"
    )
    prepare.add_argument("--out", required=True, help="annotation.json to write")
    prepare.add_argument(
        "--allow-no-findings", action="store_true", help="keep studies with IMPRESSION only"
    )
    prepare.set_defaults(func=_prepare)

    train = sub.add_parser("train", help="train a static, prompt-wise or promptbook-wise model")
    train.add_argument(
        "--preset",
        default="demo-cpu",
        help="demo-cpu | iu-xray-llama2-7b-nf4 | mimic-cxr-llama2-7b-nf4",
    )
    train.add_argument("--mode", default=None, choices=["static", "prompt-wise", "promptbook-wise"])
    train.add_argument("--config", help="a TrainConfig JSON file instead of a preset")
    train.add_argument("--annotation", help="R2Gen-style annotation.json")
    train.add_argument("--images", help="image root the annotation's paths are relative to")
    train.add_argument("--out", help="output directory (checkpoints, log.jsonl)")
    train.add_argument("--resume", action="store_true", help="continue from <out>/last")
    train.add_argument(
        "--set", action="append", metavar="FIELD=VALUE", help="override, e.g. generate.epochs=3"
    )
    train.set_defaults(func=_train)

    shared = os.environ.get("MRG_SHARED_DATA", "../shared/data")
    labeler = sub.add_parser(
        "labeler-eval", help="score the report labeler on the OpenI gold standard"
    )
    labeler.add_argument("--gold", default=f"{shared}/openi_labels/openi_gold14_dev.csv")
    labeler.add_argument("--reports", default=f"{shared}/iu_xray/NLMCXR_reports.tgz")
    labeler.set_defaults(func=_labeler_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    import torch

    from mrg.config import ConfigError

    torch.set_num_threads(int(os.environ.get("MRG_NUM_THREADS", os.cpu_count() or 1)))
    try:
        return args.func(args)
    except ConfigError as err:
        console.print(f"[red]configuration error:[/red] {err}")
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The ``mrg`` command: info, generate, train, evaluate, prepare, demo.

Each subcommand parses its own flags and hands off to the module that does the work;
heavy imports happen inside the handlers so ``mrg --help`` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mrg.config import CUSTOMIZER_MODES, DTYPES, QUANTIZATIONS, ConfigError
from mrg.environment import setting
from mrg.train.config import TRAIN_PRESETS

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
        target[leaf] = _parse_value(raw)
    return TrainConfig.from_dict(data).validate()


def _train(args: argparse.Namespace) -> int:
    """Train a model end to end: alignment, generation, joint, as configured."""
    from mrg.data.datasets import load_annotation
    from mrg.data.language import HeldOut, report_corpus
    from mrg.model import MRGModel
    from mrg.model.llm import load_frozen_llm
    from mrg.train.trainer import Trainer

    config = _train_config(args)  # fails here, before any heavy loading, on a bad field
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


def _decoding(args: argparse.Namespace):
    from mrg.evaluation.runner import decoding_from_args

    return decoding_from_args(
        args.strategy, args.max_new_tokens, args.num_beams, args.repetition_penalty
    )


def _add_decoding_flags(parser: argparse.ArgumentParser, default) -> None:
    """Decoding flags whose defaults come from a ``Decoding`` (the app's, or R2GenGPT's for evaluation)."""
    parser.add_argument(
        "--strategy", default=default.strategy, choices=["greedy", "beam", "sample"]
    )
    parser.add_argument("--max-new-tokens", type=int, default=default.max_new_tokens)
    parser.add_argument("--num-beams", type=int, default=default.num_beams)
    parser.add_argument("--repetition-penalty", type=float, default=default.repetition_penalty)


def _generate(args: argparse.Namespace) -> int:
    """One study streamed to the terminal, or a folder / annotation split written to a file."""
    import json

    from mrg.data.study import study_from_sources
    from mrg.imaging import ImageError
    from mrg.service import ReportService

    service = ReportService.load(
        args.checkpoints, device=args.device, quantization=args.quantization, dtype=args.dtype
    )
    decoding = _decoding(args)
    if args.annotation or (args.inputs and Path(args.inputs[0]).is_dir()):
        return _generate_many(args, service, decoding)
    if not args.inputs:
        raise SystemExit(
            "mrg generate: give an image (and optionally a lateral), a folder, or --annotation"
        )
    try:
        study = study_from_sources(args.inputs[0], args.inputs[1] if len(args.inputs) > 1 else None)
    except ImageError as err:
        console.print(f"[red]cannot use this image:[/red] {err}")
        return 1
    if not service.info.trained:
        console.print(
            "[yellow]no trained checkpoint found: the report is from untrained weights[/yellow]"
        )
    update = None
    printed = ""
    for update in service.stream(study, args.mode, decoding, findings=args.findings):
        if not args.json and update.text.startswith(printed):
            sys.stdout.write(update.text[len(printed) :])
            sys.stdout.flush()
            printed = update.text
    if args.json:
        payload = {
            "mode": args.mode,
            "device": service.info.device,
            "quantization": service.info.quantization,
            "dtype": service.info.dtype,
            "findings": update.findings,
            "impression": update.impression,
            "text": update.text,
            "tokens": update.tokens,
            "ttft_s": update.ttft_s,
            "tokens_per_s": update.tokens_per_s,
            "views": [v.image.meta.to_dict() | {"position": v.position} for v in study.views],
            "findings_head": update.condition.as_dict() if update.condition else None,
        }
        print(json.dumps(payload, indent=2))
    else:
        if update.condition is not None:
            how = "set by hand" if update.condition.manual else "the findings head's"
            named = ", ".join(update.condition.named) or "none"
            console.print(f"\n[dim]written from findings ({how}): {named}[/dim]", end="")
        rate = f"{update.tokens_per_s:.1f} tokens/s" if update.tokens_per_s else ""
        console.print(
            f"\n[dim]{update.tokens} tokens, first after {update.ttft_s or 0:.2f} s {rate}[/dim]"
        )
    return 0


def _findings_flag(text: str) -> list[str]:
    """``--findings "Effusion, Cardiomegaly"`` (or ``none``) → ChestX-ray14 names."""
    from mrg.text.taxonomy import finding_named

    if text.strip().lower() in ("", "none", "normal"):
        return []
    try:
        return [finding_named(name) for name in text.split(",")]
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _generate_many(args: argparse.Namespace, service, decoding) -> int:
    from mrg.data.datasets import folder_records, load_annotation
    from mrg.evaluation.runner import generate_split, stream_split

    if not args.out:
        raise SystemExit("mrg generate: --out is required for a folder or an annotation split")
    if args.annotation:
        records = load_annotation(args.annotation, args.images, split=args.split)
    else:
        records = folder_records(args.inputs[0])
    out = Path(args.out)
    jsonl = out if out.suffix == ".jsonl" else out.with_suffix(".jsonl")
    if decoding.strategy == "beam":  # not streamable: transformers' batched beam search
        if args.findings is not None:
            raise SystemExit("mrg generate: --findings works with greedy or sampled decoding")
        rows = generate_split(
            service.model(args.mode),
            records,
            jsonl,
            decoding,
            args.batch_size,
            service.findings_head,
        )
    else:  # the app's continuous batcher, args.batch_size studies at once
        rows = stream_split(
            service, args.mode, records, jsonl, decoding, args.batch_size, args.findings
        )
    if out.suffix == ".csv":
        import csv

        columns = list(dict.fromkeys(key for row in rows for key in row))
        with out.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    console.print(f"{len(rows)} studies → {out}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    """Generate on a split for each checkpoint, score, write metrics.json / metrics.md / cases.csv."""
    from mrg.data.datasets import load_annotation
    from mrg.evaluation.runner import generate_split, markdown_table, score_rows, write_results
    from mrg.model import MRGModel

    records = load_annotation(args.annotation, args.images, split=args.split)
    if args.limit:
        records = records[: args.limit]
    decoding = _decoding(args)
    runs, llm, tokenizer = {}, None, None
    for checkpoint in args.checkpoint:
        model = MRGModel.from_pretrained(checkpoint, llm=llm, tokenizer=tokenizer).eval()
        llm, tokenizer = (
            model.llm,
            model.tokenizer,
        )  # every further checkpoint shares the frozen LLM
        name = (
            Path(checkpoint).name
            if Path(checkpoint).name not in ("best", "last")
            else Path(checkpoint).parent.name
        )
        directory = Path(args.out) / name
        head = _findings_head(args.findings_head, checkpoint)
        if model.config.uses_findings and head is None:
            raise SystemExit(
                f"mrg evaluate: {checkpoint} writes from findings; pass --findings-head DIR"
            )
        rows = generate_split(
            model, records, directory / "generations.jsonl", decoding, args.batch_size, head
        )
        metrics, cases = score_rows(rows, meteor=not args.no_meteor)
        metrics.update(checkpoint=str(checkpoint), mode=model.mode, split=args.split)
        write_results(directory, metrics, cases)
        runs[name] = metrics
    table = markdown_table(runs)
    (Path(args.out) / "comparison.md").write_text(table)
    console.print(table)
    return 0


def _findings_head(folder: str | None, checkpoint: str):
    """The findings head of ``folder``, else the one beside ``checkpoint`` (``../findings``;
    for ``runs/x/best`` the shipped one), else None."""
    from mrg.config import DEFAULT_CHECKPOINTS
    from mrg.model.findings import FINDINGS_CONFIG_NAME, FINDINGS_FOLDER, FindingsHead

    candidates = [Path(folder)] if folder else []
    candidates += [Path(checkpoint).parent / FINDINGS_FOLDER, DEFAULT_CHECKPOINTS / FINDINGS_FOLDER]
    for candidate in candidates:
        if (candidate / FINDINGS_CONFIG_NAME).is_file():
            return FindingsHead.from_pretrained(candidate)
    return None


def _demo(args: argparse.Namespace) -> int:
    """Start the Gradio demo; every flag after `demo` goes to it (see `mrg demo --help`)."""
    from mrg.demo import main as demo_main

    demo_main(args.demo_args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from mrg.config import DEFAULT_DECODING, R2GENGPT_DECODING

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
    train.add_argument("--preset", default="demo-cpu", choices=sorted(TRAIN_PRESETS))
    train.add_argument("--mode", default=None, choices=CUSTOMIZER_MODES)
    train.add_argument("--config", help="a TrainConfig JSON file instead of a preset")
    train.add_argument("--annotation", help="R2Gen-style annotation.json")
    train.add_argument("--images", help="image root the annotation's paths are relative to")
    train.add_argument("--out", help="output directory (checkpoints, log.jsonl)")
    train.add_argument(
        "--language-reports", help="OpenI NLMCXR_reports.tgz for the report-language stage"
    )
    train.add_argument(
        "--hold-out",
        action="append",
        metavar="ANNOTATION",
        help="another annotation.json whose validation and test reports the language stage "
        "must not see (e.g. IU X-ray's when training on other images); repeatable",
    )
    train.add_argument("--resume", action="store_true", help="continue from <out>/last")
    train.add_argument(
        "--push-to-hub",
        metavar="ORG/NAME",
        help="upload the best checkpoint with a Hub model card when training ends",
    )
    train.add_argument(
        "--mixed-precision",
        choices=["no", "bf16", "fp16"],
        help="autocast the trainable parts and the frozen LLM's compute (GPU: bf16)",
    )
    train.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute the frozen LLM's activations in backward (7B on one GPU)",
    )
    train.add_argument(
        "--set", action="append", metavar="FIELD=VALUE", help="override, e.g. generate.epochs=3"
    )
    train.set_defaults(func=_train)

    generate = sub.add_parser(
        "generate", help="generate a report for an image (PNG/JPEG/DICOM), a folder or a split"
    )
    generate.add_argument("inputs", nargs="*", help="FRONTAL [LATERAL], or a folder of images")
    generate.add_argument("--mode", default="prompt-wise", choices=CUSTOMIZER_MODES)
    generate.add_argument(
        "--checkpoints",
        help="folder or Hub repo id with prompt-wise/ and promptbook-wise/ "
        "(default: assets/checkpoints)",
    )
    generate.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    generate.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        default=None,
        help="load the LLM in 4-bit nf4 or int8 with bitsandbytes (GPU, or CPU where supported)",
    )
    generate.add_argument(
        "--dtype",
        choices=("auto", *DTYPES),
        default="auto",
        help="the LLM's dtype (auto: bfloat16 on a CPU with fast bf16 matrix products)",
    )
    generate.add_argument("--json", action="store_true", help="print the final report as JSON")
    generate.add_argument("--annotation", help="annotation.json: generate for a whole split")
    generate.add_argument("--images", help="image root of --annotation")
    generate.add_argument("--split", default="test")
    generate.add_argument(
        "--out", help="CSV or JSONL for folders and splits (rerun skips studies already written)"
    )
    generate.add_argument("--batch-size", type=int, default=8)
    generate.add_argument(
        "--findings",
        type=_findings_flag,
        default=None,
        metavar="NAMES",
        help="write the report as if the image showed these ChestX-ray14 findings "
        '(comma-separated, e.g. "Effusion,Cardiomegaly"; "none" for a normal study) '
        "instead of the findings head's",
    )
    _add_decoding_flags(generate, DEFAULT_DECODING)
    generate.set_defaults(func=_generate)

    evaluate = sub.add_parser("evaluate", help="score one or more checkpoints on a split")
    evaluate.add_argument(
        "--checkpoint",
        action="append",
        required=True,
        help="a checkpoint folder or Hub repo id; repeat to compare several",
    )
    evaluate.add_argument("--annotation", required=True)
    evaluate.add_argument("--images", required=True)
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--out", default="runs/eval")
    evaluate.add_argument(
        "--findings-head",
        help="the findings head a findings-conditioned checkpoint writes from "
        "(default: findings/ beside the checkpoint, else the shipped one)",
    )
    evaluate.add_argument("--limit", type=int, default=0, help="only the first N studies")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--no-meteor", action="store_true")
    _add_decoding_flags(evaluate, R2GENGPT_DECODING)
    evaluate.set_defaults(func=_evaluate)

    demo = sub.add_parser("demo", help="start the web demo (same flags as app.py)", add_help=False)
    demo.add_argument("demo_args", nargs=argparse.REMAINDER)
    demo.set_defaults(func=_demo)

    shared = setting("MRG_SHARED_DATA")
    labeler = sub.add_parser(
        "labeler-eval", help="score the report labeler on the OpenI gold standard"
    )
    labeler.add_argument("--gold", default=f"{shared}/openi_labels/openi_gold14_dev.csv")
    labeler.add_argument("--reports", default=f"{shared}/iu_xray/NLMCXR_reports.tgz")
    labeler.set_defaults(func=_labeler_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # the demo parses its own flags (argparse.REMAINDER cannot pass --help on)
    if argv[:1] == ["demo"]:
        return _demo(argparse.Namespace(demo_args=argv[1:]))
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    import torch

    torch.set_num_threads(int(setting("MRG_NUM_THREADS")))
    try:
        return args.func(args)
    except ConfigError as err:
        console.print(f"[red]configuration error:[/red] {err}")
        return 2


if __name__ == "__main__":
    sys.exit(main())

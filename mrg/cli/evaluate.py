"""``mrg evaluate`` and ``mrg labeler-eval``: scored generation on a split, the labeler."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from mrg.cli.common import console, decoding_of


def evaluate_command(args: argparse.Namespace) -> int:
    """Generate on a split for each checkpoint, score, write metrics.json / metrics.md / cases.csv."""
    from mrg.data.datasets import load_annotation
    from mrg.evaluation.runner import generate_split, markdown_table, score_rows, write_results
    from mrg.model import MRGModel

    records = load_annotation(args.annotation, args.images, split=args.split)
    if args.limit:
        records = records[: args.limit]
    decoding = decoding_of(args)
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
        head = findings_head_of(args.findings_head, checkpoint)
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


def findings_head_of(folder: str | None, checkpoint: str):
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


def labeler_eval_command(args: argparse.Namespace) -> int:
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

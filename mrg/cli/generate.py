"""``mrg generate``: one study streamed to the terminal, or a folder or split to a file."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from mrg.cli.common import console, decoding_of

if TYPE_CHECKING:
    from mrg.data.datasets import StudyRecord
    from mrg.model import Decoding
    from mrg.service import ReportService


def generate_command(args: argparse.Namespace) -> int:
    """One study streamed to the terminal, or a folder / annotation split written to a file."""
    import json

    from mrg.data.study import study_from_sources
    from mrg.imaging import ImageError
    from mrg.service import ReportService, StudyRefused

    service = ReportService.load(
        args.checkpoints, device=args.device, quantization=args.quantization, dtype=args.dtype
    )
    decoding = decoding_of(args)
    if args.annotation or (args.inputs and Path(args.inputs[0]).is_dir()):
        return generate_many(args, service, decoding)
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
    try:
        screening = service.screen(study, args.allow_any_modality)
        if screening.warning and not args.json:
            console.print(f"[yellow]⚠ {screening.warning}[/yellow]")
        for update in service.stream(
            study, args.mode, decoding, findings=args.findings, allow_anyway=args.allow_any_modality
        ):
            if not args.json and update.text.startswith(printed):
                sys.stdout.write(update.text[len(printed) :])
                sys.stdout.flush()
                printed = update.text
    except StudyRefused as refused:
        if args.json:
            print(json.dumps(refusal_payload(args.mode, refused.screening), indent=2))
        else:
            console.print(
                f"[red]no report:[/red] {refused} (--allow-any-modality writes one anyway)"
            )
        return 2
    if args.json:
        payload = {
            "mode": args.mode,
            "refused": None,
            "warning": update.screening.warning if update.screening else "",
            "gate": update.screening.as_dict() if update.screening else None,
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
            line = condition_line(update.condition, service.model(args.mode).config.uses_states)
            console.print(f"\n[dim]written from ({how}): {line}[/dim]", end="")
        rate = f"{update.tokens_per_s:.1f} tokens/s" if update.tokens_per_s else ""
        console.print(
            f"\n[dim]{update.tokens} tokens, first after {update.ttft_s or 0:.2f} s {rate}[/dim]"
        )
    return 0


def condition_line(condition, uses_states: bool) -> str:
    """The condition a report was written from, in one line: its states where the model
    takes states ("present: Cardiomegaly; possible: Effusion"), else the findings named."""
    states = condition.states
    if uses_states and states:
        from mrg.text.states import STATES, with_state

        parts = [
            f"{s}: {', '.join(with_state(states, s))}" for s in STATES if with_state(states, s)
        ]
        return "; ".join(parts)
    return "findings " + (", ".join(condition.named) or "none")


def refusal_payload(mode: str, screening) -> dict:
    """``--json`` for a refused study: the reason's code and message, and the gate's scores."""
    return {
        "mode": mode,
        "refused": screening.refused,
        "message": screening.message,
        "gate": screening.as_dict(),
        "text": "",
    }


def findings_flag(text: str) -> dict[str, str]:
    """``--findings "Effusion=possible, Cardiomegaly, Pneumothorax=absent"`` (or ``none``) →
    ChestX-ray14 names → states; a name alone is present."""
    from mrg.text.states import parse_states

    if text.strip().lower() in ("", "none", "normal"):
        return {}
    try:
        return parse_states(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def generate_many(args: argparse.Namespace, service, decoding) -> int:
    from mrg.data.datasets import folder_records, load_annotation
    from mrg.evaluation.runner import generate_split

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
            service,
            args.mode,
            records,
            jsonl,
            decoding,
            args.batch_size,
            args.findings,
            args.allow_any_modality,
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


def stream_split(
    service: ReportService,
    mode: str,
    records: Sequence[StudyRecord],
    out_file: Path,
    decoding: Decoding,
    concurrency: int = 8,
    findings: dict[str, str] | None = None,
    allow_anyway: bool = False,
) -> list[dict]:
    """``generate_split`` through the service's continuous batcher (``mrg.batching``), as the
    app serves its users: ``concurrency`` studies decode together, and the next one joins the
    running batch as soon as one finishes (at most the batch's size: past it, requests wait).
    ``findings`` sets every study's states by hand (what-if); rows carry ``p_<Finding>`` and
    ``state_<Finding>``.
    A study the gate refuses gets an empty report and its reason in ``refused``."""
    from mrg.data.datasets import StudyDataset
    from mrg.evaluation.runner import Generations, finding_columns
    from mrg.service import StudyRefused
    from mrg.text.taxonomy import FINDINGS14

    batcher = service.batchers[id(service.model(mode).llm)]
    concurrency = max(1, min(concurrency, batcher.max_batch))
    generations = Generations(out_file)
    todo = generations.todo(records)
    dataset = StudyDataset(todo, on_missing="skip")
    with (
        generations.path.open("a") as handle,
        tqdm(total=len(todo), desc=f"generating ({mode})") as bar,
    ):

        def one(index: int) -> None:
            study = dataset[index]
            if study is not None:
                condition = service.read_findings(study, findings)
                try:
                    update = service.generate(
                        study, mode, decoding, findings=condition, allow_anyway=allow_anyway
                    )
                    text, extra = update.text, {"refused": ""}
                except StudyRefused as refused:
                    text, extra = "", {"refused": refused.screening.refused}
                if condition is not None:
                    p = [condition.probabilities.get(f, float("nan")) for f in FINDINGS14]
                    extra |= finding_columns(p, condition.named, condition.states)
                generations.add(handle, todo[index].study_id, todo[index].report, text, extra)
            bar.update(1)

        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(len(todo))))
    return generations.rows(records)

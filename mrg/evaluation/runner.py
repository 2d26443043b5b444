"""``mrg evaluate``: generate for a split (batched, resumable), score, and write the results.

Outputs in ``<out>/<name>/``: ``generations.jsonl`` (one row per study; studies already
there are skipped on a rerun), ``metrics.json``, ``metrics.md`` and ``cases.csv`` (id,
reference, generated, per-case scores, label disagreements). ``compare_table`` renders
several runs side by side (prompt-wise vs promptbook-wise vs static).
"""

from __future__ import annotations

import csv
import json
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from mrg.data.datasets import Collate, StudyDataset, StudyRecord
from mrg.evaluation.metrics import chexpert_positive, clinical_efficacy, nlg_scores
from mrg.model import Decoding, MRGModel
from mrg.model.findings import FindingsHead
from mrg.text.labeler import ReportLabeler
from mrg.text.states import named, states_of_vector
from mrg.text.taxonomy import CHEXPERT14, FINDINGS14, named_findings

GENERATIONS = "generations.jsonl"


def finding_columns(
    probabilities: Sequence[float], named: Sequence[str], states: Mapping[str, str] | None = None
) -> dict:
    """``p_<Finding>`` per ChestX-ray14 finding, ``condition`` (the findings written from) and,
    with ``states``, ``state_<Finding>`` (present, possible, absent, or "" where not stated)."""
    columns = {f"p_{f}": round(float(p), 4) for f, p in zip(FINDINGS14, probabilities)}
    columns["condition"] = "|".join(named) or "normal"
    if states is not None:
        columns |= {f"state_{f}": states.get(f, "") for f in FINDINGS14}
    return columns


def named_and_states(condition: list[float], uses_states: bool) -> tuple[list[str], dict | None]:
    """(the findings a condition names: present or possible; its states, for a states model)."""
    if not uses_states:
        return named_findings(condition), None
    states = states_of_vector(condition)
    return named(states), states


class Generations:
    """A resumable JSONL of ``{"id", "reference", "generated"}`` rows: rows already in the file
    are kept, new ones are appended and flushed one by one, from any thread."""

    def __init__(self, path: Path):
        self.path, self.done, self.lock = Path(path), {}, threading.Lock()
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                row = json.loads(line)
                self.done[row["id"]] = row
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def todo(self, records: Sequence[StudyRecord]) -> list[StudyRecord]:
        return [r for r in records if r.study_id not in self.done]

    def add(
        self, handle, study_id: str, reference: str, generated: str, extra: dict | None = None
    ) -> None:
        """Append one row; ``extra`` adds columns (the findings head's ``p_<Finding>``)."""
        row = {"id": study_id, "reference": reference, "generated": generated, **(extra or {})}
        with self.lock:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            self.done[study_id] = row

    def rows(self, records: Sequence[StudyRecord]) -> list[dict]:
        """The rows of ``records`` that have one, in their order."""
        return [self.done[r.study_id] for r in records if r.study_id in self.done]


def generate_split(
    model: MRGModel,
    records: Sequence[StudyRecord],
    out_file: Path,
    decoding: Decoding,
    batch_size: int = 8,
    findings_head: FindingsHead | None = None,
) -> list[dict]:
    """Append rows for studies not in ``out_file`` yet, ``batch_size`` at a time through
    ``transformers``' ``generate``; return all rows. A findings-conditioned model writes
    from ``findings_head``'s decisions on each study."""
    if model.config.uses_findings and findings_head is None:
        raise ValueError("this model writes reports from findings: pass its findings head")
    generations = Generations(out_file)
    todo = generations.todo(records)
    dataset = StudyDataset(todo, on_missing="skip")
    collate = Collate(model.config.encoder.image_size, model.config.max_views)
    # the head reads the studies at its own side (not the encoder's views resized)
    head_size = findings_head.config.image_size if findings_head is not None else None
    head_collate = (
        Collate(head_size, model.config.max_views)
        if head_size not in (None, model.config.encoder.image_size)
        else None
    )
    with (
        generations.path.open("a") as handle,
        tqdm(total=len(todo), desc=f"generating ({model.mode})") as bar,
    ):
        for start in range(0, len(todo), batch_size):
            studies = [dataset[i] for i in range(start, min(start + batch_size, len(todo)))]
            batch = collate(studies)
            bar.update(min(batch_size, len(todo) - start))
            if batch is None:
                continue
            y, extras = None, [{}] * len(batch.reports)
            if findings_head is not None:
                uses_states = model.config.uses_states
                head_views = batch.views if head_collate is None else head_collate(studies).views
                probabilities, y = findings_head.predict(head_views, states=uses_states)
                extras = [
                    finding_columns(p.tolist(), *named_and_states(row.tolist(), uses_states))
                    for p, row in zip(probabilities, y)
                ]
            texts = model.generate(batch.views, decoding, y if model.config.uses_findings else None)
            for study_id, reference, text, extra in zip(
                batch.study_ids, batch.reports, texts, extras
            ):
                generations.add(handle, study_id, reference, text, extra)
    return generations.rows(records)


def score_rows(rows: Sequence[dict], meteor: bool = True) -> tuple[dict, list[dict]]:
    """Corpus metrics (NLG + clinical efficacy) and per-case rows with disagreements."""
    references, generated = [r["reference"] for r in rows], [r["generated"] for r in rows]
    nlg = nlg_scores(references, generated, meteor=meteor)
    ce = clinical_efficacy(references, generated)
    metrics = {
        "studies": len(rows),
        **nlg.corpus,
        **{
            f"CE_{space}_{avg}_{k}": getattr(getattr(scores, avg), k)
            for space, scores in ce.items()
            for avg in ("micro", "macro")
            for k in ("precision", "recall", "f1")
        },
        "notes": nlg.notes,
    }
    labeler = ReportLabeler()
    cases = []
    for i, row in enumerate(rows):
        ref, gen = (
            chexpert_positive(labeler, row["reference"]),
            chexpert_positive(labeler, row["generated"]),
        )
        missed = [k for k in CHEXPERT14 if ref[k] and not gen[k]]
        hallucinated = [k for k in CHEXPERT14 if gen[k] and not ref[k]]
        case = dict(row)
        case.update({key: values[i] for key, values in nlg.per_case.items()})
        case.update(missed="; ".join(missed), hallucinated="; ".join(hallucinated))
        cases.append(case)
    return metrics, cases


def markdown_table(runs: dict[str, dict]) -> str:
    """One row per run, columns as papers report them."""
    columns = [
        ("BLEU-1", "BLEU_1"),
        ("BLEU-4", "BLEU_4"),
        ("METEOR", "METEOR"),
        ("ROUGE-L", "ROUGE_L"),
        ("CIDEr", "CIDEr"),
        ("CE-14 micro F1", "CE_chexpert14_micro_f1"),
        ("CE-5 micro F1", "CE_chexpert5_micro_f1"),
    ]
    lines = [
        "| run | studies | " + " | ".join(c for c, _ in columns) + " |",
        "|---|---:|" + "---:|" * len(columns),
    ]
    for name, metrics in runs.items():
        cells = [f"{metrics[k]:.3f}" if k in metrics else "n/a" for _, k in columns]
        lines.append(f"| {name} | {metrics['studies']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(directory: Path, metrics: dict, cases: list[dict]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (directory / "metrics.md").write_text(markdown_table({directory.name: metrics}))
    with (directory / "cases.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(cases[0]) if cases else ["id"])
        writer.writeheader()
        writer.writerows(cases)


def decoding_from_args(
    strategy: str, max_new_tokens: int, num_beams: int, repetition_penalty: float
) -> Decoding:
    return Decoding(
        strategy=strategy,
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        repetition_penalty=repetition_penalty,
    ).validate()

"""Label-matched image–report pairs for the embedded demo checkpoints.

No public chest X-ray set here has both images and their own reports, so the demo pairs
real NIH ChestX-ray14 images with real OpenI reports written for *other* patients who had
the same findings:

1. every OpenI report with both sections (FINDINGS and IMPRESSION) is labelled with the
   project's labeler in the ChestX-ray14 space; an empty label set is a normal report;
2. each NIH image (labels from ``labels.csv``; "No Finding" = empty set) is paired with up
   to ``k`` reports whose label set equals the image's (exact match); where none exists,
   with the reports of the nearest label set by Jaccard similarity
   J(A, B) = |A ∩ B| / |A ∪ B| (ties: fewer extra labels, then the report id); within the
   chosen set, concise reports (at most ``max_words`` words) without OpenI's redactions are
   preferred where any exist, which keeps both sections inside the demo's decoding budget
   and "[redacted]" out of the text the model learns; the least used reports of
   the pool are taken first (ties: a seeded shuffle), so reuse is spread over the pool
   instead of piling on a few texts;
3. the split is a hash of the NIH patient id, so no patient is in two splits; validation
   and test keep one report per image.

Every entry records how it was matched (``match``), so the model card can say it plainly.
"""

from __future__ import annotations

import csv
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from mrg.data.datasets import split_of, write_annotation
from mrg.data.reports import iter_openi_reports
from mrg.text.cleaning import REDACTED
from mrg.text.labeler import ReportLabeler
from mrg.text.sections import format_report
from mrg.text.taxonomy import FINDINGS14

NIH_TO_LABELER = {
    label: label for label in FINDINGS14
}  # NIH and the labeler share ChestX-ray14 names


SPLIT_RATIOS = (0.7, 0.15, 0.15)


def patient_split(patient: str, ratios: tuple[float, float, float] = SPLIT_RATIOS) -> str:
    """train / val / test from a hash of the NIH patient id."""
    return split_of(f"nih-patient-{patient}", ratios)


@dataclass
class PairSummary:
    images: int = 0
    exact: int = 0
    nearest: int = 0
    per_split: Counter = field(default_factory=Counter)
    entries: int = 0


def read_nih_labels(path: str | Path) -> list[dict]:
    """Rows of ``labels.csv`` with ``labels`` as a frozenset (empty for "No Finding")."""
    rows = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            labels = frozenset(
                x for x in row["Finding Labels"].split("|") if x and x != "No Finding"
            )
            rows.append(
                {"image": row["Image Index"], "patient": row["Patient ID"], "labels": labels}
            )
    return rows


def label_reports(
    reports_source: str | Path, labeler: ReportLabeler | None = None
) -> dict[frozenset, list[dict]]:
    """OpenI reports with FINDINGS and IMPRESSION, grouped by their ChestX-ray14 label set."""
    labeler = labeler or ReportLabeler()
    groups: dict[frozenset, list[dict]] = defaultdict(list)
    for report in iter_openi_reports(reports_source):
        if not (report.findings and report.impression):
            continue
        labels = labeler.label14(f"{report.findings} {report.impression}")
        key = frozenset(label for label in FINDINGS14 if labels[label])
        groups[key].append(
            {
                "report_id": report.report_id,
                "findings": report.findings,
                "impression": report.impression,
            }
        )
    return groups


def nearest_sets(target: frozenset, available: list[frozenset]) -> tuple[frozenset, float]:
    """The available label set most similar to ``target`` and its Jaccard similarity."""

    def rank(candidate: frozenset):
        union = target | candidate
        jaccard = len(target & candidate) / len(union) if union else 1.0
        return (-jaccard, len(candidate - target), sorted(candidate))

    best = min(available, key=rank)
    union = target | best
    return best, (len(target & best) / len(union) if union else 1.0)


def concise(reports: list[dict], max_words: int) -> list[dict]:
    """The reports of at most ``max_words`` words without redactions; else the short ones;
    else all of them."""
    texts = [format_report(r["findings"], r["impression"]) for r in reports]
    short = [r for r, t in zip(reports, texts) if len(t.split()) <= max_words]
    clean = [r for r, t in zip(reports, texts) if len(t.split()) <= max_words and REDACTED not in t]
    return clean or short or reports


def build_pairs(
    nih_dir: str | Path,
    reports_source: str | Path,
    out: str | Path,
    reports_per_image: int = 3,
    ratios: tuple[float, float, float] = SPLIT_RATIOS,
    seed: int = 0,
    max_words: int = 50,
) -> PairSummary:
    nih_dir = Path(nih_dir)
    groups = label_reports(reports_source)
    available = sorted(groups, key=lambda s: sorted(s))
    summary = PairSummary()
    uses: Counter = Counter()
    annotation: dict[str, list] = {"train": [], "val": [], "test": []}
    for row in read_nih_labels(nih_dir / "labels.csv"):
        if not (nih_dir / "images" / row["image"]).is_file():
            continue
        summary.images += 1
        target = row["labels"]
        if target in groups:
            chosen, match = target, "exact"
            summary.exact += 1
        else:
            chosen, similarity = nearest_sets(target, available)
            match = f"nearest (Jaccard {similarity:.2f}: {', '.join(sorted(chosen)) or 'normal'})"
            summary.nearest += 1
        split = patient_split(row["patient"], ratios)
        pool = sorted(concise(groups[chosen], max_words), key=lambda r: r["report_id"])
        rng = random.Random(f"{seed}-{row['image']}")
        order = {r["report_id"]: rng.random() for r in pool}
        pool.sort(key=lambda r: (uses[r["report_id"]], order[r["report_id"]]))
        picks = pool[: reports_per_image if split == "train" else 1]
        uses.update(r["report_id"] for r in picks)
        for j, pick in enumerate(picks):
            annotation[split].append(
                {
                    "id": f"{Path(row['image']).stem}#{j}",
                    "report": format_report(pick["findings"], pick["impression"]),
                    "findings": pick["findings"],
                    "impression": pick["impression"],
                    "image_path": [row["image"]],
                    "split": split,
                    "labels": sorted(target),
                    "report_id": pick["report_id"],
                    "match": match,
                }
            )
            summary.entries += 1
        summary.per_split[split] += 1
    write_annotation(annotation, out)
    return summary

"""Datasets: R2Gen ``annotation.json`` (IU X-ray, MIMIC-CXR), OpenI preparation, and batching.

An annotation entry is ``{"id", "report", "image_path": [...], "split"}`` (R2Gen), optionally
with ``"findings"`` and ``"impression"`` (written by ``prepare_openi``). In R2Gen's IU X-ray
layout the first image is the frontal view and the second the lateral.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import Dataset

from mrg.data.reports import iter_openi_reports
from mrg.data.study import Study, View, batch_tensors, eval_transform, train_transform
from mrg.data.views import Views
from mrg.imaging import ImageError, load_image
from mrg.text.sections import format_report

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
POSITIONS = ("frontal", "lateral")


@dataclass
class StudyRecord:
    """One annotated study, images not loaded yet."""

    study_id: str
    report: str
    image_paths: list[Path]
    split: str
    findings: str = ""
    impression: str = ""
    labels: list[str] = field(default_factory=list)
    report_id: str = ""  # the OpenI report (CXR<n>) the reference comes from, where known

    @property
    def target(self) -> str:
        """The training target: ``FINDINGS: … IMPRESSION: …`` where both are known, else the report."""
        if self.findings or self.impression:
            return format_report(self.findings, self.impression)
        return self.report


CASE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", "")


def folder_records(folder: str | Path) -> list[StudyRecord]:
    """One single-view case per image file of ``folder`` (PNG, JPEG, DICOM with or without
    its extension), in name order, with no reference report."""
    paths = sorted(
        p
        for p in Path(folder).iterdir()
        if p.is_file() and p.suffix.lower() in CASE_SUFFIXES and not p.name.startswith(".")
    )
    return [StudyRecord(p.stem, "", [p], "folder") for p in paths]


def load_annotation(
    path: str | Path, image_root: str | Path, split: str | None = None
) -> list[StudyRecord]:
    """Records of an R2Gen-style annotation file (all splits, or one)."""
    data = json.loads(Path(path).read_text())
    unknown = set(data) - set(SPLITS)
    if unknown:
        raise ValueError(f"{path}: unexpected split keys {sorted(unknown)}; expected {SPLITS}")
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(image_root)
    records = []
    for name in SPLITS if split is None else (split,):
        for entry in data.get(name, []):
            records.append(
                StudyRecord(
                    study_id=str(entry["id"]),
                    report=entry.get("report", ""),
                    image_paths=[root / p for p in entry["image_path"]],
                    split=name,
                    findings=entry.get("findings", ""),
                    impression=entry.get("impression", ""),
                    labels=list(entry.get("labels", [])),
                    report_id=entry.get("report_id", ""),
                )
            )
    return records


def split_of(key: str, ratios: tuple[float, float, float] = (0.7, 0.1, 0.2)) -> str:
    """Deterministic split from a SHA-1 of ``key`` (stable across machines and Python versions)."""
    bucket = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if bucket < ratios[0]:
        return "train"
    return "val" if bucket < ratios[0] + ratios[1] else "test"


@dataclass
class PrepareSummary:
    reports: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    per_split: Counter = field(default_factory=Counter)


def prepare_openi(
    reports: str | Path,
    images: str | Path,
    out: str | Path,
    require_findings: bool = True,
    ratios: tuple[float, float, float] = (0.7, 0.1, 0.2),
) -> PrepareSummary:
    """Write an ``annotation.json`` from the OpenI XML and a folder of OpenI-named PNGs.

    A study is kept when it has FINDINGS (if required) and at least one of its images
    exists as ``<images>/<parentImage id>.png``; images are listed in XML order (frontal first
    in OpenI's convention). The split is a hash of the report id, so it never changes.
    """
    images = Path(images)
    summary = PrepareSummary()
    annotation: dict[str, list] = {name: [] for name in SPLITS}
    for report in iter_openi_reports(reports):
        summary.reports += 1
        if require_findings and not report.findings:
            summary.dropped["no FINDINGS section"] += 1
            continue
        if not report.image_ids:
            summary.dropped["no images listed in the XML"] += 1
            continue
        present = [
            f"{image_id}.png"
            for image_id in report.image_ids
            if (images / f"{image_id}.png").is_file()
        ]
        if not present:
            summary.dropped["image files not found"] += 1
            continue
        split = split_of(report.report_id, ratios)
        annotation[split].append(
            {
                "id": report.report_id,
                "report": report.findings or report.impression,
                "findings": report.findings,
                "impression": report.impression,
                "image_path": present[:2],
                "split": split,
            }
        )
        summary.kept += 1
        summary.per_split[split] += 1
    write_annotation(annotation, out)
    return summary


def write_annotation(annotation: dict[str, list], out: str | Path) -> Path:
    """Write an R2Gen-style ``{"train": [...], "val": [...], "test": [...]}`` file."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(annotation, indent=1) + "\n")
    return out


class MissingImageError(FileNotFoundError):
    """An annotated image is missing or unreadable; the message names the file."""


class StudyDataset(Dataset):
    """Loads a record's views on access. ``on_missing``: ``"error"`` stops, ``"skip"`` logs and drops."""

    def __init__(self, records: Sequence[StudyRecord], on_missing: str = "error"):
        if on_missing not in ("error", "skip"):
            raise ValueError(f"on_missing must be 'error' or 'skip', got {on_missing!r}")
        self.records, self.on_missing = list(records), on_missing
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Study | None:
        record = self.records[index]
        views = []
        for position, path in zip(POSITIONS, record.image_paths):
            try:
                views.append(View(load_image(path), position))
            except ImageError as err:
                message = f"study {record.study_id}: image {path} cannot be used: {err}"
                if self.on_missing == "error":
                    raise MissingImageError(message) from err
                log.warning("skipping %s", message)
                self.skipped.append(str(path))
                return None
        return Study(views, record.study_id, record.target, record.labels)


@dataclass
class Batch:
    views: Views
    reports: list[str]
    study_ids: list[str]


class Collate:
    """Studies → ``Batch``; ``train`` adds anatomy-safe augmentation. Skipped studies (None) are dropped here."""

    def __init__(self, image_size: int, max_views: int = 2, train: bool = False):
        self.image_size, self.max_views = image_size, max_views
        self.transform = train_transform(image_size) if train else eval_transform(image_size)

    def __call__(self, studies: Sequence[Study | None]) -> Batch | None:
        studies = [s for s in studies if s is not None]
        if not studies:
            return None
        views = batch_tensors(studies, self.image_size, self.max_views, self.transform)
        return Batch(views, [s.report for s in studies], [s.study_id for s in studies])

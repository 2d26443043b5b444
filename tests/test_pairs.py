"""Label-matched NIH image / OpenI report pairs for the demo checkpoints (real shared data)."""

import csv
import json
from collections import defaultdict

import pytest
from conftest import shared_path

from mrg.data.pairs import build_pairs, concise, label_reports, nearest_sets
from mrg.text.labeler import ReportLabeler
from mrg.text.taxonomy import FINDINGS14


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs") / "annotation.json"
    summary = build_pairs(
        shared_path("nih_cxr14"), shared_path("iu_xray", "NLMCXR_reports.tgz"), out, 2
    )
    return summary, json.loads(out.read_text())


def test_every_image_is_paired_and_counted(pairs):
    summary, annotation = pairs
    images = shared_path("nih_cxr14", "images")
    with open(shared_path("nih_cxr14", "labels.csv"), newline="") as handle:
        listed = [row["Image Index"] for row in csv.DictReader(handle)]
    on_disk = sum((images / name).is_file() for name in listed)
    assert on_disk == len(listed) > 0, "labels.csv lists images that are not in images/"
    assert summary.images == on_disk == summary.exact + summary.nearest
    assert summary.exact > summary.nearest
    assert sum(len(v) for v in annotation.values()) == summary.entries


def test_no_patient_is_in_two_splits(pairs):
    _, annotation = pairs
    patient_of = {}
    with open(shared_path("nih_cxr14", "labels.csv"), newline="") as handle:
        for row in csv.DictReader(handle):
            patient_of[row["Image Index"]] = row["Patient ID"]
    splits = defaultdict(set)
    for split, entries in annotation.items():
        for entry in entries:
            splits[patient_of[entry["image_path"][0]]].add(split)
    assert all(len(s) == 1 for s in splits.values())


def test_exact_pairs_carry_reports_with_the_same_labels(pairs):
    _, annotation = pairs
    labeler = ReportLabeler()
    exact = [e for e in annotation["train"] if e["match"] == "exact"][:60]
    assert exact
    for entry in exact:
        labels = labeler.label14(f"{entry['findings']} {entry['impression']}")
        assert sorted(k for k in FINDINGS14 if labels[k]) == entry["labels"]
        assert entry["report"].startswith("FINDINGS: ") and "IMPRESSION: " in entry["report"]


def test_held_out_splits_keep_one_report_per_image(pairs):
    _, annotation = pairs
    for split in ("val", "test"):
        images = [e["image_path"][0] for e in annotation[split]]
        assert len(images) == len(set(images)) > 0


def test_nearest_set_by_jaccard():
    target = frozenset({"Atelectasis", "Effusion", "Mass"})
    available = [
        frozenset(),
        frozenset({"Effusion"}),
        frozenset({"Atelectasis", "Effusion"}),
        frozenset({"Mass", "Nodule"}),
    ]
    best, similarity = nearest_sets(target, available)
    assert best == frozenset({"Atelectasis", "Effusion"}) and similarity == pytest.approx(2 / 3)


def test_long_reports_are_paired_only_where_no_concise_one_matches(pairs):
    _, annotation = pairs
    groups = label_reports(shared_path("iu_xray", "NLMCXR_reports.tgz"))
    group_of = {r["report_id"]: key for key, reports in groups.items() for r in reports}
    entries = [e for split in annotation.values() for e in split]
    long = [e for e in entries if len(e["report"].split()) > 50]
    assert len(long) < 0.2 * len(entries)
    for entry in long:
        assert (
            concise(groups[group_of[entry["report_id"]]], 50)
            == groups[group_of[entry["report_id"]]]
        )


def test_concise_falls_back_to_every_report():
    long = {"findings": "word " * 60, "impression": "Normal."}
    short = {"findings": "Clear lungs.", "impression": "Normal."}
    assert concise([long, short], 50) == [short]
    assert concise([long], 50) == [long]


def test_reuse_is_spread_evenly_over_each_pool(pairs):
    """The least used reports of a pool are taken first: within a pool, uses differ by ≤ 1."""
    _, annotation = pairs
    groups = label_reports(shared_path("iu_xray", "NLMCXR_reports.tgz"))
    group_of = {r["report_id"]: key for key, reports in groups.items() for r in reports}
    uses = defaultdict(int)
    for entry in (e for split in annotation.values() for e in split):
        uses[entry["report_id"]] += 1
    for key in {group_of[report_id] for report_id in uses}:
        counts = [uses[r["report_id"]] for r in concise(groups[key], 50)]
        assert max(counts) - min(counts) <= 1, (sorted(key), counts)

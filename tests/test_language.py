"""The report-language corpus: every OpenI report with both sections, minus held-out references."""

import json
from collections import Counter

from conftest import shared_path

from mrg.data.datasets import StudyRecord, load_annotation
from mrg.data.language import HeldOut, normalise, report_corpus
from mrg.data.reports import iter_openi_reports
from mrg.text.cleaning import REDACTED
from mrg.text.sections import format_report


def record(study_id, split, report="", report_id=""):
    return StudyRecord(study_id, report, [], split, report_id=report_id)


def test_held_out_knows_reports_by_id_and_by_text_only_where_no_id_is_known():
    held = HeldOut.from_records(
        [
            record("00001_000.png#0", "test", "FINDINGS: a.\nIMPRESSION: b.", report_id="CXR7"),
            record("CXR12_IM-0001-1001", "val", "Heart normal."),  # R2Gen's IU X-ray id
            record("mimic-1", "test", "Lungs clear."),  # no report id: its text
            record("CXR99_IM-0002", "train", "Train report."),
        ]
    )
    assert held.report_ids == {"CXR7", "CXR12"}
    assert held.texts == {normalise("Lungs clear.")}


def test_the_corpus_leaves_out_every_held_out_report_of_the_shared_data():
    reports = shared_path("iu_xray", "NLMCXR_reports.tgz")
    iu = load_annotation(shared_path("iu_xray", "annotation.json"), ".")
    held = HeldOut.from_records(iu)
    corpus = report_corpus(reports, held)
    texts = set(corpus.train) | set(corpus.val)
    by_id = {r.report_id: r for r in iter_openi_reports(reports)}
    held_reports = [by_id[i] for i in held.report_ids if i in by_id]
    with_sections = [r for r in held_reports if r.findings and r.impression]
    assert len(with_sections) == corpus.held_out > 500
    # Not one of them; by id, so identically worded reports of other studies may stay.
    wording = Counter(normalise(format_report(r.findings, r.impression)) for r in by_id.values())
    unique = [
        r for r in with_sections if wording[normalise(format_report(r.findings, r.impression))] == 1
    ]
    assert unique and not any(format_report(r.findings, r.impression) in texts for r in unique)
    assert not any(REDACTED in t for t in texts)
    assert all(t.startswith("FINDINGS: ") and "\nIMPRESSION: " in t for t in texts)
    assert len(corpus.train) > 1000 and len(corpus.val) > 30


def test_the_pairs_held_out_references_never_reach_the_language_stage(tmp_path):
    reports = shared_path("iu_xray", "NLMCXR_reports.tgz")
    by_id = {r.report_id: r for r in iter_openi_reports(reports) if r.findings and r.impression}
    ids = sorted(by_id)[:40]
    entries = {
        split: [
            {"id": f"img{i}#0", "report": "x", "image_path": ["a.png"], "report_id": rid}
            for i, rid in enumerate(ids[k::3])
        ]
        for k, split in enumerate(("train", "val", "test"))
    }
    path = tmp_path / "annotation.json"
    path.write_text(json.dumps(entries))
    corpus = report_corpus(reports, HeldOut.from_records(load_annotation(path, ".")))
    held = [by_id[rid] for rid in ids[1::3] + ids[2::3]]
    assert corpus.held_out == len(held)
    kept = set(corpus.train) | set(corpus.val)
    train_clean = [by_id[rid] for rid in ids[0::3]]
    assert any(format_report(r.findings, r.impression) in kept for r in train_clean)

"""Report cleaning (R2Gen), sections from OpenI XML, dataset preparation and batching, on real data."""

import json
import re

import pytest
import torch
from conftest import shared_path

from mrg.cli import main as cli_main
from mrg.data.datasets import (
    Collate,
    MissingImageError,
    StudyDataset,
    load_annotation,
    prepare_openi,
    split_of,
)
from mrg.data.reports import iter_openi_reports, parse_openi_xml
from mrg.text.cleaning import (
    clean_report_iu_xray,
    clean_report_mimic_cxr,
    display_form,
    split_sentences,
)


# R2Gen's own code (modules/tokenizers.py), verbatim but for raw-string regexes, as the oracle.
# fmt: off
def r2gen_clean_report_iu_xray(report):
    report_cleaner = lambda t: t.replace('..', '.').replace('..', '.').replace('..', '.').replace('1. ', '') \
        .replace('. 2. ', '. ').replace('. 3. ', '. ').replace('. 4. ', '. ').replace('. 5. ', '. ') \
        .replace(' 2. ', '. ').replace(' 3. ', '. ').replace(' 4. ', '. ').replace(' 5. ', '. ') \
        .strip().lower().split('. ')
    sent_cleaner = lambda t: re.sub(r'[.,?;*!%^&_+():-\[\]{}]', '', t.replace('"', '').replace('/', '').
                                    replace('\\', '').replace("'", '').strip().lower())
    tokens = [sent_cleaner(sent) for sent in report_cleaner(report) if sent_cleaner(sent) != []]
    report = ' . '.join(tokens) + ' .'
    return report


def r2gen_clean_report_mimic_cxr(report):
    report_cleaner = lambda t: t.replace('\n', ' ').replace('__', '_').replace('__', '_').replace('__', '_') \
        .replace('__', '_').replace('__', '_').replace('__', '_').replace('__', '_').replace('  ', ' ') \
        .replace('  ', ' ').replace('  ', ' ').replace('  ', ' ').replace('  ', ' ').replace('  ', ' ') \
        .replace('..', '.').replace('..', '.').replace('..', '.').replace('..', '.').replace('..', '.') \
        .replace('..', '.').replace('..', '.').replace('..', '.').replace('1. ', '').replace('. 2. ', '. ') \
        .replace('. 3. ', '. ').replace('. 4. ', '. ').replace('. 5. ', '. ').replace(' 2. ', '. ') \
        .replace(' 3. ', '. ').replace(' 4. ', '. ').replace(' 5. ', '. ') \
        .strip().lower().split('. ')
    sent_cleaner = lambda t: re.sub(r'[.,?;*!%^&_+():-\[\]{}]', '', t.replace('"', '').replace('/', '')
                                    .replace('\\', '').replace("'", '').strip().lower())
    tokens = [sent_cleaner(sent) for sent in report_cleaner(report) if sent_cleaner(sent) != []]
    report = ' . '.join(tokens) + ' .'
    return report
# fmt: on


@pytest.fixture(scope="module")
def annotation():
    return json.loads(shared_path("iu_xray", "annotation.json").read_text())


@pytest.fixture(scope="module")
def openi_reports():
    return list(iter_openi_reports(shared_path("iu_xray", "NLMCXR_reports.tgz")))


def test_cleaning_matches_r2gen_on_every_shared_report(annotation):
    reports = [e["report"] for split in annotation.values() for e in split]
    assert len(reports) == 2955
    for report in reports:
        assert clean_report_iu_xray(report) == r2gen_clean_report_iu_xray(report)


def test_mimic_cleaning_matches_r2gen_on_awkward_text(annotation):
    awkward = [
        "FINDINGS:\n\n1. Lungs  clear..  2. No effusion__ seen. 3. Heart   normal.",
        "___ Comparison: ___. \n IMPRESSION: 1. No acute process.. 2. Stable.",
    ] + [e["report"] for e in annotation["test"][:50]]
    for report in awkward:
        assert clean_report_mimic_cxr(report) == r2gen_clean_report_mimic_cxr(report)


def test_cleaned_text_is_lower_case_and_sentence_joined():
    text = "The heart is normal. 2. No effusion, pneumothorax (left)."
    assert clean_report_iu_xray(text) == "the heart is normal . no effusion pneumothorax left ."


def test_openi_counts_match_the_collection(openi_reports):
    assert len(openi_reports) == 3955
    assert sum(bool(r.findings) for r in openi_reports) == 3425
    assert sum(bool(r.impression) for r in openi_reports) == 3921


def test_openi_sections_and_images_are_parsed(openi_reports):
    first = openi_reports[0]
    assert first.report_id == "CXR1"
    assert first.findings.startswith(
        "The cardiac silhouette and mediastinum size are within normal limits."
    )
    assert first.impression == "Normal chest x-[redacted]."
    assert first.indication == "Positive TB test" and first.comparison == "None."
    assert first.image_ids == ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"]


def test_r2gen_split_sizes(annotation):
    assert {k: len(v) for k, v in annotation.items()} == {"train": 2069, "val": 296, "test": 590}


def test_sentence_splitting():
    text = "The heart is normal in size. There is no effusion. 1. Small nodule. Dr. [redacted] was called."
    assert split_sentences(text) == [
        "The heart is normal in size.",
        "There is no effusion.",
        "1. Small nodule.",
        "Dr. [redacted] was called.",
    ]
    assert display_form("Normal  chest x-XXXX.") == "Normal chest x-[redacted]."


def test_an_extracted_folder_reads_like_the_archive(tmp_path):
    import tarfile

    with tarfile.open(shared_path("iu_xray", "NLMCXR_reports.tgz")) as archive:
        members = [
            m for m in archive.getmembers() if m.name.endswith(("/1.xml", "/2.xml", "/10.xml"))
        ]
        archive.extractall(tmp_path, members=members, filter="data")
    reports = list(iter_openi_reports(tmp_path))
    assert [r.report_id for r in reports] == ["CXR1", "CXR2", "CXR10"]  # numeric file order


def test_parse_minimal_xml_without_sections():
    report = parse_openi_xml('<eCitation><uId id="CXR9"/><Abstract/></eCitation>')
    assert report.report_id == "CXR9" and report.findings == "" and report.image_ids == []


def _fake_openi_images(folder, reports, every=3):
    """Write a tiny PNG for the first image of every ``every``-th report (the rest are 'missing')."""
    from PIL import Image

    folder.mkdir()
    written = 0
    for i, report in enumerate(reports):
        if i % every == 0 and report.image_ids:
            Image.new("L", (8, 8)).save(folder / f"{report.image_ids[0]}.png")
            written += 1
    return written


def test_prepare_openi_reports_what_it_kept_and_why(tmp_path, openi_reports):
    images = tmp_path / "images"
    _fake_openi_images(images, openi_reports)
    out = tmp_path / "annotation.json"
    reports = shared_path("iu_xray", "NLMCXR_reports.tgz")
    summary = prepare_openi(reports, images, out)
    assert summary.reports == 3955
    assert summary.dropped["no FINDINGS section"] == 530
    assert summary.kept + sum(summary.dropped.values()) == 3955
    assert summary.kept == sum(summary.per_split.values()) > 0
    data = json.loads(out.read_text())
    entry = data["train"][0]
    assert entry["findings"] and entry["report"] == entry["findings"] and entry["split"] == "train"
    assert all(
        (images / p).is_file() for split in data.values() for e in split for p in e["image_path"]
    )
    # deterministic: the same split again, and by hash of the id
    prepare_openi(reports, images, tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text()) == data
    assert all(split_of(e["id"]) == name for name, entries in data.items() for e in entries)
    records = load_annotation(out, images, split="train")
    assert (
        records[0].target.startswith("FINDINGS: ")
        and "IMPRESSION: " in records[0].target
        or records[0].impression == ""
    )


def test_prepare_cli_prints_the_summary(tmp_path, openi_reports, capsys):
    images = tmp_path / "images"
    _fake_openi_images(images, openi_reports, every=50)
    code = cli_main(
        [
            "prepare",
            "iu-xray",
            "--reports",
            str(shared_path("iu_xray", "NLMCXR_reports.tgz")),
            "--images",
            str(images),
            "--out",
            str(tmp_path / "a.json"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "dropped: no FINDINGS section" in out and "kept" in out


def test_dataset_and_collate_on_real_studies():
    records = load_annotation(
        shared_path("iu_xray", "annotation_sample.json"), shared_path("iu_xray", "images")
    )
    assert len(records) == 3 and all(r.split == "test" for r in records)
    dataset = StudyDataset(records)
    studies = [dataset[i] for i in range(len(dataset))]
    assert [v.position for v in studies[0].views] == ["frontal", "lateral"]
    batch = Collate(image_size=64)(studies)
    assert batch.views.images.shape == (3, 2, 1, 64, 64) and batch.views.mask.all()
    assert batch.views.ids.tolist() == [[0, 1]] * 3
    assert batch.reports[0] == records[0].report
    torch.manual_seed(0)
    augmented = Collate(image_size=64, train=True)(studies)
    assert augmented.views.images.shape == batch.views.images.shape and not torch.equal(
        augmented.views.images, batch.views.images
    )


def test_missing_image_stops_or_is_skipped_with_its_path(tmp_path, caplog):
    records = load_annotation(
        shared_path("iu_xray", "annotation_sample.json"), shared_path("iu_xray", "images")
    )
    records[1].image_paths[1] = tmp_path / "gone.png"
    with pytest.raises(MissingImageError, match="gone.png"):
        StudyDataset(records)[1]
    dataset = StudyDataset(records, on_missing="skip")
    assert dataset[1] is None and dataset.skipped == [str(tmp_path / "gone.png")]
    assert "gone.png" in caplog.text
    batch = Collate(64)([dataset[0], dataset[1], dataset[2]])
    assert len(batch.study_ids) == 2

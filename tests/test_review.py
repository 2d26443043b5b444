"""Review store: validation, replace-on-resave, persistence across reopen, export, no PHI."""

import csv
import json

import pytest

from mrg.review import Review, ReviewError, ReviewStore


def review(**overrides):
    values = {
        "session": "s1",
        "case_key": "sha256:abc",
        "mode": "prompt-wise",
        "reviewer": "Dr A",
        "verdict": "minor error",
        "categories": ["missed finding"],
        "note": "missed the effusion",
        "generated": "FINDINGS: x",
        "reference": "y",
    }
    values.update(overrides)
    return Review(**values)


def test_save_reopen_and_replace(tmp_path):
    store = ReviewStore(tmp_path / "reviews.sqlite")
    store.save(review())
    store.save(review(case_key="dataset:test:CXR1", verdict="acceptable", categories=[]))
    reopened = ReviewStore(tmp_path / "reviews.sqlite")  # as after an app restart
    assert [r.case_key for r in reopened.reviews("s1")] == ["sha256:abc", "dataset:test:CXR1"]
    reopened.save(review(verdict="major error", note="changed my mind"))
    rows = reopened.reviews("s1")
    assert (
        len(rows) == 2 and rows[-1].verdict == "major error" and rows[-1].note == "changed my mind"
    )
    assert reopened.reviewed_keys("s1") == {"sha256:abc", "dataset:test:CXR1"}
    assert reopened.reviews("other") == []


def test_wal_mode(tmp_path):
    import sqlite3

    ReviewStore(tmp_path / "r.sqlite")
    assert (
        sqlite3.connect(tmp_path / "r.sqlite").execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"reviewer": " "}, "reviewer name"),
        ({"case_key": ""}, "Load a study"),
        ({"verdict": "fine"}, "Choose a verdict"),
        ({"categories": ["typo"]}, "Unknown error categories"),
        ({"verdict": "acceptable"}, "no error categories"),
    ],
)
def test_invalid_reviews_are_refused_with_a_reason(tmp_path, overrides, message):
    with pytest.raises(ReviewError, match=message):
        ReviewStore(tmp_path / "r.sqlite").save(review(**overrides))


def test_export_csv_and_json(tmp_path):
    store = ReviewStore(tmp_path / "r.sqlite")
    store.save(review())
    rows = list(csv.DictReader(store.export_csv(tmp_path / "r.csv").open()))
    assert rows[0]["verdict"] == "minor error" and rows[0]["categories"] == "missed finding"
    data = json.loads(store.export_json(tmp_path / "r.json").read_text())
    assert data[0]["categories"] == ["missed finding"] and data[0]["reviewer"] == "Dr A"
    assert set(data[0]) == set(
        Review.__dataclass_fields__
    )  # no column beyond the review's own fields

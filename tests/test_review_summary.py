"""The session summary's statistics against values computed by hand, and the blinded store."""

import pytest

from mrg.review import Review, ReviewError, ReviewStore, blinding_for
from mrg.review_summary import (
    cohen_kappa,
    preference_test,
    reviewer_agreement,
    verdict_counts,
)

PW, PB = "prompt-wise", "promptbook-wise"


def test_cohen_kappa_by_hand():
    x = ["acceptable", "acceptable", "minor error", "major error", "acceptable"]
    y = ["acceptable", "minor error", "minor error", "major error", "major error"]
    # p_o = 3/5; p_e = 3/5·1/5 + 1/5·2/5 + 1/5·2/5 = 0.28; κ = (0.6 − 0.28) / 0.72
    assert cohen_kappa(x, y) == pytest.approx(0.32 / 0.72)
    assert cohen_kappa(x, x) == pytest.approx(1.0)
    assert cohen_kappa(["acceptable"] * 3, ["acceptable"] * 3) is None  # p_e = 1
    with pytest.raises(ValueError):
        cohen_kappa(x, y[:2])


def test_binomial_preference_test_by_hand():
    result = preference_test([PW] * 8 + [PB] * 2 + [None] * 3, PW, PB)
    assert (result.wins, result.losses, result.ties, result.decided) == (8, 2, 3, 10)
    assert result.share == pytest.approx(0.8)
    # two-sided: 2 · P(X ≥ 8 | n = 10, p = 1/2) = 2 · (45 + 10 + 1) / 1024
    assert result.p_value == pytest.approx(112 / 1024)
    # Clopper–Pearson: Beta(0.025; 8, 3) and Beta(0.975; 9, 2)
    assert result.ci95 == pytest.approx((0.44390, 0.97479), abs=1e-5)
    assert preference_test([PW] * 9 + [PB], PW, PB).p_value == pytest.approx(22 / 1024)
    ties_only = preference_test([None, None], PW, PB)
    assert ties_only.share is None and ties_only.p_value is None
    with pytest.raises(ValueError):
        preference_test(["static"], PW, PB)


def review(case, mode, reviewer, verdict, categories=()):
    return Review("s", case, mode, reviewer, verdict, list(categories))


def test_agreement_pairs_reviewers_on_the_cases_both_reviewed():
    x = ["acceptable", "acceptable", "minor error", "major error", "acceptable"]
    y = ["acceptable", "minor error", "minor error", "major error", "major error"]
    reviews = [review(f"c{i}", PW, "Dr X", v) for i, v in enumerate(x)]
    reviews += [review(f"c{i}", PW, "Dr Y", v) for i, v in enumerate(y)]
    reviews += [review("c9", PW, "Dr Y", "acceptable"), review("c0", PB, "Dr Z", "acceptable")]
    (agreement,) = reviewer_agreement(reviews)  # Dr Z shares no (case, mode) with anyone
    assert agreement.reviewers == ("Dr X", "Dr Y") and agreement.cases == 5
    assert agreement.observed == pytest.approx(0.6)
    assert agreement.kappa == pytest.approx(0.32 / 0.72)


def test_verdict_and_category_counts_per_mode():
    reviews = [
        review("c1", PW, "a", "acceptable"),
        review("c2", PW, "a", "major error", ["missed finding", "wrong severity"]),
        review("c1", PB, "a", "minor error", ["missed finding"]),
    ]
    counts = verdict_counts(reviews)
    assert counts[PW]["acceptable"] == 1 and counts[PW]["major error"] == 1
    assert counts[PW]["missed finding"] == 1 and counts[PW]["wrong severity"] == 1
    assert counts[PB]["minor error"] == 1 and counts[PB]["acceptable"] == 0


def test_blinding_is_seeded_per_case_balanced_and_stored(tmp_path):
    orders = [blinding_for("s", f"case{i}", (PW, PB)).report_a for i in range(200)]
    assert 70 < orders.count(PW) < 130  # a fair coin per case
    assert blinding_for("s", "case1", (PW, PB)) == blinding_for("s", "case1", (PW, PB))
    store = ReviewStore(tmp_path / "r.sqlite")
    shown = store.blinding("s", "case1", (PW, PB))
    reopened = ReviewStore(tmp_path / "r.sqlite")  # a restart sees the order that was shown
    assert reopened.blinding("s", "case1", (PB, PW)) == shown


def test_preferences_are_stored_as_seen_and_unblinded_on_read(tmp_path):
    store = ReviewStore(tmp_path / "r.sqlite")
    with pytest.raises(ReviewError, match="not shown blinded"):
        store.save_preference("s", "case1", "Dr X", "A")
    shown = store.blinding("s", "case1", (PW, PB))
    store.save_preference("s", "case1", "Dr X", "A")
    store.save_preference("s", "case1", "Dr X", "B")  # changed their mind: replaced
    store.blinding("s", "case2", (PW, PB))
    store.save_preference("s", "case2", "Dr X", "equal")
    with pytest.raises(ReviewError, match="Choose a preference"):
        store.save_preference("s", "case2", "Dr X", "prompt-wise")
    first, second = store.preferences("s")
    assert first["preferred"] == "B" and first["preferred_mode"] == shown.report_b
    assert second["preferred_mode"] is None

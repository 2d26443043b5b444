"""What a review session found: verdict and error counts per mode, the blinded A/B
preference with an exact binomial test, and agreement between reviewers.

* Preference (sign test): ties ("equal") are left out; of the ``n`` decided cases, ``k``
  prefer the first mode. Under H0 both modes are equally good, ``k ~ Binomial(n, 1/2)``;
  the p-value is the two-sided exact test, the interval the Clopper–Pearson 95 % interval
  for the share ``k / n`` (``scipy.stats.binomtest``).
* Agreement: Cohen's κ = (p_o − p_e) / (1 − p_e) over the verdicts two reviewers gave to the
  same (case, mode), p_o the observed agreement, p_e the agreement expected from each
  reviewer's own verdict frequencies (``sklearn.metrics.cohen_kappa_score``).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from mrg.review import ERROR_CATEGORIES, VERDICTS, Review


@dataclass(frozen=True)
class PreferenceTest:
    """``first`` preferred in ``wins`` cases, ``second`` in ``losses``, ``ties`` equal."""

    first: str
    second: str
    wins: int
    losses: int
    ties: int
    share: float | None  # wins / (wins + losses); None when every case was a tie
    p_value: float | None
    ci95: tuple[float, float] | None

    @property
    def decided(self) -> int:
        return self.wins + self.losses


@dataclass(frozen=True)
class Agreement:
    """Cohen's κ of two reviewers' verdicts over the ``cases`` (case, mode) both reviewed."""

    reviewers: tuple[str, str]
    cases: int
    observed: float
    kappa: float | None  # None when fewer than two cases, or both gave one verdict throughout


def preference_test(
    preferred_modes: Iterable[str | None], first: str, second: str
) -> PreferenceTest:
    """``preferred_modes``: per case the mode preferred, unblinded, or None for equal."""
    from scipy.stats import binomtest

    counts = Counter(preferred_modes)
    unknown = set(counts) - {first, second, None}
    if unknown:
        raise ValueError(f"preferences for modes other than {first} and {second}: {unknown}")
    wins, losses, ties = counts[first], counts[second], counts[None]
    if wins + losses == 0:
        return PreferenceTest(first, second, wins, losses, ties, None, None, None)
    test = binomtest(wins, wins + losses, 0.5)
    interval = test.proportion_ci(0.95, method="exact")
    return PreferenceTest(
        first,
        second,
        wins,
        losses,
        ties,
        wins / (wins + losses),
        float(test.pvalue),
        (float(interval.low), float(interval.high)),
    )


def cohen_kappa(first: list[str], second: list[str]) -> float | None:
    """κ of two raters over the same items; None where it is undefined (p_e = 1)."""
    from sklearn.metrics import cohen_kappa_score

    if len(first) != len(second):
        raise ValueError("both raters must rate the same items")
    if len(first) < 2 or len(set(first) | set(second)) < 2:
        return None
    return float(cohen_kappa_score(first, second, labels=list(VERDICTS)))


def reviewer_agreement(reviews: Iterable[Review]) -> list[Agreement]:
    """κ for every pair of reviewers who reviewed at least one same (case, mode)."""
    by_reviewer: dict[str, dict[tuple[str, str], str]] = {}
    for review in reviews:
        by_reviewer.setdefault(review.reviewer, {})[(review.case_key, review.mode)] = review.verdict
    agreements = []
    for a, b in itertools.combinations(sorted(by_reviewer), 2):
        shared = sorted(set(by_reviewer[a]) & set(by_reviewer[b]))
        if not shared:
            continue
        first = [by_reviewer[a][key] for key in shared]
        second = [by_reviewer[b][key] for key in shared]
        observed = sum(x == y for x, y in zip(first, second)) / len(shared)
        agreements.append(Agreement((a, b), len(shared), observed, cohen_kappa(first, second)))
    return agreements


def verdict_counts(reviews: Iterable[Review]) -> dict[str, dict[str, int]]:
    """Per mode, how many reports got each verdict and each error category."""
    counts: dict[str, Counter] = {}
    for review in reviews:
        mode = counts.setdefault(review.mode, Counter())
        mode[review.verdict] += 1
        mode.update(review.categories)
    return {
        mode: {name: counter[name] for name in (*VERDICTS, *ERROR_CATEGORIES)}
        for mode, counter in sorted(counts.items())
    }


@dataclass(frozen=True)
class SessionSummary:
    """A session's numbers: what the page's summary shows and the JSON export holds."""

    verdicts: dict[str, dict[str, int]]
    preference: PreferenceTest | None  # None where no case was shown blinded
    agreement: list[Agreement]

    def to_dict(self) -> dict:
        return {
            "verdicts": self.verdicts,
            "preference": asdict(self.preference) if self.preference else None,
            "agreement": [asdict(a) for a in self.agreement],
        }


def summarize(
    reviews: Sequence[Review], preferred_modes: Sequence[str | None], modes: tuple[str, str]
) -> SessionSummary:
    """``preferred_modes``: the unblinded preference of every blinded case (None: equal)."""
    return SessionSummary(
        verdict_counts(reviews),
        preference_test(preferred_modes, *modes) if preferred_modes else None,
        reviewer_agreement(reviews),
    )

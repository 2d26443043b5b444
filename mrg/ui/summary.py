"""The review session's summary and exports: verdicts and error categories per mode, the
blinded A/B preference with its binomial test, Cohen's κ between reviewers (``summary``, as
Markdown and a figure), and the reviews as CSV or JSON (``export``). ``ReviewPanel`` holds
these handlers; the modes are named here, whatever the page showed."""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path

from mrg.config import CUSTOMIZED_MODES
from mrg.review import ERROR_CATEGORIES, VERDICTS
from mrg.ui.common import session_name


class ReviewSummary:
    """Summary and export handlers over ``self.store`` (a ``ReviewStore``)."""

    def _summarize(self, session: str):
        """(reviews, unblinded preferences, ``SessionSummary``) of ``session``."""
        from mrg.review_summary import summarize

        reviews = self.store.reviews(session)
        preferences = self.store.preferences(session)
        preferred = [p["preferred_mode"] for p in preferences]
        return reviews, preferences, summarize(reviews, preferred, CUSTOMIZED_MODES)

    def summary(self, session: str):
        """(Markdown, figure): verdicts and error categories per mode, the A/B preference
        with its binomial test, and Cohen's κ between reviewers; the modes are named."""
        session = session_name(session)
        reviews, preferences, numbers = self._summarize(session)
        if not reviews:
            return f"No reviews in session “{session}” yet.", None
        columns = (*VERDICTS, *ERROR_CATEGORIES)
        lines = [
            f"### Session “{session}”: {len(reviews)} reviews",
            "| mode | " + " | ".join(columns) + " |",
            "|---|" + "---:|" * len(columns),
        ]
        lines += [
            f"| {mode} | " + " | ".join(str(row[c]) for c in columns) + " |"
            for mode, row in numbers.verdicts.items()
        ]
        test = numbers.preference
        if test is not None:
            lines.append(
                f"\n**Blinded preference** ({len(preferences)} cases): {test.first} preferred "
                f"{test.wins}×, {test.second} {test.losses}×, equal {test.ties}×."
            )
            if test.share is not None:
                lines.append(
                    f"Share preferring {test.first}: {test.share:.2f} (95 % CI "
                    f"{test.ci95[0]:.2f}–{test.ci95[1]:.2f}, Clopper–Pearson); exact two-sided "
                    f"binomial test against 0.5: p = {test.p_value:.3g}."
                )
        if numbers.agreement:
            lines += [
                "\n**Agreement between reviewers** (verdicts on the same case and mode)",
                "| reviewers | cases | observed agreement | Cohen's κ |",
                "|---|---:|---:|---:|",
            ]
            lines += [
                f"| {a.reviewers[0]} & {a.reviewers[1]} | {a.cases} | {a.observed:.2f} | "
                + ("—" if a.kappa is None else f"{a.kappa:.2f}")
                + " |"
                for a in numbers.agreement
            ]
        return "\n".join(lines), self._summary_figure(numbers.verdicts, test)

    @staticmethod
    def _summary_figure(counts: dict, test):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = 2 if test is not None else 1
        figure, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 3), squeeze=False)
        modes = list(counts)
        bottom = [0] * len(modes)
        colours = {"acceptable": "#1b7f3b", "minor error": "#e0a100", "major error": "#b00020"}
        for verdict in VERDICTS:
            heights = [counts[m][verdict] for m in modes]
            axes[0][0].bar(modes, heights, bottom=bottom, label=verdict, color=colours[verdict])
            bottom = [b + h for b, h in zip(bottom, heights)]
        axes[0][0].set_title("Verdicts per mode")
        axes[0][0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        if test is not None:
            axes[0][1].bar(
                [test.first, test.second, "equal"],
                [test.wins, test.losses, test.ties],
                color=["#3060a0", "#a05030", "#888888"],
            )
            axes[0][1].set_title("Blinded preference")
        figure.tight_layout()
        plt.close(figure)
        return figure

    def export(self, session: str, fmt: str) -> str:
        """The session's reviews as CSV, or everything as JSON: reviews, the unblinded
        preferences and the summary's numbers."""
        session = session_name(session)
        directory = Path(tempfile.mkdtemp(prefix="mrg-reviews-"))
        path = directory / f"reviews-{session}.{fmt}"
        if fmt == "csv":
            return str(self.store.export_csv(path, session))
        reviews, preferences, numbers = self._summarize(session)
        data = {
            "session": session,
            "reviews": [asdict(r) for r in reviews],
            "preferences": preferences,
            "summary": numbers.to_dict(),
        }
        path.write_text(json.dumps(data, indent=2) + "\n")
        return str(path)

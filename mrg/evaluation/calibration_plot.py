"""The findings head's reliability diagram (the model card's picture of its calibration)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def reliability_figure(calibration: dict) -> plt.Figure:
    """Observed rate against mean probability per bin, before and after calibration, from
    ``mrg.train.findings.calibration_report``'s ``reliability`` bins (pooled over the 14
    findings); each point's area is its bin's count."""
    figure, axis = plt.subplots(figsize=(4.6, 4.2))
    axis.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect")
    for name, colour in (("before", "tab:red"), ("after", "tab:blue")):
        report = calibration[name]
        bins = report["reliability"]
        axis.plot(
            [b["mean_p"] for b in bins],
            [b["rate"] for b in bins],
            marker="o",
            color=colour,
            label=f"{name}: ECE {report['ece']:.3f}, Brier {report['brier']:.3f}",
        )
        axis.scatter(
            [b["mean_p"] for b in bins],
            [b["rate"] for b in bins],
            s=[4 + b["count"] / 4 for b in bins],
            color=colour,
            alpha=0.3,
        )
    axis.set(
        xlim=(0, 1),
        ylim=(0, 1),
        xlabel="predicted probability (bin mean)",
        ylabel="observed rate",
        title="Findings head on the NIH test split (14 findings)",
    )
    axis.legend(loc="upper left", fontsize=8)
    return figure

"""The findings head's cross-validation as a picture: per finding, each chosen recipe's
out-of-fold AUROC with its 95 % bootstrap interval (``assets/findings_cv.png``)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from mrg.text.taxonomy import FINDINGS14


def forest_figure(record: dict, rows: list[str]):
    """A forest plot: findings down, AUROC across, one marker and interval per row; the
    mean over findings at the bottom."""
    labels = [*FINDINGS14, "mean"]
    figure, axis = plt.subplots(figsize=(6.2, 0.34 * len(labels) + 1.2))
    offsets = [0.18 * (i - (len(rows) - 1) / 2) for i in range(len(rows))]
    for offset, name in zip(offsets, rows):
        f = record["rows"][name]
        scores = [f["auroc"][x] for x in FINDINGS14] + [f["mean_auroc"]]
        values = [float("nan") if v is None else v for v in scores]  # no positives: no marker
        bounds = [f["auroc_interval"].get(x, (v, v)) for x, v in zip(labels, values)]
        ys = [len(labels) - 1 - i + offset for i in range(len(labels))]
        axis.errorbar(
            values,
            ys,
            xerr=[
                [v - b[0] for v, b in zip(values, bounds)],
                [b[1] - v for v, b in zip(values, bounds)],
            ],
            fmt="o",
            markersize=4,
            capsize=2,
            label=name,
        )
    axis.axvline(0.5, color="0.6", linestyle="--", linewidth=1)
    axis.set_yticks(range(len(labels)), list(reversed(labels)))
    axis.set_xlabel("out-of-fold AUROC (95 % bootstrap interval)")
    axis.set_xlim(0.3, 1.0)
    axis.legend(loc="lower right", fontsize=8)
    axis.set_title(f"Findings head, {record['folds']} folds by patient, {record['images']} images")
    figure.tight_layout()
    return figure

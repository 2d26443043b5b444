"""The findings head's cross-validation as Markdown (``assets/findings_cv.json``, written by
``scripts/findings_cv.py``): one line per recipe and one per finding, for the model card,
the README and the checkpoints page."""

from __future__ import annotations

from mrg.text.taxonomy import FINDINGS14

BACKBONES = {
    "tf_efficientnet_lite0": "Lite0",
    "tf_efficientnet_lite1": "Lite1",
    "tf_efficientnet_lite2": "Lite2",
}


def describe_row(row: dict) -> str:
    """What a row trained, in words (an ensemble: its members)."""
    if "members" in row:
        return "mean of " + " + ".join(row["members"])
    config, recipe = row["config"], row["recipe"]
    parts = [
        f"{BACKBONES[config['backbone']]} {config['image_size']} px",
        config["loss"],
        f"{recipe['augment']} augmentation",
    ]
    if recipe["label_smoothing"]:
        parts.append(f"label smoothing {recipe['label_smoothing']}")
    if recipe["mixup"]:
        parts.append(f"mixup {recipe['mixup']}")
    parts.append(
        f"{recipe['epochs']} epochs, "
        + (
            "the best epoch on one training fold, the others train"
            if row["early_stop"]
            else "every training fold trains"
        )
    )
    return ", ".join(parts)


def interval(
    low_high: list[float] | tuple[float, float], signed: bool = False, digits: int = 3
) -> str:
    form = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    return f"[{form.format(low_high[0])}, {form.format(low_high[1])}]"


def cv_table(record: dict) -> str:
    """Markdown: per row, mean AUROC and AP over the findings with ≥ ``min_positives``
    positives (95 % bootstrap intervals), the paired gain over the first row, each fold's mean."""
    lines = [
        (
            "| recipe | what trains | mean AUROC [95 % CI] | gain over the first row [95 % CI] "
            "| mean AP [95 % CI] | per fold |"
        ),
        "|---|---|---:|---:|---:|---|",
    ]
    for name, f in record["rows"].items():
        gain = f.get("gain")
        lines.append(
            f"| {name} | {describe_row(f['row'])} | {f['mean_auroc']:.3f} "
            f"{interval(f['auroc_interval']['mean'])} | "
            + (
                f"{gain['mean_auroc']:+.3f} {interval(gain['interval'], signed=True)}"
                if gain
                else "—"
            )
            + f" | {f['mean_ap']:.3f} {interval(f['ap_interval']['mean'])} | "
            + " ".join(f"{x:.2f}" for x in f["fold_mean_auroc"])
            + " |"
        )
    return "\n".join(lines) + "\n"


def cv_findings_table(record: dict, rows: list[str]) -> str:
    """Markdown: per finding, its positives and each of ``rows``' AUROC and AP with intervals."""
    header = "| finding | positives | " + " | ".join(
        f"{name} AUROC [95 % CI] | {name} AP" for name in rows
    )
    lines = [header + " |", "|---|---:|" + "---:|---:|" * len(rows)]
    for finding in FINDINGS14:
        cells = []
        for name in rows:
            f = record["rows"][name]
            low_high = f["auroc_interval"].get(finding)
            cells.append(
                f"{f['auroc'][finding]:.2f} " + (interval(low_high, digits=2) if low_high else "")
            )
            cells.append(f"{f['ap'][finding]:.2f}")
        lines.append(f"| {finding} | {record['positives'][finding]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def cv_brief(record: dict) -> str:
    """Markdown for the README: per row, mean AUROC and its gain over the first row."""
    lines = [
        "| recipe (5 folds by patient, out of fold) | mean AUROC [95 % CI] | gain [95 % CI] |",
        "|---|---:|---:|",
    ]
    for name, f in record["rows"].items():
        gain = f.get("gain")
        lines.append(
            f"| {name} | {f['mean_auroc']:.3f} {interval(f['auroc_interval']['mean'])} | "
            + (
                f"{gain['mean_auroc']:+.3f} {interval(gain['interval'], signed=True)}"
                if gain
                else "—"
            )
            + " |"
        )
    return "\n".join(lines) + "\n"

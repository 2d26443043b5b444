"""The cross-validation tables (``mrg.evaluation.findings_card``) say what the record holds."""

from mrg.evaluation.findings_card import cv_brief, cv_findings_table, cv_table, describe_row
from mrg.text.taxonomy import FINDINGS14


def record() -> dict:
    def row(mean, gain=None, **recipe):
        per = {f: 0.6 + 0.01 * i for i, f in enumerate(FINDINGS14)}
        figures = {
            "auroc": per,
            "ap": {f: 0.2 for f in FINDINGS14},
            "auroc_interval": {f: (0.5, 0.7) for f in FINDINGS14}
            | {"mean": (mean - 0.02, mean + 0.02)},
            "ap_interval": {"mean": (0.15, 0.25)},
            "mean_auroc": mean,
            "mean_ap": 0.2,
            "fold_mean_auroc": [0.61, 0.66, 0.7, 0.64, 0.69],
        }
        if gain is not None:
            figures["gain"] = {"mean_auroc": gain, "interval": [gain - 0.01, gain + 0.02]}
        config = {"backbone": "tf_efficientnet_lite2", "image_size": 260, "loss": "weighted-bce"}
        figures["row"] = {
            "config": config,
            "recipe": {"augment": "basic", "label_smoothing": 0.1, "mixup": 0.0, "epochs": 8}
            | recipe,
            "early_stop": not gain,
        }
        return figures

    rows = {"recipe-before": row(0.68), "lite2": row(0.715, 0.035)}
    rows["both"] = {**row(0.72, 0.04), "row": {"members": ["recipe-before", "lite2"]}}
    return {"rows": rows, "positives": {f: 20 + i for i, f in enumerate(FINDINGS14)}}


def test_each_row_says_what_trained_its_mean_and_its_gain():
    table = cv_table(record())
    assert (
        "| recipe-before | Lite2 260 px, weighted-bce, basic augmentation, label smoothing 0.1, "
        in table
    )
    assert "the best epoch on one training fold" in table and "every training fold trains" in table
    assert "| 0.715 [0.695, 0.735] | +0.035 [+0.025, +0.055] |" in table
    assert "| both | mean of recipe-before + lite2 |" in table
    assert describe_row({"members": ["a", "b"]}) == "mean of a + b"
    brief = cv_brief(record())
    assert brief.count("\n") == 5 and "| lite2 | 0.715 [0.695, 0.735] | +0.035" in brief


def test_the_per_finding_table_has_a_line_per_finding_with_its_positives():
    table = cv_findings_table(record(), ["recipe-before", "lite2"])
    lines = table.strip().splitlines()
    assert len(lines) == 2 + len(FINDINGS14)
    assert lines[2].startswith(f"| {FINDINGS14[0]} | 20 | 0.60 [0.50, 0.70] | 0.20 | 0.60")

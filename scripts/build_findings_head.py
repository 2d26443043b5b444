"""Train the shipped findings head on the recipe cross-validation chose, calibrate it out of
fold, and score it on the test split.

    python scripts/build_findings_head.py [--row lite0-448]
    python scripts/build_findings_head.py --calibrate-only   # the shipped head, recalibrated

1. ``--row`` names a row of ``mrg.train.findings_cv.CV_ROWS`` (``scripts/findings_cv.py``
   measures them all in the same five folds by patient); its out-of-fold logits are read from
   runs/findings_cv/ (computed there if missing). ``--calibrate-only`` takes the row the
   shipped head was trained on (``assets/findings_metrics.json``), whose logits it is.
2. The head trains on that recipe over the NIH training and validation images of the demo
   pairs' patient split, for the recipe's epochs: the 106 test images stay out, so that the
   report figures of the model card, measured on them, stay held out.
3. Calibration (``mrg.train.findings_calibration.calibrate``) fits each finding's temperature
   and bias, F1 operating point and present point, and the one possible point, on the
   out-of-fold logits of those same training and validation images (each scored by a fold
   model that did not see it: 650 images where one validation split had 123), and takes from
   the OpenI reports how often real reports negate each finding.
4. Its test AUROC (95 % bootstrap intervals, beside the frozen-stem linear probe), calibration
   (ECE, Brier, the reliability diagram as assets/reliability_diagram.png) and three states
   against the labels go to assets/findings_metrics.json, with the image ids of each split.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mrg.data.pairs import patient_split
from mrg.data.reports import iter_openi_reports
from mrg.environment import setting
from mrg.evaluation.calibration import calibration_report, negated_shares, states_report
from mrg.evaluation.calibration_plot import reliability_figure
from mrg.model.findings import FindingsHead, points_for_json
from mrg.text.sections import format_report
from mrg.train.findings import head_logits, load_labelled, test_report, train_findings_head
from mrg.train.findings_calibration import calibrate, fit_temperatures
from mrg.train.findings_cv import CV_ROWS, cross_validate, patient_folds

log = logging.getLogger("build_findings_head")
SHIPPED_ROW = "lite0-448"  # the recipe cross-validation chose


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row", choices=list(CV_ROWS), help=f"default: {SHIPPED_ROW}")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--cv-out", default=str(ROOT / "runs" / "findings_cv"))
    parser.add_argument("--assets", default=str(ROOT / "assets"))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument(
        "--calibrate-only",
        action="store_true",
        help="recalibrate the shipped head (no training) and rescore it",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    metrics_file = Path(args.assets) / "findings_metrics.json"
    if args.row is None:  # recalibrating: the logits of the row the shipped head learned
        shipped = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        args.row = shipped.get("row", SHIPPED_ROW) if args.calibrate_only else SHIPPED_ROW
    row = CV_ROWS[args.row]
    if row.members:
        raise SystemExit(f"{args.row} is an ensemble: ship one of its members, or distil it")
    data = load_labelled(Path(setting("MRG_SHARED_DATA")) / "nih_cxr14", row.load_size)
    names = np.array([patient_split(p) for p in data.patients])
    splits = {s: data.subset(np.flatnonzero(names == s)) for s in ("train", "val", "test")}
    fit_rows = np.flatnonzero(names != "test")
    fit = data.subset(fit_rows)
    log.info("training on %d images (train + val), testing on %d", len(fit), len(splits["test"]))
    out_of_fold = cross_validate(
        data, patient_folds(data.patients, args.folds), row, Path(args.cv_out)
    )
    assets = Path(args.assets)
    target = assets / "checkpoints" / "findings"
    if args.calibrate_only:
        head = FindingsHead.from_pretrained(target)
        metrics = json.loads(metrics_file.read_text())
    else:
        head = train_findings_head(fit, None, row.config, row.recipe)[0]
        metrics = {
            "row": args.row,
            "config": row.config.to_dict(),
            "recipe": row.recipe.to_dict(),
            "trained_on": len(fit),
            "calibrated_on": f"out-of-fold logits of the same {len(fit)} images ({args.folds} folds)",
            "splits": {name: split.ids for name, split in splits.items()},
        }
    logits, labels = out_of_fold[fit_rows], fit.labels
    reports = (
        format_report(r.findings, r.impression)
        for r in iter_openi_reports(
            Path(setting("MRG_SHARED_DATA")) / "iu_xray" / "NLMCXR_reports.tgz"
        )
        if r.findings and r.impression
    )
    train_rate = labels.mean(0).numpy()
    calibrate(head, logits, labels, train_rate, negated_shares(reports))
    # before: the temperature-only calibration the head had (σ(z / T), T fitted out of fold)
    temperature = fit_temperatures(logits, labels)
    test_logits = head_logits(head, splits["test"])
    before = torch.sigmoid(test_logits / temperature).numpy()
    report = test_report(head, splits, test_logits)
    report.update(
        bias=head.bias.tolist(),
        present_threshold=points_for_json(head.present_threshold),
        possible_threshold=points_for_json(head.possible_threshold),
        negated_share=head.negated_share.tolist(),
    )
    test_labels = splits["test"].labels.numpy()
    after = head.probabilities(test_logits)
    metrics["test"] = report
    metrics["calibration"] = {
        "before": calibration_report(before, test_labels),
        "after": calibration_report(after.numpy(), test_labels),
    }
    metrics["states"] = states_report(head.states(after), test_labels, train_rate)
    shutil.rmtree(target, ignore_errors=True)
    head.save_pretrained(target)
    metrics_file.write_text(json.dumps(metrics, indent=1) + "\n")
    figure = reliability_figure(metrics["calibration"])
    figure.savefig(assets / "reliability_diagram.png", dpi=110, bbox_inches="tight")
    states = metrics["states"]
    print(
        f"test mean AUROC {report['head_mean_auroc']:.3f} (probe {report['probe_mean_auroc']:.3f}); "
        f"ECE {metrics['calibration']['before']['ece']:.3f} → "
        f"{metrics['calibration']['after']['ece']:.3f}; present precision "
        f"{states['present_precision']:.2f}, named per image {states['named_per_image']:.2f}, "
        f"micro-F1 with possible {states['with_possible']['f1']:.3f}"
    )


if __name__ == "__main__":
    main()

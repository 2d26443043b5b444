"""Train, choose, calibrate and score the findings head on the labelled NIH images.

    python scripts/build_findings_head.py [--candidates last_stages:asl all:asl ...] [--epochs 8]
    python scripts/build_findings_head.py --calibrate-only   # the shipped head, recalibrated

Each candidate (which parts train : loss) is trained on the NIH training split
(``mrg.train.findings``) and kept under runs/findings/<candidate>/ (a rerun skips candidates
already there); the one with the best validation mean AUROC is calibrated on validation and
copied to assets/checkpoints/findings/, and its test AUROC (95 % bootstrap intervals, beside
the frozen-stem linear probe) goes to assets/findings_metrics.json with the image ids of
each split. Calibration (``mrg.train.findings.calibrate``) fits each finding's temperature and
bias, F1 operating point and present point on validation, and takes from the OpenI reports
how often real reports negate each finding; its test figures (ECE, Brier, the reliability
diagram as assets/reliability_diagram.png, the three states against the labels) go to
findings_metrics.json too.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mrg.data.reports import iter_openi_reports
from mrg.environment import setting
from mrg.evaluation.calibration import calibration_report, negated_shares, states_report
from mrg.evaluation.calibration_plot import reliability_figure
from mrg.model.findings import FindingsHead, FindingsHeadConfig
from mrg.text.sections import format_report
from mrg.train.findings import (
    calibrate,
    fit_temperatures,
    head_logits,
    nih_splits,
    test_report,
    train_findings_head,
)

log = logging.getLogger("build_findings_head")
DEFAULT_CANDIDATES = ["last_stages:asl", "last_stages:weighted-bce", "all:asl", "classifier:asl"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", nargs="+", default=DEFAULT_CANDIDATES)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--out", default=str(ROOT / "runs" / "findings"))
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
    splits = nih_splits(Path(setting("MRG_SHARED_DATA")) / "nih_cxr14")
    log.info("NIH splits: %s", {k: len(v) for k, v in splits.items()})
    assets = Path(args.assets)
    metrics_file = assets / "findings_metrics.json"
    target = assets / "checkpoints" / "findings"
    if args.calibrate_only:
        metrics = json.loads(metrics_file.read_text())
        head = FindingsHead.from_pretrained(target)
    else:
        head, metrics = train_and_choose(args, splits)
    # before: the temperature-only calibration the head had (σ(z / T), T fitted on validation)
    temperature = fit_temperatures(head_logits(head, splits["val"]), splits["val"].labels)
    test_logits = head_logits(head, splits["test"])  # calibration leaves the network as it is
    before = torch.sigmoid(test_logits / temperature).numpy()
    reports = (
        format_report(r.findings, r.impression)
        for r in iter_openi_reports(
            Path(setting("MRG_SHARED_DATA")) / "iu_xray" / "NLMCXR_reports.tgz"
        )
        if r.findings and r.impression
    )
    train_rate = splits["train"].labels.mean(0).numpy()
    calibrate(head, splits["val"], train_rate, negated_shares(reports))
    report = test_report(head, splits) if not args.calibrate_only else metrics["test"]
    report.update(
        temperature=head.temperature.tolist(),
        bias=head.bias.tolist(),
        threshold=head.threshold.tolist(),
        present_threshold=[
            t if t != float("inf") else None for t in head.present_threshold.tolist()
        ],
        negated_share=head.negated_share.tolist(),
    )
    labels = splits["test"].labels.numpy()
    after = head.probabilities(test_logits)
    metrics["test"] = report
    metrics["calibration"] = {
        "before": calibration_report(before, labels),
        "after": calibration_report(after.numpy(), labels),
    }
    metrics["states"] = states_report(head.states(after), labels, train_rate)
    shutil.rmtree(target, ignore_errors=True)
    head.save_pretrained(target)
    metrics_file.write_text(json.dumps(metrics, indent=1) + "\n")
    figure = reliability_figure(metrics["calibration"])
    figure.savefig(assets / "reliability_diagram.png", dpi=110, bbox_inches="tight")
    after_ece = metrics["calibration"]["after"]["ece"]
    states = metrics["states"]
    print(
        f"test ECE {metrics['calibration']['before']['ece']:.3f} → {after_ece:.3f}; present "
        f"precision {states['present_precision']:.2f}, named per image {states['named_per_image']:.2f}, "
        f"micro-F1 with possible {states['with_possible']['f1']:.3f}"
    )


def train_and_choose(args, splits) -> tuple[FindingsHead, dict]:
    """Train every candidate (a rerun skips those already trained) and keep the one with the
    best validation mean AUROC: (its head, the metrics without the test figures)."""
    out = Path(args.out)
    runs = {}
    for candidate in args.candidates:
        trainable, loss = candidate.split(":")
        folder = out / candidate.replace(":", "_")
        record = folder / "run.json"
        if not record.is_file():
            config = FindingsHeadConfig(trainable=trainable, loss=loss)
            head, run = train_findings_head(splits, config, epochs=args.epochs, lr=args.lr)
            head.save_pretrained(folder)
            record.write_text(json.dumps(run.__dict__, indent=1) + "\n")
        runs[candidate] = json.loads(record.read_text())
        log.info(
            "%s: validation mean AUROC by epoch %s",
            candidate,
            runs[candidate]["val_auroc_by_epoch"],
        )
    chosen = max(runs, key=lambda c: max(runs[c]["val_auroc_by_epoch"]))
    log.info("chosen %s", chosen)
    head = FindingsHead.from_pretrained(out / chosen.replace(":", "_"))
    metrics = {
        "chosen": chosen,
        "candidates": {
            c: {"val_auroc_by_epoch": r["val_auroc_by_epoch"], "best_epoch": r["best_epoch"]}
            for c, r in runs.items()
        },
        "epochs": args.epochs,
        "lr": args.lr,
        "splits": {name: data.ids for name, data in splits.items()},
    }
    return head, metrics


if __name__ == "__main__":
    main()

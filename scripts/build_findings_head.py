"""Train, choose, calibrate and score the findings head on the labelled NIH images.

    python scripts/build_findings_head.py [--candidates last_stages:asl all:asl ...] [--epochs 8]

Each candidate (which parts train : loss) is trained on the NIH training split
(``mrg.train.findings``) and kept under runs/findings/<candidate>/ (a rerun skips candidates
already there); the one with the best validation mean AUROC is calibrated on validation and
copied to assets/checkpoints/findings/, and its test AUROC (95 % bootstrap intervals, beside
the frozen-stem linear probe) goes to assets/findings_metrics.json with the image ids of
each split.
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

from mrg.environment import setting
from mrg.model.findings import FindingsHead, FindingsHeadConfig
from mrg.train.findings import nih_splits, test_report, train_findings_head

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
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    splits = nih_splits(Path(setting("MRG_SHARED_DATA")) / "nih_cxr14")
    log.info("NIH splits: %s", {k: len(v) for k, v in splits.items()})
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
    head = FindingsHead.from_pretrained(out / chosen.replace(":", "_"))  # calibrated in training
    report = test_report(head, splits)
    target = Path(args.assets) / "checkpoints" / "findings"
    shutil.rmtree(target, ignore_errors=True)
    head.save_pretrained(target)
    metrics = {
        "chosen": chosen,
        "candidates": {
            c: {"val_auroc_by_epoch": r["val_auroc_by_epoch"], "best_epoch": r["best_epoch"]}
            for c, r in runs.items()
        },
        "epochs": args.epochs,
        "lr": args.lr,
        "test": report,
        "splits": {name: data.ids for name, data in splits.items()},
    }
    (Path(args.assets) / "findings_metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    print(
        f"chosen {chosen}: test mean AUROC {report['head_mean_auroc']:.3f} "
        f"(probe {report['probe_mean_auroc']:.3f}) over {len(report['counted'])} findings"
    )


if __name__ == "__main__":
    main()

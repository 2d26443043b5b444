"""Cross-validate findings-head recipes over all labelled NIH images (5 folds by patient).

    python scripts/findings_cv.py [--rows recipe-before all-images ...] [--folds 5]

Each row of ``mrg.train.findings_cv.CV_ROWS`` is trained in the same folds (``mrg.train.findings_cv``; a rerun
resumes from runs/findings_cv/), ensembles are the mean of their members'
out-of-fold logits, and the table (AUROC and average precision per finding with 95 %
bootstrap intervals, means over findings with ≥ 20 positives, the paired gain over the
first row) is printed and written to assets/findings_cv.json, with a forest plot of the first
row, the best single recipe and the best ensemble beside it (assets/findings_cv.png).
``--ce`` also prints each row's CE micro-F1 of the findings a report would name
(``mrg.train.named_findings``); with a few ``--rows``, give ``--json`` another path so that
the shipped table stays whole:

    python scripts/findings_cv.py --rows radiograph-aug lite0-448 ensemble-224-448 --ce \
        --json runs/findings_cv/resolution.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mrg.environment import setting
from mrg.evaluation.calibration import state_mask
from mrg.evaluation.findings_cv_plot import forest_figure
from mrg.evaluation.probe import micro_f1, top_k
from mrg.model.findings import MAX_NAMED
from mrg.text.states import POSSIBLE, PRESENT
from mrg.text.taxonomy import FINDINGS14
from mrg.train.findings import LOAD_SIZE, LabelledImages, load_labelled
from mrg.train.findings_cv import (
    CV_ROWS,
    MIN_CV_POSITIVES,
    cross_validate,
    ensemble_logits,
    patient_folds,
    score_row,
)
from mrg.train.named_findings import at_mean, nested

log = logging.getLogger("findings_cv")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=list(CV_ROWS), choices=list(CV_ROWS))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, help="override every recipe's epochs (smoke runs)")
    parser.add_argument("--limit", type=int, help="the first N images only (smoke runs)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "findings_cv"))
    parser.add_argument("--json", default=str(ROOT / "assets" / "findings_cv.json"))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument(
        "--ce",
        action="store_true",
        help="also the CE micro-F1 of the findings a report would name (nested calibration)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    loaded: dict[int, LabelledImages] = {}  # by load size, loaded when a row first needs it

    def images(size: int) -> LabelledImages:
        if size not in loaded:
            data = load_labelled(Path(setting("MRG_SHARED_DATA")) / "nih_cxr14", size)
            loaded[size] = data.subset(range(args.limit)) if args.limit else data
        return loaded[size]

    # the labels and folds from the images a row loads anyway (not a 288-px load of its own)
    sizes = [CV_ROWS[name].load_size for name in args.rows if not CV_ROWS[name].members]
    data = images(sizes[0] if sizes else LOAD_SIZE)
    folds = patient_folds(data.patients, args.folds)
    labels = data.labels.numpy()
    logits: dict[str, torch.Tensor] = {}
    for name in args.rows:
        row = CV_ROWS[name]
        if row.members:
            missing = [m for m in row.members if m not in logits]
            if missing:
                log.warning("%s skipped: members %s were not run", name, missing)
                continue
            logits[name] = ensemble_logits([logits[m] for m in row.members])
            continue
        if args.epochs:
            row.recipe.epochs = args.epochs
        logits[name] = cross_validate(images(row.load_size), folds, row, Path(args.out))
    reference = logits[args.rows[0]].numpy()
    table = {
        name: score_row(labels, x.numpy(), folds, None if name == args.rows[0] else reference)
        for name, x in logits.items()
    }
    for name, figures in table.items():
        row = CV_ROWS[name]
        figures["row"] = (
            {"members": list(row.members)}
            if row.members
            else {
                "config": row.config.to_dict(),
                "recipe": row.recipe.to_dict(),
                "early_stop": row.early_stop,
            }
        )
    record = {
        "folds": args.folds,
        "images": len(data),
        "patients": len(set(data.patients)),
        "positives": {f: int(n) for f, n in zip(FINDINGS14, labels.sum(0))},
        "min_positives": MIN_CV_POSITIVES,
        "rows": table,
    }
    Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    show(table)
    singles = [n for n in table if not CV_ROWS[n].members]
    ensembles = [n for n in table if CV_ROWS[n].members]
    shown = [args.rows[0], max(singles, key=lambda n: table[n]["mean_auroc"])]
    shown += [max(ensembles, key=lambda n: table[n]["mean_auroc"])] if ensembles else []
    figure = forest_figure(record, list(dict.fromkeys(shown)))
    figure.savefig(Path(args.json).with_suffix(".png"), dpi=110, bbox_inches="tight")
    if args.ce:
        show_ce(logits, data.labels, folds)


def show(table: dict) -> None:
    console = Console()
    summary = Table(title="Findings head, 5-fold cross-validation by patient (out-of-fold)")
    for column in ("row", "mean AUROC [95 % CI]", "mean AP", "gain over first [95 % CI]", "folds"):
        summary.add_column(column)
    for name, f in table.items():
        interval = f["auroc_interval"].get("mean")  # none where too few findings count (--limit)
        gain = f.get("gain")
        summary.add_row(
            name,
            f"{f['mean_auroc']:.3f}" + (" [{:.3f}, {:.3f}]".format(*interval) if interval else ""),
            f"{f['mean_ap']:.3f}",
            f"{gain['mean_auroc']:+.3f} [{gain['interval'][0]:+.3f}, {gain['interval'][1]:+.3f}]"
            if gain
            else "—",
            " ".join(f"{x:.2f}" for x in f["fold_mean_auroc"]),
        )
    console.print(summary)
    per = Table(title="AUROC per finding")
    per.add_column("finding")
    for name in table:
        per.add_column(name)
    for finding in FINDINGS14:
        per.add_row(
            finding,
            *(
                f"{f['auroc'][finding]:.2f}" if f["auroc"][finding] is not None else "—"
                for f in table.values()
            ),
        )
    console.print(per)


def show_ce(logits: dict[str, torch.Tensor], labels: torch.Tensor, folds) -> None:
    """Each row's CE micro-F1, "possible" counted, of what a report would name
    (``mrg.train.named_findings``): the shipped states, and fixed counts per image."""
    y = labels.numpy()
    table = Table(title="CE micro-F1 out of fold, nested calibration (named per image)")
    columns = ("states", "top 2", "≤ 2 an image, 1.9", "no cap, 2.0 (not allowed)")
    for column in ("row", *columns):
        table.add_column(column)
    for name, z in logits.items():
        p, states = nested(z, labels, folds)
        named = state_mask(states, PRESENT, POSSIBLE)
        by_rule = (named, top_k(p, 2), at_mean(p, 1.9, cap=MAX_NAMED), at_mean(p, 2.0))
        table.add_row(name, *(f"{micro_f1(y, n):.3f} ({n.sum(1).mean():.2f})" for n in by_rule))
    Console().print(table)


if __name__ == "__main__":
    main()

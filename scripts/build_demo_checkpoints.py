"""Rebuild the embedded demo checkpoints from ../shared/data in one command.

    python scripts/build_demo_checkpoints.py [--modes prompt-wise promptbook-wise static]
                                             [--reports-per-image 1] [--skip-train]

The recipe is the ``demo-checkpoints`` preset; this script orchestrates it (resumable):

1. label-matched pairs (``mrg.data.pairs``) → runs/demo/pairs/annotation.json, and the
   report-language corpus (``mrg.data.language``) without any held-out reference
2. report language, then contrastive alignment, once: they train the plain prompt and the
   encoder, neither of which depends on the mode → runs/demo/shared/last
3. report generation for each mode from that prompt and encoder → runs/demo/<mode>/{best,last}
4. evaluate on the held-out split with two trivial baselines (always the most common
   training report; a random training report), text quality, image dependence and a
   findings ceiling (``mrg.evaluation.demo_card``) → runs/demo/metrics.{json,md}
5. copy the best checkpoints (float16 weights + config) to assets/checkpoints/<mode> and
   write assets/MODEL_CARD.md from assets/MODEL_CARD.template.md
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
from safetensors.torch import load_file

from mrg.config import CONFIG_NAME, DEFAULT_DECODING, ModelConfig
from mrg.data.datasets import load_annotation
from mrg.data.language import HeldOut, report_corpus
from mrg.data.pairs import build_pairs
from mrg.environment import setting
from mrg.evaluation.demo_card import (
    alignment_retrieval,
    baselines,
    blank_image_report,
    ceiling_table,
    ceiling_verdict,
    common_report_shift,
    constant_findings_baselines,
    dependence_table,
    fidelity_table,
    findings_ceiling,
    floor_verdict,
    head_table,
    image_dependence,
    language_losses,
    listed_findings_report,
    markdown,
    model_card,
    naming_a_finding,
    pair_statistics,
    read_log,
    score,
    training_seconds,
    verdict,
)
from mrg.evaluation.fidelity import fidelity_sample, language_fidelity
from mrg.evaluation.labeler import ReportLabeler
from mrg.evaluation.runner import generate_split
from mrg.evaluation.text_quality import corpus_counts, quality_table, text_quality
from mrg.model import MRGModel
from mrg.model.findings import FINDINGS_CONFIG_NAME, FINDINGS_FOLDER, FindingsHead
from mrg.model.llm import load_frozen_llm
from mrg.model.mrg_model import WEIGHTS_NAME
from mrg.train.config import StageConfig, train_preset
from mrg.train.trainer import Trainer

log = logging.getLogger("build_demo_checkpoints")
SHARED = Path(setting("MRG_SHARED_DATA"))
REPORTS = SHARED / "iu_xray" / "NLMCXR_reports.tgz"
WORDS_ONLY = dataclasses.replace(DEFAULT_DECODING, lead_with_findings=False)


def generations_of(checkpoint: Path, rows_file: Path) -> Path:
    """``rows_file`` for ``generate_split`` to resume, emptied first when it was written by
    another checkpoint (a retrained ``best``): resuming must never mix two models' reports."""
    digest = hashlib.sha256((checkpoint / WEIGHTS_NAME).read_bytes()).hexdigest()
    stamp = rows_file.with_suffix(".checkpoint")
    if not stamp.is_file() or stamp.read_text() != digest:
        rows_file.unlink(missing_ok=True)
        stamp.write_text(digest)
    return rows_file


def named(condition: str) -> list[str]:
    """The findings of a generation row's ``condition`` column (``"normal"``: none)."""
    return [] if condition == "normal" else condition.split("|")


def demo_config(mode: str, annotation: Path, images: Path, output_dir: Path):
    """The ``demo-checkpoints`` TrainConfig of one mode on this build's data."""
    return train_preset(
        "demo-checkpoints",
        mode=mode,
        annotation=str(annotation),
        image_root=str(images),
        output_dir=str(output_dir),
        language_reports=str(REPORTS),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["prompt-wise", "promptbook-wise"])
    parser.add_argument(
        "--ship",
        nargs="+",
        default=["prompt-wise", "promptbook-wise"],
        help="modes copied to --assets (static is trained and measured as the baseline only)",
    )
    parser.add_argument("--reports-per-image", type=int, default=1)
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
    summary = build_pairs(SHARED / "nih_cxr14", REPORTS, annotation, args.reports_per_image)
    log.info("pairs: %s", summary)
    images = SHARED / "nih_cxr14" / "images"
    records = load_annotation(annotation, images)
    train, val, test = ([r for r in records if r.split == s] for s in ("train", "val", "test"))
    image_labels = {r.study_id: r.labels for r in test}
    # Never seen by the language stage: the pairs' held-out references and IU X-ray's
    # validation and test reports (R2Gen's split, the benchmark others report on).
    held_out = HeldOut.from_records(records)
    held_out.update(
        HeldOut.from_records(load_annotation(SHARED / "iu_xray" / "annotation.json", "."))
    )
    corpus = report_corpus(REPORTS, held_out)
    log.info(
        "language corpus: %d train, %d val; %d held out, %d redacted",
        len(corpus.train),
        len(corpus.val),
        corpus.held_out,
        corpus.redacted,
    )

    head_dir = Path(args.assets) / FINDINGS_FOLDER
    if not (head_dir / FINDINGS_CONFIG_NAME).is_file():
        raise SystemExit(
            f"no findings head in {head_dir}: run scripts/build_findings_head.py first"
        )
    head = FindingsHead.from_pretrained(head_dir)
    # The paper's image-only form as shipped before the findings head: kept to be measured
    # beside the findings-conditioned models (copied once, before they are overwritten).
    previous = out / "v-only"
    for mode in args.ship:
        source = Path(args.assets) / mode
        is_previous = (source / CONFIG_NAME).is_file() and not ModelConfig.load(
            source / CONFIG_NAME
        ).uses_findings
        if is_previous and not (previous / mode).is_dir():
            shutil.copytree(source, previous / mode)
    llm, tokenizer = load_frozen_llm(train_preset("demo-checkpoints").model.llm)
    # The language and alignment stages train the plain prompt and the encoder, neither of
    # which depends on the mode: run them once and start every mode from the result.
    shared = out / "shared"
    if not args.skip_train:
        config = demo_config("static", annotation, images, shared)
        config.generate = StageConfig(0, config.generate.lr)
        torch.manual_seed(config.seed)
        model = MRGModel(config.model, llm, tokenizer)
        Trainer(config, model, train, val, resume=True, language=corpus).fit()
    shared_weights = load_file(str(shared / "last" / "model.safetensors"))
    # Label fidelity of the language stage: the prompt writing from the true findings of
    # OpenI reports it never saw (its validation texts and the held-out references), with no
    # image (the words way, without and with the lead; other ways: scripts/fidelity_ways.py).
    fidelity = {}
    for way, decoding in (("words", WORDS_ONLY), ("words, leading with them", DEFAULT_DECODING)):
        fidelity_file = shared / f"fidelity-{way.split(',')[0]}{'-lead' if ',' in way else ''}.json"
        if not fidelity_file.is_file():
            model = MRGModel(
                demo_config("static", annotation, images, shared).model, llm, tokenizer
            )
            model.customizer.set_plain_prompt(shared_weights["customizer.prompt"])
            sample = fidelity_sample(corpus.val + corpus.held_out_texts)
            scores, rows = language_fidelity(model, sample, decoding)
            fidelity_file.write_text(json.dumps({"scores": scores, "rows": rows}, indent=1) + "\n")
        fidelity[way] = json.loads(fidelity_file.read_text())["scores"]
    other_ways = Path(args.assets).parent / "fidelity_ways.json"  # scripts/fidelity_ways.py
    if other_ways.is_file():
        fidelity.update(json.loads(other_ways.read_text()))
    log.info("language fidelity: %s", fidelity)
    results, timings, generations, dependence = {}, {}, {}, {}
    labeler = ReportLabeler()
    recipe = train_preset("demo-checkpoints")  # what the card states; each mode runs one stage
    for mode in args.modes:
        config = demo_config(mode, annotation, images, out / mode)
        config.language = StageConfig(0, config.language.lr)
        config.align = StageConfig(0, config.align.lr)
        if not args.skip_train:
            torch.manual_seed(config.seed)
            model = MRGModel(config.model, llm, tokenizer)
            model.load_trainable(shared / "last", prefix="encoder.")
            model.customizer.set_plain_prompt(shared_weights["customizer.prompt"])
            Trainer(config, model, train, val, resume=True).fit()
        timings[mode] = training_seconds(read_log(out / mode / "log.jsonl"))
        best = MRGModel.from_pretrained(out / mode / "best", llm=llm, tokenizer=tokenizer).eval()
        cache = generations_of(out / mode / "best", out / mode / "test_generations.jsonl")
        rows = generate_split(best, test, cache, DEFAULT_DECODING, findings_head=head)
        results[mode] = score(rows, image_labels, labeler)
        generations[mode] = rows
        blank = blank_image_report(best, DEFAULT_DECODING, head)
        blank_rows = [dict(r, generated=blank) for r in rows]
        dependence[mode] = {
            **image_dependence(rows),
            "naming_a_finding": naming_a_finding(rows, labeler),
            "blank_report": blank,
            "blank_CE_micro_F1": score(blank_rows, image_labels, labeler)["CE_micro_F1"],
        }
        log.info("%s: %s %s", mode, results[mode], dependence[mode])
        if mode in args.ship:
            best.save_pretrained(Path(args.assets) / mode, dtype=torch.float16)
    for mode in args.ship:  # the paper's v-only form, as shipped before
        if (previous / mode / CONFIG_NAME).is_file():
            name = f"{mode}, v only (previous)"
            model = MRGModel.from_pretrained(previous / mode, llm=llm, tokenizer=tokenizer).eval()
            rows = generate_split(model, test, out / "v-only" / f"{mode}.jsonl", DEFAULT_DECODING)
            results[name], generations[name] = score(rows, image_labels, labeler), rows
            dependence[name] = {
                **image_dependence(rows),
                "naming_a_finding": naming_a_finding(rows, labeler),
                "blank_report": blank_image_report(model, DEFAULT_DECODING),
            }
            dependence[name]["blank_CE_micro_F1"] = score(
                [dict(r, generated=dependence[name]["blank_report"]) for r in rows],
                image_labels,
                labeler,
            )["CE_micro_F1"]
    # The head's own reading, its findings listed (no LLM): what a faithful report scores.
    # Every mode's rows record the findings the head named (``condition``): no second pass.
    head_rows = [
        dict(r, generated=listed_findings_report(named(r["condition"])))
        for r in generations[args.modes[0]]
    ]
    results["findings head, listed (no LLM)"] = score(head_rows, image_labels, labeler)
    align_log = [r for r in read_log(shared / "log.jsonl") if r.get("stage") == "align"]
    align_seconds = training_seconds(align_log)
    test_rows = [{"id": r.study_id, "reference": r.report} for r in test]
    for name, rows in baselines([r.report for r in train], test_rows).items():
        results[name] = score(rows, image_labels, labeler)
    for name, rows in constant_findings_baselines([r.labels for r in train], test_rows).items():
        results[name] = score(rows, image_labels, labeler)
    shared_log = read_log(shared / "log.jsonl")
    counts = corpus_counts(REPORTS)
    quality = {
        "real reports (test references)": text_quality(
            [r.report for r in test], counts, labeler=labeler
        )
    }
    quality.update(
        {
            mode: text_quality([r["generated"] for r in rows], counts, labeler=labeler)
            for mode, rows in generations.items()
        }
    )
    head_metrics = json.loads((Path(args.assets).parent / "findings_metrics.json").read_text())
    measured = {
        "results": results,
        "text_quality": {name: q.as_dict() for name, q in quality.items()},
        "image_dependence": dependence,
        "language": language_losses(shared_log),
        "align_seconds": align_seconds,
        "generate_seconds": timings,
        "fidelity": fidelity,
        "abnormal_test_share": float(np.mean([bool(r.labels) for r in test])),
        "test_images": [r.image_paths[0].name for r in test],
        "checkpoints": {
            mode: hashlib.sha256((Path(args.assets) / mode / WEIGHTS_NAME).read_bytes()).hexdigest()
            for mode in args.ship
        },
        "findings_head": hashlib.sha256(
            (head_dir / "findings.safetensors").read_bytes()
        ).hexdigest(),
    }
    # The card's numbers, kept beside it so that a test can check the card against them.
    for path in (out / "metrics.json", Path(args.assets).parent / "demo_metrics.json"):
        path.write_text(json.dumps(measured, indent=2) + "\n")
    (out / "metrics.md").write_text(markdown(results))
    ceiling = findings_ceiling(train, test)
    log.info("findings ceiling: %s", ceiling)
    card = model_card(
        dict(
            shipped=", ".join(m for m in args.modes if m in args.ship),
            images=summary.images,
            exact=summary.exact,
            nearest=summary.nearest,
            train=summary.per_split["train"],
            val=summary.per_split["val"],
            test=summary.per_split["test"],
            args="".join(f" {a}" for a in sys.argv[1:] if a != "--skip-train"),
            prompt_length=recipe.model.customizer.prompt_length,
            language_reports=len(corpus.train),
            language_steps=recipe.max_steps_per_epoch,
            finding_weight=recipe.language_finding_weight,
            fidelity_table=fidelity_table(fidelity),
            head_table=head_table(head_metrics),
            head_chosen=head_metrics["chosen"],
            head_epochs=head_metrics["epochs"],
            head_candidates="; ".join(
                f"{name} {max(run['val_auroc_by_epoch']):.3f}"
                for name, run in head_metrics["candidates"].items()
            ),
            head_named_share=head_metrics["test"]["named_share"],
            abnormal_test_share=head_metrics["test"]["abnormal_share"],
            language_lr=recipe.language.lr,
            language_held_out=corpus.held_out,
            language_redacted=corpus.redacted,
            language_seconds=round(
                training_seconds([r for r in shared_log if r.get("stage") == "language"])
            ),
            **language_losses(shared_log),
            max_new_tokens=DEFAULT_DECODING.max_new_tokens,
            repetition_penalty=DEFAULT_DECODING.repetition_penalty,
            floor_verdict=floor_verdict(results),
            quality_table=quality_table(quality),
            dependence_table=dependence_table(dependence, results),
            align=recipe.align.epochs,
            align_lr=recipe.align.lr,
            generate=recipe.generate.epochs,
            generate_lr=recipe.generate.lr,
            encoder_lr_scale=recipe.encoder_lr_scale,
            max_tokens=recipe.model.max_report_tokens,
            align_seconds=round(align_seconds),
            timings=", ".join(f"{mode} {round(seconds)}" for mode, seconds in timings.items()),
            table=markdown(results),
            verdict=verdict(results),
            batch=recipe.batch_size,
            **alignment_retrieval(align_log),
            **pair_statistics([r.report for r in train], [r.report for r in test]),
            ceiling_table=ceiling_table(ceiling),
            ceiling_verdict=ceiling_verdict(ceiling, results),
            **common_report_shift(train, test, labeler),
        )
    )
    (Path(args.assets).parent / "MODEL_CARD.md").write_text(card)
    print(markdown(results))
    print("training seconds: alignment", round(align_seconds), "generation", timings)


if __name__ == "__main__":
    main()

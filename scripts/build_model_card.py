"""Rebuild assets/MODEL_CARD.md and assets/demo_metrics.json from the shipped files, no training.

    python scripts/build_model_card.py [--assets assets] [--out runs/card]

Reads only what a clone ships and ../shared/data:

* assets/checkpoints/{prompt-wise,promptbook-wise}: the report models (and their
  report vocabulary), assets/checkpoints/findings: the findings head;
* assets/baselines/v-only/<mode>: the paper's image-only form as shipped before the head;
* assets/training_record.json: the training command and the stages' logs (losses, seconds,
  retrieval); assets/baselines/language_prompt.safetensors: the language stage's plain prompt
  (for label fidelity);
* assets/findings_metrics.json: the head's measurements (scripts/build_findings_head.py), and
  assets/findings_cv.json: its recipes cross-validated (scripts/findings_cv.py);
* ../shared/data: the label-matched pairs (rebuilt, deterministic), OpenI reports, NIH images.

Every generation is cached under ``--out`` per checkpoint and decoding (resumable). Greedy
decoding is deterministic, so the card comes out byte-identical on the same machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
from safetensors.torch import load_file

from mrg.config import CONFIG_NAME, CUSTOMIZED_MODES, DEFAULT_DECODING
from mrg.data.datasets import load_annotation
from mrg.data.language import HeldOut, report_corpus
from mrg.data.pairs import build_pairs
from mrg.data.study import batch_tensors, study_from_sources
from mrg.environment import setting
from mrg.evaluation.baselines import (
    baselines,
    constant_findings_baselines,
    findings_ceiling,
    listed_findings_report,
)
from mrg.evaluation.composed import composed_reports, finding_sentences, probe_threshold
from mrg.evaluation.demo_card import (
    COMPOSED,
    alignment_retrieval,
    blank_image_report,
    card_metadata,
    ceiling_table,
    ceiling_verdict,
    common_report_shift,
    dependence_table,
    fidelity_table,
    floor_verdict,
    head_table,
    image_dependence,
    language_losses,
    markdown,
    model_card,
    naming_a_finding,
    pair_statistics,
    score,
    training_seconds,
    verdict,
)
from mrg.evaluation.fidelity import fidelity_sample, language_fidelity
from mrg.evaluation.findings_card import cv_findings_table, cv_table, describe_row
from mrg.evaluation.metrics import nlg_scores
from mrg.evaluation.runner import generate_split
from mrg.evaluation.states_card import (
    NORMAL_TEMPLATE,
    calibration_table,
    content_table,
    form_table,
    language_table,
)
from mrg.evaluation.states_eval import content, form, report_states, state_fidelity
from mrg.evaluation.text_quality import TextQuality, corpus_counts, quality_table, text_quality
from mrg.model import MRGModel
from mrg.model.findings import FINDINGS_FOLDER, FindingsHead
from mrg.model.llm import load_frozen_llm
from mrg.model.mrg_model import WEIGHTS_NAME
from mrg.text.labeler import ReportLabeler
from mrg.text.phrasing import PHRASING_NAME, Phrasing
from mrg.text.taxonomy import FINDINGS14
from mrg.text.vocabulary import VOCABULARY_NAME, read_vocabulary
from mrg.train.config import train_preset
from mrg.train.findings import nih_splits, stem_probe_scores

log = logging.getLogger("build_model_card")
SHARED = Path(setting("MRG_SHARED_DATA"))
REPORTS = SHARED / "iu_xray" / "NLMCXR_reports.tgz"
RECORD_NAME = "training_record.json"
V_ONLY = Path("baselines") / "v-only"  # under assets/
FINDINGS_Y = Path("baselines") / "findings-y"  # under assets/: conditioned on present findings
# the checkpoints shipped before, each a row of the card: (folder, row label, cache file suffix)
PREVIOUS = ((V_ONLY, "v only", "v-only"), (FINDINGS_Y, "present findings y", "findings-y"))
FIXED_IMAGE = Path(__file__).resolve().parents[1] / "assets" / "examples" / "00004934_000.png"
LANGUAGE_PROMPT = Path("baselines") / "language_prompt.safetensors"  # under assets/
WORDS_ONLY = dataclasses.replace(DEFAULT_DECODING, lead_with_findings=False)
OPEN_VOCABULARY = dataclasses.replace(DEFAULT_DECODING, closed_vocabulary=False)
FIDELITY_WAYS = {"words": WORDS_ONLY, "words, leading with them": DEFAULT_DECODING}


def digest(*parts: bytes) -> str:
    return hashlib.sha256(b"".join(parts)).hexdigest()


def checkpoint_digest(checkpoint: Path) -> str:
    """The sha256 of a checkpoint's weights (what the metrics name)."""
    return digest((checkpoint / WEIGHTS_NAME).read_bytes())


def cached(rows_file: Path, *key: bytes) -> Path:
    """``rows_file`` for ``generate_split`` to resume, emptied first when it was written for
    another ``key`` (checkpoint bytes, decoding): resuming must never mix two models' reports."""
    rows_file.parent.mkdir(parents=True, exist_ok=True)
    stamp, value = rows_file.with_suffix(".key"), digest(*key)
    if not stamp.is_file() or stamp.read_text() != value:
        rows_file.unlink(missing_ok=True)
        stamp.write_text(value)
    return rows_file


def checkpoint_key(checkpoint: Path, decoding) -> tuple[bytes, ...]:
    vocabulary, phrasing = checkpoint / VOCABULARY_NAME, checkpoint / PHRASING_NAME
    return (
        (checkpoint / WEIGHTS_NAME).read_bytes(),
        vocabulary.read_bytes() if vocabulary.is_file() else b"",
        phrasing.read_bytes() if phrasing.is_file() else b"",
        repr(decoding).encode(),
    )


def head_key(head: FindingsHead, directory: Path) -> bytes:
    """What keys the reports a head conditions: its weights and its decisions (states and y)
    on fixed probabilities, so that a change of the states' rules writes them again."""
    probe = torch.rand(256, len(FINDINGS14), generator=torch.Generator().manual_seed(0)) ** 3
    decisions = repr((head.states(probe), head.decide(probe).tolist())).encode()
    return (directory / "findings.safetensors").read_bytes() + decisions


def named(condition: str) -> list[str]:
    """The findings of a generation row's ``condition`` column (``"normal"``: none)."""
    return [] if condition == "normal" else condition.split("|")


def composed_plan(corpus, test) -> dict:
    """What the composed baseline writes from (``mrg.evaluation.composed``): the stem probe
    trained on the NIH training split names the findings above one threshold chosen on
    validation; one retrieved sentence per finding."""
    splits = nih_splits(SHARED / "nih_cxr14")
    probe = stem_probe_scores(splits, scored=("val", "test"))
    threshold = probe_threshold(probe["val"], splits["val"].labels.numpy())
    by_image = dict(zip(splits["test"].ids, probe["test"]))
    return {
        "threshold": threshold,
        "sentences": finding_sentences(corpus.train, ReportLabeler()),
        "named": [
            [f for f, p in zip(FINDINGS14, by_image[r.image_paths[0].name]) if p >= threshold]
            for r in test
        ],
    }


def composed_rows(model: MRGModel, plan: dict, test) -> list[dict]:
    reports = composed_reports(model, plan["named"], plan["sentences"], DEFAULT_DECODING)
    return [
        {
            "id": r.study_id,
            "reference": r.report,
            "generated": text,
            "condition": "|".join(named) or "normal",
        }
        for r, text, named in zip(test, reports, plan["named"])
    ]


def dependence_of(model: MRGModel, rows: list[dict], image_labels, labeler, head=None) -> dict:
    """Does the report read the image: changes under swapped images, a blank image's report."""
    blank = blank_image_report(model, DEFAULT_DECODING, head)
    blank_rows = [dict(r, generated=blank) for r in rows]
    return {
        **image_dependence(rows),
        "naming_a_finding": naming_a_finding(rows, labeler),
        "blank_report": blank,
        "blank_CE_micro_F1": score(blank_rows, image_labels, labeler)["CE_micro_F1"],
    }


def states_measurements(
    assets: Path, out: Path, modes, llm, tokenizer, labeler, corpus, test, texts: dict
) -> dict:
    """What a radiologist reads (``mrg.evaluation.states_eval``): the content and form of each
    writer's test reports (``texts``: name → rows), and each shipped mode's state fidelity on
    held-out OpenI reports, each written from its own labeler states with one fixed image
    (the shipped normal example), beside a fixed normal template and a random real report."""
    checkpoints = assets / "checkpoints"
    vocabulary = read_vocabulary(checkpoints / modes[0] / VOCABULARY_NAME)
    labels = {r.study_id: r.labels for r in test}
    content_rows, form_rows = {}, {}
    for name, rows in texts.items():
        written = [r["generated"] for r in rows]
        content_rows[name] = content(written, [labels[r["id"]] for r in rows], labeler)
        form_rows[name] = form(written, labeler, vocabulary)
    form_rows = {
        "real reports (test references)": form([r.report for r in test], labeler)
    } | form_rows
    sample = fidelity_sample(corpus.val + corpus.held_out_texts)
    study = study_from_sources(FIXED_IMAGE)
    language = {}
    for mode in modes:
        model = MRGModel.from_pretrained(checkpoints / mode, llm=llm, tokenizer=tokenizer).eval()
        rows_file = cached(
            out / "states" / f"{mode}.json", *checkpoint_key(checkpoints / mode, DEFAULT_DECODING)
        )
        if not rows_file.is_file():
            image = batch_tensors([study], model.config.encoder.image_size, model.config.max_views)
            scores, rows = language_fidelity(model, sample, DEFAULT_DECODING, labeler, image=image)
            rows_file.write_text(json.dumps({"scores": scores, "rows": rows}, indent=1) + "\n")
        rows = json.loads(rows_file.read_text())["rows"]
        language[f"{mode}, one fixed image"] = written_scores(rows, labeler)
    rng = random.Random(0)
    given = [{"reference": t, "states": s} for t, s in zip(sample, report_states(sample, labeler))]
    for name, write in (
        ("baseline: a fixed normal template", lambda: NORMAL_TEMPLATE),
        ("baseline: a random real report", lambda: rng.choice(corpus.train)),
    ):
        language[name] = written_scores([dict(r, generated=write()) for r in given], labeler)
    return {
        "content": content_rows,
        "form": form_rows,
        "language": language,
        "language_reports": len(sample),
    }


def written_scores(rows: list[dict], labeler: ReportLabeler) -> dict:
    """State fidelity and BLEU-4 / CIDEr of ``rows`` (reference, states given, generated)."""
    references, written = [r["reference"] for r in rows], [r["generated"] for r in rows]
    corpus_scores = nlg_scores(references, written, meteor=False).corpus
    return {
        "reports": len(rows),
        "states": state_fidelity([r["states"] for r in rows], written, labeler),
        "BLEU_4": corpus_scores["BLEU_4"],
        "CIDEr": corpus_scores["CIDEr"],
    }


def build_card(assets: Path, out: Path) -> dict:
    """Measure the shipped files and write ``demo_metrics.json`` and ``MODEL_CARD.md`` beside
    ``assets/checkpoints``; returns the metrics."""
    checkpoints = assets / "checkpoints"
    record = json.loads((assets / RECORD_NAME).read_text())
    logs = record["logs"]
    annotation = out / "pairs" / "annotation.json"
    summary = build_pairs(
        SHARED / "nih_cxr14", REPORTS, annotation, record.get("reports_per_image", 1)
    )
    images = SHARED / "nih_cxr14" / "images"
    records = load_annotation(annotation, images)
    train, test = ([r for r in records if r.split == s] for s in ("train", "test"))
    image_labels = {r.study_id: r.labels for r in test}
    held_out = HeldOut.from_records(records)
    held_out.update(
        HeldOut.from_records(load_annotation(SHARED / "iu_xray" / "annotation.json", "."))
    )
    corpus = report_corpus(REPORTS, held_out)
    head_dir = checkpoints / FINDINGS_FOLDER
    head = FindingsHead.from_pretrained(head_dir)
    head_bytes = head_key(head, head_dir)  # keys what the head conditions
    modes = [m for m in CUSTOMIZED_MODES if (checkpoints / m / CONFIG_NAME).is_file()]
    recipe = train_preset("demo-checkpoints")
    llm, tokenizer = load_frozen_llm(recipe.model.llm)
    labeler = ReportLabeler()

    # Label fidelity of the language stage: its plain prompt writing from the true findings
    # of OpenI reports it never saw, with no image (the words way, without and with the lead).
    fidelity = {}
    prompt = load_file(str(assets / LANGUAGE_PROMPT))["prompt"]
    for way, decoding in FIDELITY_WAYS.items():
        fidelity_file = (
            out / "fidelity" / f"{way.split(',')[0]}{'-lead' if ',' in way else ''}.json"
        )
        phrasing = checkpoints / modes[0] / PHRASING_NAME
        key = (prompt.numpy().tobytes(), phrasing.read_bytes(), repr(decoding).encode())
        cached(fidelity_file, *key)
        if not fidelity_file.is_file():
            model = MRGModel(train_preset("demo-checkpoints", mode="static").model, llm, tokenizer)
            model.customizer.set_plain_prompt(prompt)
            model.report_vocabulary = read_vocabulary(checkpoints / modes[0] / VOCABULARY_NAME)
            model.report_phrasing = Phrasing.load(phrasing)
            scores, rows = language_fidelity(
                model, fidelity_sample(corpus.val + corpus.held_out_texts), decoding
            )
            fidelity_file.write_text(json.dumps({"scores": scores, "rows": rows}, indent=1) + "\n")
        fidelity[way] = json.loads(fidelity_file.read_text())["scores"]
    fidelity_ways = assets / "fidelity_ways.json"  # scripts/fidelity_ways.py
    if fidelity_ways.is_file():
        fidelity.update(json.loads(fidelity_ways.read_text()))
    log.info("language fidelity: %s", fidelity)

    results, generations, dependence = {}, {}, {}
    for mode in modes:
        model = MRGModel.from_pretrained(checkpoints / mode, llm=llm, tokenizer=tokenizer).eval()
        rows_file = cached(
            out / f"{mode}.jsonl",
            *checkpoint_key(checkpoints / mode, DEFAULT_DECODING),
            head_bytes,
        )
        rows = generate_split(model, test, rows_file, DEFAULT_DECODING, findings_head=head)
        results[mode], generations[mode] = score(rows, image_labels, labeler), rows
        dependence[mode] = dependence_of(model, rows, image_labels, labeler, head)
        log.info("%s: %s %s", mode, results[mode], dependence[mode])
    # The same model writing any word (no closed vocabulary): what the vocabulary changes.
    model = MRGModel.from_pretrained(checkpoints / modes[0], llm=llm, tokenizer=tokenizer).eval()
    name = f"{modes[0]}, open vocabulary"
    rows_file = cached(
        out / f"{modes[0]}-open-vocabulary.jsonl",
        *checkpoint_key(checkpoints / modes[0], OPEN_VOCABULARY),
        head_bytes,
    )
    rows = generate_split(model, test, rows_file, OPEN_VOCABULARY, findings_head=head)
    results[name], generations[name] = score(rows, image_labels, labeler), rows
    # The composed baseline with no training: probe → retrieved sentences → frozen LLM.
    plan = composed_plan(corpus, test)
    log.info("composed baseline: %s", {k: plan[k] for k in ("threshold", "sentences")})
    composed_file = cached(
        out / "composed.json",
        *checkpoint_key(checkpoints / modes[0], DEFAULT_DECODING),
        json.dumps(plan, sort_keys=True).encode(),
    )
    if not composed_file.is_file():
        composed_file.write_text(json.dumps(composed_rows(model, plan, test), indent=1))
    rows = json.loads(composed_file.read_text())
    results[COMPOSED], generations[COMPOSED] = score(rows, image_labels, labeler), rows
    # Generation trained on the head's findings instead of the reports' labels
    # (scripts/condition_ways.py): its test scores, measured the same way.
    condition_ways = assets / "condition_ways.json"
    other_ways = json.loads(condition_ways.read_text()) if condition_ways.is_file() else {}
    for name, way in other_ways.items():
        results[name] = way["scores"]
    for mode in modes:  # the checkpoints shipped before: image only, then present findings y
        for folder, label, suffix in PREVIOUS:
            previous = assets / folder / mode
            if not (previous / CONFIG_NAME).is_file():
                continue
            name = f"{mode}, {label} (previous)"
            model = MRGModel.from_pretrained(previous, llm=llm, tokenizer=tokenizer).eval()
            conditioned = head if model.config.uses_findings else None
            rows_file = cached(
                out / f"{mode}-{suffix}.jsonl",
                *checkpoint_key(previous, DEFAULT_DECODING),
                head_bytes if conditioned is not None else b"",
            )
            rows = generate_split(
                model, test, rows_file, DEFAULT_DECODING, findings_head=conditioned
            )
            results[name], generations[name] = score(rows, image_labels, labeler), rows
            dependence[name] = dependence_of(model, rows, image_labels, labeler, conditioned)
    # The head's own reading, its findings listed (no LLM): what a faithful report scores.
    head_rows = [
        dict(r, generated=listed_findings_report(named(r["condition"])))
        for r in generations[modes[0]]
    ]
    results["findings head, listed (no LLM)"] = score(head_rows, image_labels, labeler)
    test_rows = [{"id": r.study_id, "reference": r.report} for r in test]
    baseline_rows = baselines([r.report for r in train], test_rows)
    baseline_rows.update(constant_findings_baselines([r.labels for r in train], test_rows))
    for name, rows in baseline_rows.items():
        results[name] = score(rows, image_labels, labeler)
    states = states_measurements(
        assets, out, modes, llm, tokenizer, labeler, corpus, test, generations | baseline_rows
    )

    counts = corpus_counts(REPORTS)
    quality = {
        "real reports (test references)": text_quality(
            [r.report for r in test], counts, labeler=labeler
        )
    }
    quality.update(
        {
            name: text_quality([r["generated"] for r in rows], counts, labeler=labeler)
            for name, rows in generations.items()
        }
    )
    quality.update({name: TextQuality(**way["text_quality"]) for name, way in other_ways.items()})
    shared_log = logs["shared"]
    align_log = [r for r in shared_log if r.get("stage") == "align"]
    timings = {mode: training_seconds(logs[mode]) for mode in modes}
    head_metrics = json.loads((assets / "findings_metrics.json").read_text())
    cv_record = json.loads((assets / "findings_cv.json").read_text())
    measured = {
        "results": results,
        "text_quality": {name: q.as_dict() for name, q in quality.items()},
        "image_dependence": dependence,
        "language": language_losses(shared_log),
        "align_seconds": training_seconds(align_log),
        "generate_seconds": timings,
        "fidelity": fidelity,
        "states": states,
        "abnormal_test_share": float(np.mean([bool(r.labels) for r in test])),
        "test_images": [r.image_paths[0].name for r in test],
        "checkpoints": {mode: checkpoint_digest(checkpoints / mode) for mode in modes},
        "findings_head": digest((head_dir / "findings.safetensors").read_bytes()),
    }
    # The card's numbers, kept beside it so that a test can check the card against them.
    (assets / "demo_metrics.json").write_text(json.dumps(measured, indent=2) + "\n")
    ceiling = findings_ceiling(train, test, recipe.model.encoder)
    card = model_card(
        dict(
            shipped=", ".join(modes),
            images=summary.images,
            exact=summary.exact,
            nearest=summary.nearest,
            train=summary.per_split["train"],
            val=summary.per_split["val"],
            test=summary.per_split["test"],
            args=record["args"],
            prompt_length=recipe.model.customizer.prompt_length,
            language_reports=len(corpus.train),
            language_epochs=recipe.language.epochs,
            finding_weight=recipe.language_finding_weight,
            fidelity_table=fidelity_table(fidelity),
            head_table=head_table(head_metrics),
            cv_images=cv_record["images"],
            cv_patients=cv_record["patients"],
            cv_min_positives=cv_record["min_positives"],
            cv_table=cv_table(cv_record),
            cv_findings_table=cv_findings_table(
                cv_record, list(dict.fromkeys([next(iter(cv_record["rows"])), head_metrics["row"]]))
            ),
            head_row=head_metrics["row"],
            head_description=describe_row(cv_record["rows"][head_metrics["row"]]["row"]),
            head_trained_on=head_metrics["trained_on"],
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
            align_seconds=round(training_seconds(align_log)),
            timings=", ".join(f"{mode} {round(seconds)}" for mode, seconds in timings.items()),
            table=markdown(results),
            verdict=verdict(results),
            batch=recipe.batch_size,
            **alignment_retrieval(align_log),
            **pair_statistics([r.report for r in train], [r.report for r in test]),
            ceiling_table=ceiling_table(ceiling),
            calibration_table=calibration_table(head_metrics["calibration"]),
            ece_before=head_metrics["calibration"]["before"]["ece"],
            ece_after=head_metrics["calibration"]["after"]["ece"],
            expected_count=head_metrics["calibration"]["after"]["expected_count"],
            labelled_count=head_metrics["calibration"]["after"]["labelled_count"],
            content_table=content_table(states["content"]),
            form_table=form_table(states["form"]),
            language_table=language_table(states["language"]),
            language_reports_scored=states["language_reports"],
            ceiling_verdict=ceiling_verdict(ceiling, results),
            **common_report_shift(train, test, labeler),
        )
    )
    (assets / "MODEL_CARD.md").write_text(card_metadata(measured) + card)
    print(markdown(results))
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", default=str(ROOT / "assets"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "card"))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    torch.set_num_threads(args.threads)
    build_card(Path(args.assets), Path(args.out))


if __name__ == "__main__":
    main()

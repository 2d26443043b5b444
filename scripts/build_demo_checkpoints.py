"""Rebuild the embedded demo checkpoints from ../shared/data in one command, then their card.

    python scripts/build_demo_checkpoints.py [--modes prompt-wise promptbook-wise]
                                             [--reports-per-image 1] [--skip-train]

The recipe is the ``demo-checkpoints`` preset; this script orchestrates it (resumable):

1. label-matched pairs (``mrg.data.pairs``) → runs/demo/pairs/annotation.json, and the
   report-language corpus (``mrg.data.language``) without any held-out reference
2. report language, then contrastive alignment, once: they train the plain prompt and the
   encoder, neither of which depends on the mode → runs/demo/shared/last
3. report generation for each mode from that prompt and encoder → runs/demo/<mode>/{best,last}
4. ship: the best checkpoints (float16 weights, config, report vocabulary) to
   assets/checkpoints/<mode>; the language stage's prompt and the image-only checkpoints
   shipped before the findings head to assets/baselines; the command and the stages' logs to
   assets/training_record.json
5. the model card from the shipped files (``scripts/build_model_card.py``, which rebuilds it
   alone on a fresh clone)
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
sys.path.insert(0, str(ROOT / "scripts"))

from build_model_card import (
    FINDINGS_Y,
    LANGUAGE_PROMPT,
    RECORD_NAME,
    REPORTS,
    SHARED,
    V_ONLY,
    build_card,
)
from safetensors.torch import load_file, save_file

from mrg.config import CONFIG_NAME, ModelConfig
from mrg.data.datasets import load_annotation
from mrg.data.language import HeldOut, report_corpus
from mrg.data.pairs import build_pairs
from mrg.evaluation.demo_card import read_log
from mrg.model import MRGModel
from mrg.model.llm import load_frozen_llm
from mrg.text.phrasing import PHRASING_NAME, Phrasing
from mrg.text.vocabulary import VOCABULARY_NAME, report_vocabulary, write_vocabulary
from mrg.train.config import StageConfig, train_preset
from mrg.train.trainer import Trainer

log = logging.getLogger("build_demo_checkpoints")


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


def keep_previous(assets: Path, modes: list[str]) -> None:
    """The checkpoints shipped before, copied once to assets/baselines before the new ones
    overwrite them: the paper's image-only form (``V_ONLY``) and the models conditioned on
    the head's present findings y (``FINDINGS_Y``), each a row of the model card."""
    for mode in modes:
        source = assets / "checkpoints" / mode
        if not (source / CONFIG_NAME).is_file():
            continue
        config = ModelConfig.load(source / CONFIG_NAME)
        if config.uses_states:
            continue
        previous = assets / (FINDINGS_Y if config.uses_findings else V_ONLY) / mode
        if not (previous / CONFIG_NAME).is_file():
            shutil.copytree(source, previous)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["prompt-wise", "promptbook-wise"])
    parser.add_argument("--reports-per-image", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "runs" / "demo"))
    parser.add_argument("--assets", default=str(ROOT / "assets"))
    parser.add_argument(
        "--skip-train", action="store_true", help="ship the checkpoints already trained"
    )
    parser.add_argument(
        "--skip-card", action="store_true", help="ship without rebuilding the model card"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    torch.set_num_threads(args.threads)
    out, assets = Path(args.out), Path(args.assets)

    annotation = out / "pairs" / "annotation.json"
    summary = build_pairs(SHARED / "nih_cxr14", REPORTS, annotation, args.reports_per_image)
    log.info("pairs: %s", summary)
    images = SHARED / "nih_cxr14" / "images"
    records = load_annotation(annotation, images)
    train, val = ([r for r in records if r.split == s] for s in ("train", "val"))
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
    keep_previous(assets, args.modes)
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
    # The words the models may write (the trainer saves them; a checkpoint trained before the
    # vocabulary existed gets them here), and how they phrase them: all the reports they
    # learnt from, the language stage's too.
    reports = [r.report for r in train] + corpus.train
    vocabulary, phrasing = report_vocabulary(reports), Phrasing.from_reports(reports)
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
        best = out / mode / "best"
        if not (best / VOCABULARY_NAME).is_file():
            write_vocabulary(best / VOCABULARY_NAME, vocabulary)
        phrasing.save(best / PHRASING_NAME)  # a mode's trainer saw its image reports only
        model = MRGModel.from_pretrained(best, llm=llm, tokenizer=tokenizer)
        model.save_pretrained(assets / "checkpoints" / mode, dtype=torch.float16)
    (assets / LANGUAGE_PROMPT).parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {"prompt": shared_weights["customizer.prompt"].contiguous()}, str(assets / LANGUAGE_PROMPT)
    )
    logs = {"shared": read_log(shared / "log.jsonl")}
    logs.update({mode: read_log(out / mode / "log.jsonl") for mode in args.modes})
    record = {
        "args": "".join(f" {a}" for a in sys.argv[1:] if a not in ("--skip-train", "--skip-card")),
        "reports_per_image": args.reports_per_image,
        "logs": logs,
    }
    (assets / RECORD_NAME).write_text(json.dumps(record, indent=1) + "\n")
    if not args.skip_card:
        build_card(assets, ROOT / "runs" / "card")


if __name__ == "__main__":
    main()

"""Generation trained on the findings head's decisions, beside the shipped true-label recipe.

    python scripts/condition_ways.py [--mode prompt-wise]

PromptMRG trains its decoder on the true disease states and tests it on predicted ones; the
shipped recipe does the same (y = the labeler's labels of the paired report). The other
choice trains on what the model will be given at test time: the calibrated head's decisions
on the training images (``TrainConfig.findings_head``). This script runs the generation stage
of ``--mode`` that way, from the same language and alignment weights as the shipped build
(runs/demo/shared, ``scripts/build_demo_checkpoints.py``), and scores it on the test split as
the card scores the shipped modes. The scores go to assets/condition_ways.json, which
``scripts/build_model_card.py`` puts on the card.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from build_demo_checkpoints import demo_config
from build_model_card import REPORTS, SHARED
from safetensors.torch import load_file

from mrg.config import DEFAULT_DECODING
from mrg.data.datasets import load_annotation
from mrg.data.pairs import build_pairs
from mrg.evaluation.demo_card import score
from mrg.evaluation.runner import generate_split
from mrg.evaluation.text_quality import corpus_counts, text_quality
from mrg.model import MRGModel
from mrg.model.findings import FINDINGS_FOLDER, FindingsHead
from mrg.model.llm import load_frozen_llm
from mrg.text.labeler import ReportLabeler
from mrg.train.config import StageConfig
from mrg.train.trainer import Trainer

log = logging.getLogger("condition_ways")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="prompt-wise")
    parser.add_argument("--demo", default=str(ROOT / "runs" / "demo"))
    parser.add_argument("--assets", default=str(ROOT / "assets"))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    demo, assets = Path(args.demo), Path(args.assets)
    head_dir = assets / "checkpoints" / FINDINGS_FOLDER
    annotation = demo / "pairs" / "annotation.json"
    build_pairs(SHARED / "nih_cxr14", REPORTS, annotation, 1)
    images = SHARED / "nih_cxr14" / "images"
    records = load_annotation(annotation, images)
    train, val, test = ([r for r in records if r.split == s] for s in ("train", "val", "test"))
    out = demo / f"{args.mode}-head-condition"
    config = demo_config(args.mode, annotation, images, out)
    config.language = StageConfig(0, config.language.lr)
    config.align = StageConfig(0, config.align.lr)
    config.findings_head = str(head_dir)
    llm, tokenizer = load_frozen_llm(config.model.llm)
    shared = demo / "shared" / "last"
    torch.manual_seed(config.seed)
    model = MRGModel(config.model, llm, tokenizer)
    model.load_trainable(shared, prefix="encoder.")
    model.customizer.set_plain_prompt(
        load_file(str(shared / "model.safetensors"))["customizer.prompt"]
    )
    Trainer(config, model, train, val, resume=True).fit()
    best = MRGModel.from_pretrained(out / "best", llm=llm, tokenizer=tokenizer).eval()
    assert best.report_vocabulary, "the trainer saves the report vocabulary beside the weights"
    head = FindingsHead.from_pretrained(head_dir)
    rows = generate_split(
        best, test, out / "test_generations.jsonl", DEFAULT_DECODING, findings_head=head
    )
    labeler = ReportLabeler()
    image_labels = {r.study_id: r.labels for r in test}
    name = f"{args.mode}, trained on the head's findings"
    result = {
        name: {
            "scores": score(rows, image_labels, labeler),
            "text_quality": text_quality(
                [r["generated"] for r in rows], corpus_counts(REPORTS), labeler=labeler
            ).as_dict(),
        }
    }
    target = assets / "condition_ways.json"
    previous = json.loads(target.read_text()) if target.is_file() else {}
    target.write_text(json.dumps(previous | result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Label fidelity of the other ways into the report-language stage, beside the shipped one.

    python scripts/fidelity_ways.py [--ways affine words+affine] [--steps 300]

Each way trains a fresh prompt-wise model's report-language stage with the
``demo-checkpoints`` recipe (balanced batches, weighted finding sentences) and only the way
in changed, then writes from the true findings of the same held-out OpenI reports as the
shipped words way, without the lead (``mrg.evaluation.fidelity``):

* ``affine``: y reaches the prompt only through the affine heads, P' = γ(0, y) ⊙ P + β(0, y);
* ``words+affine``: both.

Results go to runs/fidelity/<way>/fidelity.json and assets/fidelity_ways.json, which the
model card's fidelity table reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mrg.config import DEFAULT_DECODING
from mrg.data.datasets import load_annotation
from mrg.data.language import HeldOut, report_corpus
from mrg.data.pairs import build_pairs
from mrg.environment import setting
from mrg.evaluation.fidelity import fidelity_sample, language_fidelity
from mrg.model import MRGModel
from mrg.model.llm import load_frozen_llm
from mrg.train.config import StageConfig, train_preset
from mrg.train.trainer import Trainer

log = logging.getLogger("fidelity_ways")
SHARED = Path(setting("MRG_SHARED_DATA"))
REPORTS = SHARED / "iu_xray" / "NLMCXR_reports.tgz"
WAYS = {"affine": ("none", "visual+findings"), "words+affine": ("words", "visual+findings")}
# the way in alone, as the card's "words" row: the answer does not begin with the findings
WITHOUT_LEAD = dataclasses.replace(DEFAULT_DECODING, lead_with_findings=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ways", nargs="+", default=list(WAYS), choices=list(WAYS))
    parser.add_argument("--out", default=str(ROOT / "runs" / "fidelity"))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    annotation = out / "pairs" / "annotation.json"
    build_pairs(SHARED / "nih_cxr14", REPORTS, annotation, 1)
    records = load_annotation(annotation, SHARED / "nih_cxr14" / "images")
    train = [r for r in records if r.split == "train"]  # the loader wants studies; unused here
    held_out = HeldOut.from_records(records)
    held_out.update(
        HeldOut.from_records(load_annotation(SHARED / "iu_xray" / "annotation.json", "."))
    )
    corpus = report_corpus(REPORTS, held_out)
    llm, tokenizer = load_frozen_llm(train_preset("demo-checkpoints").model.llm)
    results = {}
    for way in args.ways:
        folder = out / way
        record = folder / "fidelity.json"
        if not record.is_file():
            config = train_preset(
                "demo-checkpoints",
                mode="prompt-wise",
                output_dir=str(folder),
                language_reports=str(REPORTS),
            )
            config.model.findings_prompt, config.model.customizer.conditioning = WAYS[way]
            config.align = StageConfig(0, config.align.lr)
            config.generate = StageConfig(0, config.generate.lr)
            torch.manual_seed(config.seed)
            model = MRGModel(config.model, llm, tokenizer)
            Trainer(config, model, train, [], resume=True, language=corpus).fit()
            sample = fidelity_sample(corpus.val + corpus.held_out_texts)
            scores, rows = language_fidelity(model, sample, WITHOUT_LEAD)
            record.write_text(json.dumps({"scores": scores, "rows": rows}, indent=1) + "\n")
        results[way] = json.loads(record.read_text())["scores"]
        log.info("%s: fidelity micro-F1 %.3f", way, results[way]["micro_f1"])
    (ROOT / "assets" / "fidelity_ways.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

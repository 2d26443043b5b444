"""State fidelity, BLEU-4 and CIDEr of one checkpoint on the model card's held-out OpenI reports,
each written from its own labeler states with the card's fixed image, beside the fixed normal
template on the same reports: the quick loop for a decoding choice (80–110 s for 40 reports on
2 cores). ``--dev`` draws other held-out reports the same way, which the card does not
score (35 of them, 11 naming a finding: the card takes nearly every short abnormal one):
tune there, and read the card's once. Reads the references from
``runs/card/states/prompt-wise.json`` (``scripts/build_model_card.py`` writes it) or, where
the card has not run, draws them as the card does (the held-out OpenI reports of
``fidelity_sample``; the NIH pairs are rebuilt under ``runs/openi-language``, about a
minute).

    python scripts/openi_language.py assets/checkpoints/prompt-wise --reports 40 \\
        --decoding '{"phrasing_weight": 0.5}' --out rows.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mrg.config import Decoding
from mrg.data.datasets import load_annotation
from mrg.data.language import HeldOut, report_corpus
from mrg.data.pairs import build_pairs
from mrg.data.study import batch_tensors, study_from_sources
from mrg.environment import setting
from mrg.evaluation.fidelity import fidelity_sample, language_fidelity
from mrg.evaluation.metrics import nlg_scores
from mrg.evaluation.states_card import NORMAL_TEMPLATE
from mrg.model import MRGModel
from mrg.text.labeler import ReportLabeler

ROOT = Path(__file__).resolve().parents[1]
CARD_ROWS = ROOT / "runs" / "card" / "states" / "prompt-wise.json"
FIXED_IMAGE = ROOT / "assets" / "examples" / "00004934_000.png"  # the card's


def held_out_texts() -> list[str]:
    """The held-out OpenI report texts the card samples from (the NIH pairs are rebuilt under
    ``runs/openi-language``, about a minute)."""
    shared = Path(setting("MRG_SHARED_DATA"))
    reports = shared / "iu_xray" / "NLMCXR_reports.tgz"
    record = json.loads((ROOT / "assets" / "training_record.json").read_text())
    annotation = ROOT / "runs" / "openi-language" / "annotation.json"
    build_pairs(shared / "nih_cxr14", reports, annotation, record.get("reports_per_image", 1))
    held_out = HeldOut.from_records(load_annotation(annotation, shared / "nih_cxr14" / "images"))
    held_out.update(
        HeldOut.from_records(load_annotation(shared / "iu_xray" / "annotation.json", "."))
    )
    corpus = report_corpus(reports, held_out)
    return corpus.val + corpus.held_out_texts


def card_references(texts: list[str] | None = None) -> list[str]:
    """The card's held-out OpenI references, from its cache or drawn as it draws them from
    ``texts`` (``held_out_texts()`` where not given)."""
    if CARD_ROWS.is_file():
        return [r["reference"] for r in json.loads(CARD_ROWS.read_text())["rows"]]
    return fidelity_sample(held_out_texts() if texts is None else texts)


def dev_references() -> list[str]:
    """Held-out OpenI references the card does not score, drawn as it draws its own (up to
    the next 100 that name a finding and 30 that name none): where decoding is tuned."""
    texts = held_out_texts()
    card = set(card_references(texts))
    return [t for t in fidelity_sample(texts, abnormals=200, normals=60) if t not in card]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--reports", type=int, default=130)
    parser.add_argument("--decoding", default="{}", help="Decoding fields as JSON")
    parser.add_argument("--out", help="write the rows (reference, states, generated) here")
    parser.add_argument(
        "--dev", action="store_true", help="the held-out reports the card does not score"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    references = (dev_references() if args.dev else card_references())[: args.reports]
    print(f"{len(references)} held-out OpenI reports{' (dev)' if args.dev else ''}")
    decoding = Decoding(**json.loads(args.decoding)).validate()
    model = MRGModel.from_pretrained(args.checkpoint).eval()
    image = batch_tensors([study_from_sources(FIXED_IMAGE)], 224, 1)
    start = time.perf_counter()
    scores, rows = language_fidelity(model, references, decoding, ReportLabeler(), image=image)
    written = [r["generated"] for r in rows]
    ours = nlg_scores(references, written, meteor=False).corpus
    template = nlg_scores(references, [NORMAL_TEMPLATE] * len(rows), meteor=False).corpus
    words = sum(len(t.split()) for t in written) / len(written)
    print(decoding)
    print(
        f"state fidelity {scores['states']['fidelity']:.3f}  BLEU-4 {ours['BLEU_4']:.3f}  "
        f"CIDEr {ours['CIDEr']:.3f}  words {words:.1f}  |  fixed template BLEU-4 "
        f"{template['BLEU_4']:.3f} CIDEr {template['CIDEr']:.3f}  |  "
        f"{time.perf_counter() - start:.0f} s"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

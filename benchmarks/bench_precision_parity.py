"""Report quality in every setting ``auto`` can give the frozen LLM on a CPU, against fp32.

    python benchmarks/bench_precision_parity.py [--settings float32 bfloat16 int8-wo int4-wo]
                                                [--modes prompt-wise promptbook-wise] [--limit N]

Builds the demo pairs from ../shared/data as ``scripts/build_model_card.py`` does, loads the
service once per setting, writes the greedy report of every held-out NIH image as the app
serves it (``ReportService.generate``: the gate, the findings head's findings, the app's
default decoding through the batcher), and prints per mode and setting the
model card's scores (CE micro-F1 against the NIH labels, BLEU-4 against the paired report,
the share of words seen ≥ 5× in OpenI, words per report, the share that addresses heart,
lungs and pleura), how many reports equal fp32's, and the paired
bootstrap 95 % interval of each score's difference from fp32 (1,000 resamples of the images):
a drop whose interval holds 0 is within the noise of the test split. Generations go to
runs/precision-parity-service/ (resumable).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mrg.config import DEFAULT_DECODING
from mrg.data.datasets import load_annotation
from mrg.data.pairs import build_pairs
from mrg.data.study import study_from_sources
from mrg.environment import setting
from mrg.evaluation.metrics import label_agreement
from mrg.evaluation.runner import Generations
from mrg.evaluation.text_quality import corpus_counts
from mrg.model.cpu_probe import SETTINGS
from mrg.service import ReportService
from mrg.text.anatomy import unaddressed
from mrg.text.labeler import ReportLabeler
from mrg.text.taxonomy import FINDINGS14
from mrg.text.vocabulary import words

SHARED = Path(setting("MRG_SHARED_DATA"))
REPORTS = SHARED / "iu_xray" / "NLMCXR_reports.tgz"
RESAMPLES = 1000


def serve_split(service: ReportService, mode: str, records, out_file: Path) -> list[dict]:
    """The app's report of every study of ``records`` not in ``out_file`` yet, appended
    there; all rows, in the order of ``records``."""
    generations = Generations(out_file)
    with generations.path.open("a") as handle:
        for record in tqdm(generations.todo(records), desc=f"serving ({mode})"):
            study = study_from_sources(*record.image_paths)
            text = service.generate(study, mode, DEFAULT_DECODING, allow_anyway=True).text
            generations.add(handle, record.study_id, record.report, text)
    return generations.rows(records)


def per_image(rows, labels, labeler, counts) -> dict[str, list]:
    """What each score sums over the images: label dicts, BLEU pairs, known/all words."""
    generated = [r["generated"] for r in rows]
    return {
        "truth": [{f: int(f in labels[r["id"]]) for f in FINDINGS14} for r in rows],
        "predicted": [labeler.label14(text) for text in generated],
        "references": [r["reference"] for r in rows],
        "generated": generated,
        "known": [sum(counts[w] >= 5 for w in words(t)) for t in generated],
        "words": [len(words(t)) for t in generated],
        "anatomy": [not unaddressed(t) for t in generated],
    }


def scores(parts: dict[str, list], index: list[int]) -> dict[str, float]:
    """CE micro-F1, BLEU-4, the vocabulary share, words per report and the share addressing
    heart, lungs and pleura over the images ``index`` (with repeats)."""
    from pycocoevalcap.bleu.bleu import Bleu

    from mrg.text.cleaning import clean_report_iu_xray

    pick = lambda key: [parts[key][i] for i in index]
    ce = label_agreement(pick("truth"), pick("predicted"), FINDINGS14).micro.f1
    one_line = lambda t: clean_report_iu_xray(" ".join(t.split()))
    gts = {k: [one_line(t)] for k, t in enumerate(pick("references"))}
    res = {k: [one_line(t)] for k, t in enumerate(pick("generated"))}
    bleu = Bleu(4).compute_score(gts, res, verbose=0)[0][3]
    return {
        "CE micro-F1": ce,
        "BLEU-4": bleu,
        "vocabulary": sum(pick("known")) / sum(pick("words")),
        "words": sum(pick("words")) / len(index),
        "anatomy": sum(pick("anatomy")) / len(index),
    }


def intervals(reference: dict, others: dict[str, dict], n: int, seed: int = 0) -> dict:
    """Per setting of ``others``: the 95 % bootstrap interval of ``scores(setting) −
    scores(reference)``, each resample drawing the same images for both."""
    rng = random.Random(seed)
    draws: dict[str, list[dict]] = {name: [] for name in others}
    for _ in range(RESAMPLES):
        index = [rng.randrange(n) for _ in range(n)]
        base = scores(reference, index)
        for name, parts in others.items():
            value = scores(parts, index)
            draws[name].append({k: value[k] - base[k] for k in base})
    bounds = {}
    for name, rows in draws.items():
        bounds[name] = {}
        for key in rows[0]:
            values = sorted(d[key] for d in rows)
            bounds[name][key] = (values[int(0.025 * RESAMPLES)], values[int(0.975 * RESAMPLES) - 1])
    return bounds


def cell(value: dict, interval: dict, key: str) -> str:
    """A score, with the interval of its difference from fp32 where there is one."""
    digits = 1 if key == "words" else 3
    if key not in interval:
        return f"{value[key]:.{digits}f}"
    low, high = interval[key]
    return f"{value[key]:.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--modes", nargs="+", default=["prompt-wise", "promptbook-wise"])
    parser.add_argument("--limit", type=int, default=None, help="first N held-out images only")
    parser.add_argument("--out", default=str(ROOT / "runs" / "precision-parity-service"))
    args = parser.parse_args()
    torch.set_num_threads(int(setting("MRG_NUM_THREADS")))
    out = Path(args.out)
    annotation = out / "pairs" / "annotation.json"
    build_pairs(SHARED / "nih_cxr14", REPORTS, annotation, 1)
    records = load_annotation(annotation, SHARED / "nih_cxr14" / "images", split="test")
    records = records[: args.limit] if args.limit else records
    labels = {r.study_id: r.labels for r in records}
    labeler, counts = ReportLabeler(), corpus_counts(REPORTS)
    settings = ["float32", *(s for s in args.settings if s != "float32")]
    rows, seconds = {}, {}
    for name in settings:
        quantization, dtype = SETTINGS[name]
        service = ReportService.load(quantization=quantization, dtype=dtype)
        assert (service.info.quantization, service.info.dtype) == (quantization, dtype)
        for mode in args.modes:
            start = time.perf_counter()
            rows[mode, name] = serve_split(service, mode, records, out / f"{mode}-{name}.jsonl")
            seconds[mode, name] = time.perf_counter() - start
        del service
    table = Table(
        title=f"Each setting against fp32 on {len(records)} held-out images (greedy, app "
        "defaults; [95 % paired bootstrap interval of the difference])"
    )
    keys = ("CE micro-F1", "BLEU-4", "vocabulary", "words", "anatomy")
    for column in ("mode", "setting", *keys, "= fp32", "s"):
        table.add_column(column, justify="left" if column in ("mode", "setting") else "right")
    everyone = list(range(len(records)))
    for mode in args.modes:
        parts = {name: per_image(rows[mode, name], labels, labeler, counts) for name in settings}
        others = {name: p for name, p in parts.items() if name != "float32"}
        bounds = intervals(parts["float32"], others, len(records))
        for name in settings:
            value, interval = scores(parts[name], everyone), bounds.get(name, {})
            same = sum(
                a == b for a, b in zip(parts["float32"]["generated"], parts[name]["generated"])
            )
            table.add_row(
                mode,
                name,
                *(cell(value, interval, k) for k in keys),
                f"{same}/{len(records)}",
                f"{seconds[mode, name]:.0f}" if seconds[mode, name] > 1 else "cached",
            )
    Console().print(table)


if __name__ == "__main__":
    main()

"""Report quality in fp32 against bf16: the shipped checkpoints on the demo's held-out split.

    python benchmarks/bench_dtype_parity.py [--modes prompt-wise promptbook-wise] [--limit N]

Builds the demo pairs from ../shared/data as ``scripts/build_demo_checkpoints.py`` does, loads
the service once per LLM dtype, writes the greedy report (the app's default decoding) of every
held-out NIH image in each, and prints per mode and dtype the model card's scores (CE against
the NIH labels, BLEU-4 and CIDEr against the paired report), how many reports are identical
in both dtypes, and the seconds each took. Generations go to runs/dtype-parity/ (resumable).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mrg.config import DEFAULT_DECODING
from mrg.data.datasets import load_annotation
from mrg.data.pairs import build_pairs
from mrg.environment import setting
from mrg.evaluation.demo_card import score
from mrg.evaluation.runner import generate_split
from mrg.service import ReportService
from mrg.text.labeler import ReportLabeler

SHARED = Path(setting("MRG_SHARED_DATA"))
DTYPES = ("float32", "bfloat16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["prompt-wise", "promptbook-wise"])
    parser.add_argument("--limit", type=int, default=None, help="first N held-out images only")
    parser.add_argument("--out", default=str(ROOT / "runs" / "dtype-parity"))
    args = parser.parse_args()
    torch.set_num_threads(int(setting("MRG_NUM_THREADS")))
    out = Path(args.out)
    annotation = out / "pairs" / "annotation.json"
    build_pairs(SHARED / "nih_cxr14", SHARED / "iu_xray" / "NLMCXR_reports.tgz", annotation, 1)
    records = load_annotation(annotation, SHARED / "nih_cxr14" / "images", split="test")
    records = records[: args.limit] if args.limit else records
    labels = {r.study_id: r.labels for r in records}
    labeler = ReportLabeler()
    rows, seconds = {}, {}
    for dtype in DTYPES:
        service = ReportService.load(dtype=dtype)
        for mode in args.modes:
            start = time.perf_counter()
            # bf16 one study at a time: on a CPU without fast bf16 matrix products (this one)
            # batching would make it slower, and the app streams one study per request anyway
            batch = 8 if dtype == "float32" else 1
            rows[mode, dtype] = generate_split(
                service.model(mode),
                records,
                out / f"{mode}-{dtype}.jsonl",
                DEFAULT_DECODING,
                batch_size=batch,
            )
            seconds[mode, dtype] = time.perf_counter() - start
    table = Table(title=f"fp32 vs bf16 on {len(records)} held-out images (greedy, app defaults)")
    for column in ("mode", "dtype", "CE micro-F1", "BLEU-4", "CIDEr", "identical", "seconds"):
        table.add_column(column, justify="left" if column in ("mode", "dtype") else "right")
    for mode in args.modes:
        fp32 = {r["id"]: r["generated"] for r in rows[mode, "float32"]}
        for dtype in DTYPES:
            result = score(rows[mode, dtype], labels, labeler)
            same = sum(fp32[r["id"]] == r["generated"] for r in rows[mode, dtype])
            table.add_row(
                mode,
                dtype,
                f"{result['CE_micro_F1']:.3f}",
                f"{result['BLEU_4']:.3f}",
                f"{result['CIDEr']:.3f}",
                f"{same}/{len(records)}",
                f"{seconds[mode, dtype]:.0f}",
            )
    Console().print(table)


if __name__ == "__main__":
    main()

"""Service latency on this machine, fp32 against bf16: time to first token, tokens/s, Grad-CAM.

    python benchmarks/bench_service.py [--checkpoints assets/checkpoints] [--dtypes float32 bfloat16]
                                       [--tokens 120] [--repeats 3]

Loads the service as the app does (trained checkpoints when present, else untrained demo
models) once per LLM dtype, and a real study (IU X-ray sample from ../shared/data, else the
pydicom-data chest CR); greedy decoding with the app's defaults. Prints one row per mode and
dtype, the bf16/fp32 ratios measured in the same run, and whether the reports are identical.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mrg.config import DEFAULT_DECODING
from mrg.data.study import study_from_sources
from mrg.environment import setting
from mrg.model import Decoding
from mrg.service import ReportService, report_sentences

SHARED = Path(setting("MRG_SHARED_DATA"))


def load_study():
    root = SHARED / "iu_xray" / "images" / "CXR2843_IM-1254-1001"
    if root.exists():
        return study_from_sources(
            root / "0.png", root / "1.png"
        ), "IU X-ray CXR2843 (frontal + lateral)"
    from pydicom.data import get_testdata_file

    return study_from_sources(get_testdata_file("RG1_UNCI.dcm")), "pydicom-data RG1_UNCI (DICOM CR)"


def measure(service: ReportService, study, decoding: Decoding, repeats: int) -> dict:
    """Per mode: median TTFT, tokens/s, full-report and Grad-CAM seconds, and the report."""
    rows = {}
    for mode in service.models:
        runs = [service.generate(study, mode, decoding) for _ in range(repeats)]
        report = runs[-1].text
        sentence = (report_sentences(report) or [None])[0]
        cam, cam_sentence = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            service.explain(study, mode, report)
            cam.append(time.perf_counter() - t)
            if sentence:
                t = time.perf_counter()
                service.explain(study, mode, report, sentence)
                cam_sentence.append(time.perf_counter() - t)
        median = statistics.median
        rows[mode] = {
            "ttft": median(r.ttft_s or 0 for r in runs),
            "rate": median(r.tokens_per_s or 0 for r in runs),
            "tokens": runs[-1].tokens,
            "full": median(r.elapsed_s for r in runs),
            "cam": median(cam),
            "cam_sentence": median(cam_sentence) if cam_sentence else float("nan"),
            "report": report,
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", default=None)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--tokens", type=int, default=DEFAULT_DECODING.max_new_tokens)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    study, label = load_study()
    decoding = dataclasses.replace(DEFAULT_DECODING, max_new_tokens=args.tokens)
    results, loads, device = {}, {}, ""
    for dtype in args.dtypes:
        start = time.perf_counter()
        service = ReportService.load(args.checkpoints, dtype=dtype)
        loads[dtype], device = time.perf_counter() - start, service.info.device
        results[dtype] = measure(service, study, decoding, args.repeats)
        del service
    table = Table(
        title=f"Service on {device}, {label}, trained={bool(args.checkpoints) or 'default'}"
    )
    columns = ("mode", "dtype", "load (s)", "TTFT (s)", "tokens/s", "tokens", "full report (s)")
    for column in (*columns, "Grad-CAM report (s)", "Grad-CAM sentence (s)"):
        table.add_column(column, justify="left" if column in ("mode", "dtype") else "right")
    for dtype, rows in results.items():
        for mode, r in rows.items():
            table.add_row(
                mode,
                dtype,
                f"{loads[dtype]:.1f}",
                f"{r['ttft']:.3f}",
                f"{r['rate']:.1f}",
                str(r["tokens"]),
                f"{r['full']:.2f}",
                f"{r['cam']:.2f}",
                f"{r['cam_sentence']:.2f}",
            )
    console = Console(width=150)
    console.print(table)
    if {"float32", "bfloat16"} <= set(results):
        for mode in results["float32"]:
            fp32, bf16 = results["float32"][mode], results["bfloat16"][mode]
            console.print(
                f"{mode}: bf16/fp32 tokens/s ×{bf16['rate'] / fp32['rate']:.2f}, "
                f"TTFT ×{bf16['ttft'] / fp32['ttft']:.2f}, Grad-CAM ×{bf16['cam'] / fp32['cam']:.2f}; "
                f"greedy reports {'identical' if bf16['report'] == fp32['report'] else 'differ'}"
            )
            if bf16["report"] != fp32["report"]:
                console.print(f"  fp32: {fp32['report']!r}\n  bf16: {bf16['report']!r}")


if __name__ == "__main__":
    main()

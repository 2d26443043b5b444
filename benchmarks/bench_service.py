"""Service latency on this machine: time to first token, tokens/s, full report, Grad-CAM.

    python benchmarks/bench_service.py [--checkpoints assets/checkpoints] [--tokens 80] [--repeats 2]

Loads the service as the app does (trained checkpoints when present, else untrained demo
models) and a real study (IU X-ray sample from ../shared/data, else the pydicom-data chest
CR), then prints one table per mode.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mrg.data.study import study_from_sources
from mrg.model import Decoding
from mrg.service import ReportService, report_sentences

SHARED = Path(
    os.environ.get("MRG_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)


def load_study():
    root = SHARED / "iu_xray" / "images" / "CXR2843_IM-1254-1001"
    if root.exists():
        return study_from_sources(
            root / "0.png", root / "1.png"
        ), "IU X-ray CXR2843 (frontal + lateral)"
    from pydicom.data import get_testdata_file

    return study_from_sources(get_testdata_file("RG1_UNCI.dcm")), "pydicom-data RG1_UNCI (DICOM CR)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", default=None)
    parser.add_argument("--tokens", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    service = ReportService.load(args.checkpoints)
    load_s = time.perf_counter() - start
    study, label = load_study()
    decoding = Decoding(max_new_tokens=args.tokens, repetition_penalty=1.2)
    table = Table(
        title=f"Service on {service.info.device}, {label}, load {load_s:.1f} s, trained={service.info.trained}"
    )
    for column in (
        "mode",
        "TTFT (s)",
        "tokens/s",
        "tokens",
        "full report (s)",
        "Grad-CAM report (s)",
        "Grad-CAM sentence (s)",
    ):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for mode in service.models:
        runs = [service.generate(study, mode, decoding) for _ in range(args.repeats)]
        report = runs[-1].text or "FINDINGS: The lungs are clear."
        sentence = (report_sentences(report) or [None])[0]
        cam_times, sentence_times = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            service.explain(study, mode, report)
            cam_times.append(time.perf_counter() - t)
            if sentence:
                t = time.perf_counter()
                service.explain(study, mode, report, sentence)
                sentence_times.append(time.perf_counter() - t)
        median = statistics.median
        table.add_row(
            mode,
            f"{median(r.ttft_s or 0 for r in runs):.3f}",
            f"{median(r.tokens_per_s or 0 for r in runs):.1f}",
            str(runs[-1].tokens),
            f"{median(r.elapsed_s for r in runs):.2f}",
            f"{median(cam_times):.2f}",
            f"{median(sentence_times):.2f}" if sentence_times else "—",
        )
    Console(width=140).print(table)


if __name__ == "__main__":
    main()

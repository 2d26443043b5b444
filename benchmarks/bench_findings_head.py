"""The findings head's cost per study on this CPU, and its checkpoint's size.

    python benchmarks/bench_findings_head.py [--heads assets/checkpoints/findings]
                                             [--backbones tf_efficientnet_lite0 ...] [--repeats 20]

For the shipped head (``--heads``: checkpoint folders) and for each EfficientNet-Lite of
``--backbones`` at its cross-validated resolution (ImageNet weights, an untrained classifier:
the cost is the network's, not its training's), on one shipped example read as the service
reads it (one frontal view): the median wall time of the head's pass that serves the gate and
the findings (``mrg.model.gate.read_study``: the view's tensor, the pooled features, the
gate's scores) plus the probabilities and states (``predict_pooled``), over ``--repeats``
warm runs with the service's threads (all cores); the size of the weights on disk. The
issue's budget: ≤ 100 ms per study on 2 cores and ≤ 50 MB.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mrg.data.study import study_from_sources
from mrg.model.cpu_probe import machine_key
from mrg.model.findings import FINDINGS_WEIGHTS_NAME, FindingsHead, FindingsHeadConfig
from mrg.model.gate import read_study

SIZES = {"tf_efficientnet_lite0": 224, "tf_efficientnet_lite1": 240, "tf_efficientnet_lite2": 260}
BUDGET_MS, BUDGET_MB = 100.0, 50.0


def per_study_ms(head: FindingsHead, repeats: int) -> float:
    study = study_from_sources(min((ROOT / "assets" / "examples").glob("*.png")))
    times = []
    for _ in range(repeats + 2):  # two warm-up passes
        start = time.perf_counter()
        _, features = read_study(study, head, None)
        head.predict_pooled(features, states=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:]) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", nargs="*", default=[str(ROOT / "assets/checkpoints/findings")])
    parser.add_argument("--backbones", nargs="*", default=list(SIZES))
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    console = Console(width=120)
    table = Table(title=f"Findings head per study ({machine_key()}, {os.cpu_count()} cores)")
    for column in ("head", "input", "ms per study (median)", "weights MB", "within budget"):
        table.add_column(column, justify="left" if column == "head" else "right")
    candidates = [
        (f"shipped ({Path(h).name})", FindingsHead.from_pretrained(h), Path(h)) for h in args.heads
    ]
    scratch = Path(tempfile.mkdtemp(prefix="mrg-head-"))
    for name in args.backbones:
        head = FindingsHead(FindingsHeadConfig(backbone=name, image_size=SIZES[name])).eval()
        candidates.append((name, head, head.save_pretrained(scratch / name)))
    for label, head, folder in candidates:
        ms = per_study_ms(head.eval(), args.repeats)
        mb = (folder / FINDINGS_WEIGHTS_NAME).stat().st_size / 1e6
        table.add_row(
            label,
            f"{head.config.image_size} px",
            f"{ms:.1f}",
            f"{mb:.1f}",
            "yes" if ms <= BUDGET_MS and mb <= BUDGET_MB else "NO",
        )
    console.print(table)


if __name__ == "__main__":
    main()

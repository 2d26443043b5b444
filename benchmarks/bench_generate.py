"""LLM load time, time to first token and tokens/s per customizer mode, and peak memory.

    python benchmarks/bench_generate.py [--tokens 64] [--repeats 3] [--skip-conversion]

Runs on whatever device is present (CPU here). The first LLM load converts the GGUF in a
fresh temporary cache (the cost a new user pays once); the second reads the cached copy.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mrg.config import CUSTOMIZER_MODES, LLMConfig
from mrg.data.study import batch_tensors, study_from_sources
from mrg.data.views import Views
from mrg.environment import setting
from mrg.model import Decoding, MRGModel
from mrg.model.llm import load_frozen_llm
from mrg.presets import model_preset

SHARED = Path(setting("MRG_SHARED_DATA"))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def study_tensors(size: int):
    root = SHARED / "iu_xray" / "images" / "CXR2843_IM-1254-1001"
    if root.exists():
        study = study_from_sources(root / "0.png", root / "1.png")
        return batch_tensors([study], size), "IU X-ray CXR2843 (2 views)"
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(1, 2, 1, size, size, generator=generator)
    return Views(images, torch.tensor([[0, 1]]), torch.ones(1, 2, dtype=torch.bool)), (
        "random 2-view input"
    )


def time_stream(model: MRGModel, inputs, decoding: Decoding) -> tuple[float, float, int]:
    """(time to first token s, tokens/s after the first, tokens)"""
    start = time.perf_counter()
    first = None
    count = 0
    for _ in model.stream_ids(inputs, decoding):
        count += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    rate = (count - 1) / (end - first) if count > 1 else float("nan")
    return first - start, rate, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument(
        "--skip-conversion", action="store_true", help="do not time the one-off GGUF conversion"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=120)
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU ({args.threads} threads)"
    )

    loads = Table(title=f"SmolLM2-135M load — {device}")
    loads.add_column("load")
    loads.add_column("seconds", justify="right")
    if not args.skip_conversion:
        with tempfile.TemporaryDirectory() as cache:
            start = time.perf_counter()
            load_frozen_llm(LLMConfig(cache_dir=cache))
            loads.add_row(
                "first (GGUF → safetensors conversion)", f"{time.perf_counter() - start:.1f}"
            )
    start = time.perf_counter()
    llm, tokenizer = load_frozen_llm(LLMConfig())
    loads.add_row("cached safetensors", f"{time.perf_counter() - start:.1f}")
    console.print(loads)

    base = model_preset("demo-cpu")
    inputs, label = study_tensors(base.encoder.image_size)
    decoding = Decoding(max_new_tokens=args.tokens, repetition_penalty=1.2)
    table = Table(
        title=f"Greedy streaming, {label}, up to {args.tokens} new tokens, median of {args.repeats}"
    )
    for column in ("mode", "time to first token (s)", "tokens/s", "tokens", "peak RSS (MiB)"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for mode in CUSTOMIZER_MODES:
        torch.manual_seed(0)
        model = MRGModel(model_preset("demo-cpu", mode), llm, tokenizer).eval()
        time_stream(model, inputs, Decoding(max_new_tokens=2))  # warm-up
        runs = [time_stream(model, inputs, decoding) for _ in range(args.repeats)]
        table.add_row(
            mode,
            f"{statistics.median(r[0] for r in runs):.3f}",
            f"{statistics.median(r[1] for r in runs):.1f}",
            str(runs[0][2]),
            f"{peak_rss_mib():.0f}",
        )
    console.print(table)


if __name__ == "__main__":
    main()

"""Where a decoded token's time goes on the app's default path (torch.profiler).

    python benchmarks/profile_decoding.py [--quantization auto|none|int8-wo|int4-wo]
                                          [--dtype auto|float32|bfloat16]
                                          [--tokens 60] [--threads 2]

Loads the service as ``python app.py`` does (shipped checkpoints, SmolLM2), generates one
greedy report for a shipped example (warm-up), then profiles a second one. Printed: per token,
the milliseconds of each group of operators on every thread (the batcher decodes in its own) (self CPU time: matrix products, attention,
casts and copies, the KV cache's concatenations, the logits processors, the rest of PyTorch)
and the time no operator accounts for (Python: the model's modules, the batcher, the
processors' own Python). Matrix products read every weight once per token, so their time
is the part weight-only quantization shrinks; the rest is not.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GROUPS = {  # operator name fragments → group; the first match wins
    "matrix products": ("mm", "linear", "matmul", "addmm", "_weight_int", "baddbmm", "bmm"),
    "attention": ("scaled_dot_product", "softmax", "_flash", "attention"),
    "casts and copies": ("aten::to", "_to_copy", "copy_", "contiguous", "clone"),
    "KV cache (cat, index)": ("cat", "index", "slice", "narrow"),
    "norms, activations, rotary": (
        "mul",
        "add",
        "rsqrt",
        "pow",
        "mean",
        "silu",
        "neg",
        "cos",
        "sin",
    ),
}


def cpu_flags() -> str:
    """The flags that decide the kernels (AVX2, AVX-512, AVX-512 BF16, AMX)."""
    try:
        flags = subprocess.run(["lscpu"], check=False, capture_output=True, text=True).stdout
    except OSError:
        return platform.processor()
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
    have = [f for f in wanted if f" {f}" in flags]
    name = next(
        (line.split(":", 1)[1].strip() for line in flags.splitlines() if "Model name" in line), ""
    )
    return f"{name}; {' '.join(have)}; {os.cpu_count()} cores"


def group_of(name: str) -> str:
    lowered = name.lower()
    for group, fragments in GROUPS.items():
        if any(f in lowered for f in fragments):
            return group
    return "other PyTorch operators"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantization", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--tokens", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from rich.console import Console
    from rich.table import Table
    from torch.profiler import ProfilerActivity, profile

    from mrg.config import Decoding
    from mrg.data.study import study_from_sources
    from mrg.service import ReportService

    torch.set_num_threads(args.threads)
    service = ReportService.load(quantization=args.quantization, dtype=args.dtype)
    study = study_from_sources(min((ROOT / "assets" / "examples").glob("*.png")))
    decoding = Decoding(max_new_tokens=args.tokens)
    service.generate(study, "prompt-wise", decoding)  # warm-up
    start = time.perf_counter()
    every_thread = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
    with profile(activities=[ProfilerActivity.CPU], experimental_config=every_thread) as prof:
        update = service.generate(study, "prompt-wise", decoding)
    wall = time.perf_counter() - start
    tokens = update.tokens
    decode_s = wall - (update.ttft_s or 0.0)
    per_token_ms = 1000 * decode_s / max(tokens - 1, 1)

    groups: dict[str, float] = {}
    for event in prof.key_averages():
        if event.key.startswith(("mrg.", "ProfilerStep")):
            continue
        groups[group_of(event.key)] = (
            groups.get(group_of(event.key), 0.0) + event.self_cpu_time_total
        )
    labelled = {e.key: e.cpu_time_total for e in prof.key_averages() if e.key.startswith("mrg.")}
    total_ms = 1000 * wall
    console = Console()
    table = Table(title=f"{tokens} tokens, {wall:.2f} s: {tokens / wall:.1f} tokens/s end to end")
    table.add_column("where")
    table.add_column("ms per token", justify="right")
    table.add_column("share", justify="right")
    accounted = 0.0
    for name, micros in sorted(groups.items(), key=lambda kv: -kv[1]):
        ms = micros / 1000 / tokens
        accounted += ms
        table.add_row(name, f"{ms:.1f}", f"{ms * tokens / total_ms:.0%}")
    rest = total_ms / tokens - accounted
    table.add_row(
        "no operator (Python: modules, batcher, processors)",
        f"{rest:.1f}",
        f"{rest * tokens / total_ms:.0%}",
    )
    table.add_row("[b]total[/b]", f"{total_ms / tokens:.1f}", "100%")
    console.print(table)
    for key, micros in sorted(labelled.items()):
        console.print(f"{key}: {micros / 1000 / tokens:.1f} ms per token (inclusive)")
    console.print(
        f"time to first token {update.ttft_s:.2f} s; decoding {per_token_ms:.1f} ms per token "
        f"({1000 / per_token_ms:.1f} tokens/s); LLM {service.info.dtype}, quantization "
        f"{service.info.quantization}; CPU: {cpu_flags()}; torch threads {torch.get_num_threads()}"
    )


if __name__ == "__main__":
    main()

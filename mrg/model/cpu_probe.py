"""Is this CPU faster with the frozen LLM in bfloat16? Measured once per machine, then cached.

A greedy report is one context pass (prefill, about 190 tokens: matrix × matrix) and about
60 decoding steps (one row × every weight: bound by memory traffic, which bf16 halves). CPUs
with bf16 instructions (AVX-512 BF16, AMX) and a PyTorch build that uses them multiply bf16
matrices fast; elsewhere bf16 products are emulated and the context pass gets several times
slower. So the probe times both on a SmolLM2-shaped stack of weights larger than any CPU
cache (10 of its 30 layers: 180 MB in fp32, so that a step reads memory as the real one does;
the earlier probe's 28 MB sat in the cache and measured compute instead), in both dtypes:

    report(dtype) = prefill(190 rows) + 60 · step(1 row);   bf16 ⇔ report(fp32) / report(bf16) ≥ 1.15

The answer and its figures go to the log, to ``<cache>/cpu_dtype.json`` (keyed by CPU, flags,
PyTorch version and threads, so a new machine or build measures again) and to ``mrg info``.
"""

from __future__ import annotations

import functools
import json
import logging
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from mrg.config import default_cache_dir

log = logging.getLogger(__name__)

CACHE_NAME = "cpu_dtype.json"
SPEEDUP = 1.15  # bf16 must make a report at least this much faster
PREFILL_ROWS, REPORT_TOKENS = 190, 60
LAYER_SHAPES = [
    (576, 576),
    (192, 576),
    (192, 576),
    (576, 576),
    (1536, 576),
    (1536, 576),
    (576, 1536),
]
LAYERS = 10
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def machine_key() -> str:
    """The CPU, the flags that choose PyTorch's kernels, PyTorch's version and its threads."""
    name, flags = platform.processor(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name") and not name:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    have = " ".join(f for f in FLAGS if f in flags)
    return f"{name} | {have} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def _seconds(weights: list[torch.Tensor], rows: int, repeats: int) -> float:
    """Best time of ``repeats`` passes of ``rows`` rows through every weight."""
    dtype = weights[0].dtype
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=dtype) for w in weights}
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass warms up
        start = time.perf_counter()
        for w in weights:
            inputs[w.shape[1]] @ w.T
        best = min(best, time.perf_counter() - start)
    return best


def measure() -> dict:
    """The figures behind the choice (seconds per report, per step, per prefill, each dtype)."""
    generator = torch.Generator().manual_seed(0)
    fp32 = [torch.randn(*s, generator=generator) for _ in range(LAYERS) for s in LAYER_SHAPES]
    figures = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        weights = [w.to(dtype) for w in fp32]
        with torch.inference_mode():
            step, prefill = _seconds(weights, 1, 5), _seconds(weights, PREFILL_ROWS, 2)
        figures[name] = {
            "step_ms": round(1000 * step, 2),
            "prefill_ms": round(1000 * prefill, 1),
            "report_s": round(prefill + REPORT_TOKENS * step, 3),
        }
        del weights
    speedup = figures["float32"]["report_s"] / figures["bfloat16"]["report_s"]
    return {
        "bf16": speedup >= SPEEDUP,
        "speedup": round(speedup, 2),
        "figures": figures,
        "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def cached_measurement(
    measure_if_missing: bool = True, cache_dir: Path | None = None
) -> dict | None:
    """This machine's measurement from the cache, measured and stored when missing (None when
    missing and ``measure_if_missing`` is False)."""
    path = Path(cache_dir or default_cache_dir()) / CACHE_NAME
    key = machine_key()
    try:
        stored = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        stored = {}
    if key in stored or not measure_if_missing:
        return stored.get(key)
    stored[key] = measure()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(stored, indent=2) + "\n")
    except OSError:
        log.warning("could not cache the CPU dtype measurement at %s", path)
    return stored[key]


def describe(measurement: dict) -> str:
    """One line for the log and ``mrg info``."""
    f32, b16 = measurement["figures"]["float32"], measurement["figures"]["bfloat16"]
    return (
        f"LLM dtype on this CPU: {'bfloat16' if measurement['bf16'] else 'float32'} "
        f"(a report estimated at {f32['report_s']:.2f} s in fp32, {b16['report_s']:.2f} s in bf16: "
        f"×{measurement['speedup']:.2f}; step {f32['step_ms']} / {b16['step_ms']} ms, "
        f"{PREFILL_ROWS}-token prefill {f32['prefill_ms']} / {b16['prefill_ms']} ms; "
        f"measured {measurement['measured']})"
    )


@functools.lru_cache(maxsize=1)
def cpu_prefers_bf16() -> bool:
    """Whether ``--dtype auto`` puts the frozen LLM in bfloat16 on this CPU (see the module)."""
    measurement = cached_measurement()
    log.info(describe(measurement))
    return bool(measurement["bf16"])

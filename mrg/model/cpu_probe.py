"""How should the frozen LLM run on this CPU? Measured once per machine, then cached.

A greedy report is one context pass (prefill: the context after the template's shared
opening, with the report's forced opening, about 130 tokens: matrix × matrix) and a decoding
step (one row × every weight: bound by memory traffic, so by the bytes per weight) per token
the LLM chooses: the structure forces the headers and the findings' sentences
(``mrg.batching.forced_run``), so of 48 reports of NIH test images, whose readings mostly name
findings, the LLM chose 8 tokens (median; mean 9–10, at most 47), and a normal study's report
(40–60 tokens) is all its own; the probe counts 20. Which setting wins depends on the CPU: bf16 matrix products are fast only with
AVX-512 BF16 or AMX and a PyTorch that uses them; the weight-only int8/int4 kernels
(``mrg.model.weight_only``) read 4–8× fewer bytes than fp32 but take bf16 activations. So
the probe times each setting on a SmolLM2-shaped stack of weights larger than any CPU cache
(10 of its 30 layers: 180 MB in fp32, so that a step reads memory as the real one does):

    report(setting) = prefill(130 rows) + 20 · step(1 row)

and ``auto`` takes the fastest of ``AUTO_SETTINGS`` if it beats fp32 by ``SPEEDUP``, else
fp32. The answer and its figures go to the log, to ``<cache>/cpu_llm.json`` (keyed by CPU,
flags, PyTorch version and threads, so a new machine or build measures again) and to
``mrg info``.
"""

from __future__ import annotations

import functools
import json
import logging
import platform
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

from mrg.config import default_cache_dir
from mrg.model.weight_only import LAYERS as WEIGHT_ONLY_LAYERS

log = logging.getLogger(__name__)

CACHE_NAME = "cpu_llm.json"
SPEEDUP = 1.15  # a setting must make a report at least this much faster than fp32
PREFILL_ROWS, REPORT_TOKENS = 130, 20
# a new one measures again ("bf16 rows as two": a lone bf16 row is computed as two)
WORKLOAD = f"{PREFILL_ROWS}-token prefill + {REPORT_TOKENS} steps, bf16 rows as two"
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
FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
# setting → (llm.quantization, llm.dtype)
SETTINGS = {
    "float32": ("none", "float32"),
    "bfloat16": ("none", "bfloat16"),
    "int8-wo": ("int8-wo", "bfloat16"),
    "int4-wo": ("int4-wo", "bfloat16"),
}
# what auto may choose: the settings whose reports match fp32's (docs/limits.md: the parity
# table on the held-out images). The weight-only settings stay for ``--quantization``: with
# the checkpoints that describe the chest, int4-wo wrote worse prose than fp32 ("The heart is
# a normal volumes of both lungs."), and a whole report in fp32 took 0.80 s against 0.65 s
AUTO_SETTINGS = ("float32", "bfloat16")


def cpu_model_and_flags() -> tuple[str, set[str]]:
    """The CPU's model name and its flags, from /proc/cpuinfo (the platform's name elsewhere)."""
    name, flags = platform.processor(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name") and not name:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    return name, flags


def machine_key() -> str:
    """The CPU, the flags that choose PyTorch's kernels, PyTorch's version and its threads."""
    name, flags = cpu_model_and_flags()
    have = " ".join(f for f in FLAGS if f in flags)
    return f"{name} | {have} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def _products(setting: str, weights: list[torch.Tensor]) -> tuple[list[Callable], torch.dtype]:
    """One ``x ↦ x · Wᵀ`` per weight as ``setting`` computes it, and its activations' dtype."""
    quantization, dtype = SETTINGS[setting]
    if quantization == "none":
        cast = [w.to(getattr(torch, dtype)) for w in weights]
        if dtype == "bfloat16":  # a lone row as the first of two (``llm.one_row_as_two``)
            return [lambda x, w=w: (x.repeat(2, 1) @ w.T)[:1] for w in cast], torch.bfloat16
        return [lambda x, w=w: x @ w.T for w in cast], getattr(torch, dtype)
    layers = [WEIGHT_ONLY_LAYERS[quantization](w) for w in weights]
    return [layer.product for layer in layers], torch.bfloat16


def _seconds(products: list[Callable], widths: list[int], dtype, rows: int, repeats: int) -> float:
    """Best time of ``repeats`` passes of ``rows`` rows through every product."""
    inputs = {k: torch.randn(rows, k).to(dtype) for k in set(widths)}
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass warms up
        start = time.perf_counter()
        for product, k in zip(products, widths):
            product(inputs[k])
        best = min(best, time.perf_counter() - start)
    return best


def measure() -> dict:
    """Seconds per step, prefill and report for every setting, and the one ``auto`` takes."""
    generator = torch.Generator().manual_seed(0)
    fp32 = [torch.randn(*s, generator=generator) for _ in range(LAYERS) for s in LAYER_SHAPES]
    widths = [w.shape[1] for w in fp32]
    figures = {}
    for setting in SETTINGS:
        try:
            products, dtype = _products(setting, fp32)
            with torch.inference_mode():
                step = _seconds(products, widths, dtype, 1, 5)
                prefill = _seconds(products, widths, dtype, PREFILL_ROWS, 2)
        except RuntimeError as err:  # a kernel this build or CPU lacks
            figures[setting] = {"error": str(err).splitlines()[0][:200]}
            continue
        figures[setting] = {
            "step_ms": round(1000 * step, 2),
            "prefill_ms": round(1000 * prefill, 1),
            "report_s": round(prefill + REPORT_TOKENS * step, 3),
        }
        del products
    return {
        **choose(figures),
        "workload": WORKLOAD,
        "figures": figures,
        "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def choose(figures: dict[str, dict], allowed: tuple[str, ...] = AUTO_SETTINGS) -> dict:
    """The fastest of ``allowed`` if it beats fp32 by ``SPEEDUP``, else fp32."""
    reference = figures["float32"]["report_s"]
    timed = {s: figures[s]["report_s"] for s in allowed if "report_s" in figures.get(s, {})}
    timed.setdefault("float32", reference)
    best = min(timed, key=timed.get)
    speedup = reference / timed[best]
    if speedup < SPEEDUP:
        best, speedup = "float32", 1.0
    return {"choice": best, "speedup": round(speedup, 2)}


def cached_measurement(
    measure_if_missing: bool = True, cache_dir: Path | None = None
) -> dict | None:
    """This machine's measurement of today's ``WORKLOAD`` from the cache, measured and stored
    when missing (None when missing and ``measure_if_missing`` is False)."""
    path = Path(cache_dir or default_cache_dir()) / CACHE_NAME
    key = machine_key()
    try:
        stored = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        stored = {}
    current = stored.get(key) if stored.get(key, {}).get("workload") == WORKLOAD else None
    if current is not None or not measure_if_missing:
        return current
    log.info("timing the LLM's settings on this CPU (once per machine, a few seconds)")
    stored[key] = measure()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(stored, indent=2) + "\n")
    except OSError:
        log.warning("could not cache the CPU measurement at %s", path)
    return stored[key]


def describe(measurement: dict) -> str:
    """One line for the log and ``mrg info``."""
    figures = measurement["figures"]
    timed = "; ".join(
        f"{s} {f['report_s']:.2f} s (step {f['step_ms']} ms, prefill {f['prefill_ms']} ms)"
        if "report_s" in f
        else f"{s} unavailable ({f['error']})"
        for s, f in figures.items()
    )
    chosen = choose(figures)  # today's AUTO_SETTINGS, whatever a cached choice says
    return (
        f"LLM on this CPU: {chosen['choice']} (×{chosen['speedup']:.2f} against fp32). "
        f"A report estimated at {timed}; {WORKLOAD}; "
        f"measured {measurement['measured']}"
    )


@functools.lru_cache(maxsize=4)
def cpu_setting(allowed: tuple[str, ...] = AUTO_SETTINGS) -> tuple[str, str]:
    """``(quantization, dtype)`` that ``auto`` gives the frozen LLM on this CPU, choosing among
    ``allowed`` (``("float32", "bfloat16")`` for ``--dtype auto`` with no quantization)."""
    measurement = cached_measurement()
    log.info(describe(measurement))
    return SETTINGS[choose(measurement["figures"], allowed)["choice"]]

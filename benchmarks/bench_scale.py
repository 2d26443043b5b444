"""The frozen LLM at full scale, random weights: load memory, training step, generation.

    python benchmarks/bench_scale.py [--shape 7b|1b|360m|135m] [--precisions fp32 bf16 nf4]
                                     [--batch 8] [--seq 240] [--steps 3] [--tokens 32]

A LLaMA-architecture model is built from its config with random weights (nothing is
downloaded), saved once as a bf16 checkpoint in a temporary folder and loaded the way
``mrg.model.llm.load_frozen_llm`` loads a real one (bitsandbytes for nf4). For each
precision it measures

* load: seconds, and the bytes of the frozen model's parameters and buffers as loaded;
* a training step of the MRG-LLM kind: a loss on ``inputs_embeds`` that requires grad (the
  soft prompt and visual tokens), backward through the frozen LLM to those inputs, with and
  without activation checkpointing: seconds per step, samples/s, peak memory;
* greedy generation from ``inputs_embeds``: time to first token and tokens/s (batch 1).

The defaults are the ``iu-xray-llama2-7b-nf4`` preset's batch and a sequence of its length
(instruction + 32 prompt tokens + 49 visual tokens + 100 report tokens ≈ 240). A shape that
does not fit this machine's free memory is refused with the estimate, never swapped.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mrg.model.llm import bitsandbytes_device, freeze
from mrg.train.trainer import peak_memory

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocabulary
    "7b": (4096, 11008, 32, 32, 32, 32000),  # LLaMA-2-7B, the presets' LLM
    "1b": (2048, 5632, 22, 32, 4, 32000),  # TinyLlama-1.1B
    "360m": (960, 2560, 32, 15, 5, 49152),  # SmolLM2-360M
    "135m": (576, 1536, 30, 9, 3, 49152),  # SmolLM2-135M, the demo's LLM
}
BYTES = {"fp32": 4.0, "bf16": 2.0, "nf4": 0.5 + 0.5 / 64 * 4}  # nf4: 4 bits + a scale per 64
GIB = 2**30
console = Console(width=170)


def shape_config(name: str) -> LlamaConfig:
    hidden, inter, layers, heads, kv, vocab = SHAPES[name]
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )


@dataclass
class Estimate:
    """Bytes a precision needs, from the shape alone (to refuse before allocating)."""

    weights: float
    activations: float  # kept for backward, without checkpointing
    checkpointed: float  # with checkpointing: each layer's input plus one layer's activations
    build: float  # the bf16 model held while writing the random checkpoint

    @classmethod
    def of(cls, config: LlamaConfig, precision: str, batch: int, seq: int) -> Estimate:
        h, i, n, v = (
            config.hidden_size,
            config.intermediate_size,
            config.num_hidden_layers,
            config.vocab_size,
        )
        kv = h * config.num_key_value_heads // config.num_attention_heads
        linear = n * (2 * h * h + 2 * h * kv + 3 * h * i)
        embeddings = 2 * v * h  # input embeddings and lm_head, never quantized
        width = 2.0 if precision == "nf4" else BYTES[precision]
        weights = linear * BYTES[precision] + embeddings * width
        tokens = batch * seq
        # per layer, 16-bit activations: 34·s·b·h + 5·a·s²·b bytes (Korthikanti et al., 2022)
        layer = (34 * tokens * h + 5 * config.num_attention_heads * seq * tokens) * width / 2
        logits = 3 * tokens * v * 4  # logits, their log-softmax and the gradient, fp32
        return cls(
            weights=weights,
            activations=n * layer + logits,
            checkpointed=n * tokens * h * width + layer + logits,
            build=(linear + embeddings) * 2,
        )


class Memory:
    """Memory in use now and at peak in this process: the CUDA allocator's, else the resident
    set (each measurement runs in a fresh process, so freed pages of an earlier one do not hide
    its growth)."""

    def __init__(self, device: str):
        self.device = device
        self.process = psutil.Process()

    def free(self) -> float:
        if self.device == "cuda":
            return torch.cuda.mem_get_info()[0]
        return psutil.virtual_memory().available

    def now(self) -> float:
        if self.device == "cuda":
            return torch.cuda.memory_allocated()
        return self.process.memory_info().rss

    def peak(self) -> float:
        return peak_memory(torch.device(self.device))["peak_memory_mib"] * 2**20


def load(path: Path, precision: str, device: str):
    if precision == "nf4":
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=quant, device_map={"": device}, dtype=torch.bfloat16
        )
    else:
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    return freeze(model)


def train_steps(model, batch: int, seq: int, steps: int) -> float:
    """Median seconds per step: a loss on inputs_embeds, backward to them."""
    dtype = model.get_input_embeddings().weight.dtype
    device = model.device
    generator = torch.Generator(device="cpu").manual_seed(0)
    embeds = torch.randn(batch, seq, model.config.hidden_size, generator=generator) * 0.02
    embeds = embeds.to(device, dtype).requires_grad_(True)
    labels = torch.randint(0, model.config.vocab_size, (batch, seq), generator=generator)
    labels[:, : seq // 2] = -100  # the prefix (instruction, prompt, image) carries no loss
    labels = labels.to(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = model(inputs_embeds=embeds, labels=labels, use_cache=False).loss
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        assert embeds.grad is not None and torch.isfinite(embeds.grad).all()
        embeds.grad = None
    return statistics.median(times)


@torch.no_grad()
def generation(model, tokens: int) -> tuple[float, float]:
    """(time to first token s, tokens/s after it), greedy from 120 input embeddings."""
    embeds = torch.randn(1, 120, model.config.hidden_size) * 0.02
    embeds = embeds.to(model.device, model.get_input_embeddings().weight.dtype)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    model.generate(inputs_embeds=embeds, max_new_tokens=1, do_sample=False, min_new_tokens=1)
    sync()
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    model.generate(
        inputs_embeds=embeds, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False
    )
    sync()
    return ttft, (tokens - 1) / max(1e-9, time.perf_counter() - start - ttft)


def measure(folder: str, precision: str, device: str, checkpointing: bool, args: dict) -> dict:
    """In a fresh process: load, train ``steps`` steps, and (without checkpointing) generate."""
    torch.manual_seed(0)
    memory = Memory(device)
    before = memory.now()
    start = time.perf_counter()
    model = load(Path(folder), precision, device)
    key = "checkpointed" if checkpointing else "plain"
    # parameters and buffers as loaded (resident-set growth would miss memory-mapped weights)
    row = {"load_s": time.perf_counter() - start, "load_gib": model.get_memory_footprint() / GIB}
    if checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    model.train(checkpointing)  # transformers checkpoints modules in training mode
    seconds = train_steps(model, args["batch"], args["seq"], args["steps"])
    row[f"{key}_step_s"] = seconds
    row[f"{key}_samples_s"] = args["batch"] / seconds
    row[f"{key}_peak_gib"] = (memory.peak() - before) / GIB
    if not checkpointing:
        model.eval()
        row["ttft_s"], row["tokens_s"] = generation(model, args["tokens"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="7b")
    parser.add_argument("--precisions", nargs="+", choices=BYTES, default=["fp32", "bf16", "nf4"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=240)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = shape_config(args.shape)
    if "nf4" in args.precisions and bitsandbytes_device() is None:
        console.print("[yellow]bitsandbytes cannot quantize here: nf4 skipped[/yellow]")
        args.precisions = [p for p in args.precisions if p != "nf4"]
    estimates = {p: Estimate.of(config, p, args.batch, args.seq) for p in args.precisions}
    free = Memory(device).free()
    fitting = [p for p, e in estimates.items() if e.weights + e.checkpointed <= 0.85 * free]
    if not fitting:
        raise SystemExit(
            f"{args.shape}: no precision of {args.precisions} fits the {free / GIB:.1f} GiB free "
            f"on {device} (nf4 needs ~{Estimate.of(config, 'nf4', args.batch, args.seq).weights / GIB:.1f} "
            "GiB of weights); choose a smaller --shape"
        )
    host_free = psutil.virtual_memory().available
    build = next(iter(estimates.values())).build
    if build > 0.85 * host_free:
        raise SystemExit(
            f"{args.shape}: building its random bf16 checkpoint needs ~{build / GIB:.1f} GiB of "
            f"host memory, {host_free / GIB:.1f} GiB is free here; choose a smaller --shape"
        )
    rows = []
    with tempfile.TemporaryDirectory(prefix=f"bench-scale-{args.shape}-") as folder:
        with console.status(f"writing a random {args.shape} checkpoint (bf16)"):
            with torch.device("cpu"):
                model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
            params = sum(p.numel() for p in model.parameters())
            model.save_pretrained(folder)
            del model
            gc.collect()
        for precision in args.precisions:
            need = estimates[precision]
            if precision not in fitting:
                rows.append({"precision": precision, "refused": True})
                console.print(
                    f"[yellow]{args.shape} {precision}: ~{need.weights / GIB:.1f} GiB of weights "
                    f"+ ~{need.checkpointed / GIB:.1f} GiB to train with checkpointing does not "
                    f"fit the {free / GIB:.1f} GiB free on {device}: skipped[/yellow]"
                )
                continue
            row = {"precision": precision}
            for checkpointing in (False, True):
                key = "checkpointed" if checkpointing else "plain"
                if not checkpointing and need.weights + need.activations > 0.85 * free:
                    continue  # would not fit: only the checkpointed step runs
                with (
                    console.status(f"{precision}, {key}"),
                    ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool,
                ):
                    child = pool.submit(
                        measure, folder, precision, device, checkpointing, vars(args)
                    ).result()
                row.update({k: v for k, v in child.items() if k.startswith(key) or k not in row})
            rows.append(row)
    show(args, device, params, rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


def show(args, device: str, params: int, rows: list[dict]) -> None:
    def cell(row, key, fmt):
        value = row.get(key)
        return "—" if value is None else fmt.format(value)

    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({psutil.cpu_count()} cores)"
    table = Table(
        title=f"{args.shape} LLaMA shape ({params / 1e9:.2f} B parameters, random) on {name}; "
        f"training batch {args.batch} × {args.seq} tokens"
    )
    columns = [
        ("precision", "precision", "{}"),
        ("load s", "load_s", "{:.1f}"),
        ("weights GiB", "load_gib", "{:.2f}"),
        ("step s", "plain_step_s", "{:.2f}"),
        ("samples/s", "plain_samples_s", "{:.2f}"),
        ("peak GiB", "plain_peak_gib", "{:.2f}"),
        ("step s (ckpt)", "checkpointed_step_s", "{:.2f}"),
        ("samples/s (ckpt)", "checkpointed_samples_s", "{:.2f}"),
        ("peak GiB (ckpt)", "checkpointed_peak_gib", "{:.2f}"),
        ("TTFT s", "ttft_s", "{:.3f}"),
        ("tokens/s", "tokens_s", "{:.1f}"),
    ]
    for title, *_ in columns:
        table.add_column(title, justify="right")
    for row in rows:
        if row.get("refused"):
            table.add_row(row["precision"], *["does not fit"] + [""] * (len(columns) - 2))
        else:
            table.add_row(*(cell(row, key, fmt) for _, key, fmt in columns))
    console.print(table)


if __name__ == "__main__":
    main()

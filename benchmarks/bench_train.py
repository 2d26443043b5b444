"""Training throughput (samples/s) per stage and customizer mode with the real SmolLM2.

    python benchmarks/bench_train.py [--batch 4] [--steps 3]

Uses the real IU X-ray sample studies from ../shared/data when present (random images
otherwise). Prints one table and the customizers' overhead against ``static`` as ratios
measured in the same run, which transfer between machines better than absolute rates.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mrg.config import CUSTOMIZER_MODES
from mrg.data.datasets import Batch
from mrg.data.study import batch_tensors, study_from_sources, train_transform
from mrg.data.views import Views
from mrg.environment import setting
from mrg.model import MRGModel
from mrg.model.llm import load_frozen_llm
from mrg.train.config import train_preset
from mrg.train.losses import ContrastiveHeads, ReportEmbeddingCache
from mrg.train.stages import STAGES, TrainingModule

SHARED = Path(setting("MRG_SHARED_DATA"))
REPORT = (
    "FINDINGS: The heart is normal in size. The mediastinum is unremarkable. The lungs are clear. "
    "There is no pleural effusion or pneumothorax. IMPRESSION: No acute cardiopulmonary abnormality."
)


def make_batch(batch_size: int, size: int) -> tuple[Batch, str]:
    root = SHARED / "iu_xray" / "images"
    if root.exists():
        studies = [study_from_sources(d / "0.png", d / "1.png") for d in sorted(root.iterdir())]
        studies = (studies * batch_size)[:batch_size]
        views = batch_tensors(studies, size, transform=train_transform(size))
        label = "IU X-ray studies (2 views)"
    else:
        views = Views(
            torch.rand(batch_size, 2, 1, size, size),
            torch.tensor([[0, 1]] * batch_size),
            torch.ones(batch_size, 2, dtype=torch.bool),
        )
        label = "random 2-view input"
    reports = [f"{REPORT} ({i})" for i in range(batch_size)]
    return Batch(views, reports, [str(i) for i in range(batch_size)]), label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    llm, tokenizer = load_frozen_llm(train_preset("demo-cpu").model.llm)
    config = train_preset("demo-cpu")
    batch, label = make_batch(args.batch, config.model.encoder.image_size)
    rates: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory() as cache:
        embeddings = ReportEmbeddingCache(llm, tokenizer, "smollm2", Path(cache) / "emb.pt")
        embeddings.fill(batch.reports)
        for mode in CUSTOMIZER_MODES:
            torch.manual_seed(0)
            model = MRGModel(train_preset("demo-cpu", mode).model, llm, tokenizer)
            heads = ContrastiveHeads(
                model.encoder.embed_dim, llm.config.hidden_size, config.align_dim
            )
            module = TrainingModule(model, heads, embeddings, config.joint_lambda).train()
            for stage in STAGES:
                optimizer = torch.optim.AdamW(module.stage_parameters(stage), lr=1e-4)
                module(batch, stage)["loss"].backward()  # warm-up
                optimizer.zero_grad()
                start = time.perf_counter()
                for _ in range(args.steps):
                    module(batch, stage)["loss"].backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                rates[(mode, stage)] = args.batch * args.steps / (time.perf_counter() - start)
    console = Console(width=120)
    device = (
        f"CPU ({args.threads} threads)"
        if not torch.cuda.is_available()
        else torch.cuda.get_device_name()
    )
    table = Table(
        title=f"Training samples/s — SmolLM2-135M frozen, demo-cpu preset, batch {args.batch}, {label}, {device}"
    )
    table.add_column("mode")
    for stage in STAGES:
        table.add_column(f"{stage} (samples/s)", justify="right")
    table.add_column("generate time vs static", justify="right")
    for mode in CUSTOMIZER_MODES:
        ratio = rates[("static", "generate")] / rates[(mode, "generate")]
        table.add_row(mode, *(f"{rates[(mode, s)]:.2f}" for s in STAGES), f"{ratio:.3f}×")
    console.print(table)
    console.print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()

"""How far the findings head's reading moves with the filter that scaled an image.

    python benchmarks/bench_head_resampling.py [--heads assets/checkpoints/findings ...]
                                               [--side 448] [--limit N]

Each NIH test image (the 512-px originals under ``$MRG_SHARED_DATA/nih_cxr14``, the demo
pairs' patient split) is read as the service reads it (``mrg.model.gate.read_study``), once
from the original and once from a copy scaled to ``--side`` px by another program and saved
as an 8-bit PNG, as a user's export would be: PIL's Lanczos (how the shipped examples were
made), PIL's bicubic, and the antialiased bilinear resize the head is trained and served
with (``mrg.data.study.eval_transform``). Per head and filter: the mean and the largest
change of the 14 calibrated probabilities, and how many images' states (present, possible,
absent) change. No timing: the figures hold on any machine.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mrg.data.pairs import patient_split, read_nih_labels
from mrg.data.study import Study, View, eval_transform
from mrg.environment import setting
from mrg.imaging import load_image
from mrg.model.findings import FindingsHead
from mrg.model.gate import read_study


def pil_filter(method: Image.Resampling) -> Callable[[Image.Image, int], Image.Image]:
    return lambda image, side: image.resize((side, side), method)


def trained_resize(image: Image.Image, side: int) -> Image.Image:
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).unsqueeze(0)
    scaled = eval_transform(side)(pixels).clamp(0.0, 1.0)[0].numpy()
    return Image.fromarray(np.round(scaled * 255.0).astype(np.uint8))


FILTERS = {
    "PIL Lanczos": pil_filter(Image.Resampling.LANCZOS),
    "PIL bicubic": pil_filter(Image.Resampling.BICUBIC),
    "antialiased bilinear (as trained)": trained_resize,
}


def reading(head: FindingsHead, source: Path | bytes) -> tuple[torch.Tensor, dict[str, str]]:
    """(calibrated probabilities ``[14]``, states) of one frontal view, as the service reads it."""
    _, features = read_study(Study([View(load_image(source), "frontal")]), head, None)
    probabilities, _ = head.predict_pooled(features)
    return probabilities[0], head.states(probabilities)[0]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_images(limit: int | None) -> list[Path]:
    nih = Path(setting("MRG_SHARED_DATA")) / "nih_cxr14"
    paths = [
        nih / "images" / entry["image"]
        for entry in read_nih_labels(nih / "labels.csv")
        if patient_split(entry["patient"]) == "test"
    ]
    paths = [p for p in paths if p.is_file()]
    return paths[:limit] if limit else paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", nargs="+", default=[str(ROOT / "assets/checkpoints/findings")])
    parser.add_argument("--side", type=int, help="scale copies to this side (default: the head's)")
    parser.add_argument("--limit", type=int, help="the first N test images only (smoke runs)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    images = test_images(args.limit)
    table = Table(title=f"Findings head: the original against a scaled copy ({len(images)} images)")
    for column in ("head", "copy", "mean |Δp|", "largest |Δp|", "images whose states change"):
        table.add_column(column, justify="left" if column in ("head", "copy") else "right")
    for folder in args.heads:
        head = FindingsHead.from_pretrained(folder)
        side = args.side or head.config.image_size
        changes: dict[str, list[torch.Tensor]] = {name: [] for name in FILTERS}
        moved = dict.fromkeys(FILTERS, 0)
        for path in tqdm(images, desc=f"{Path(folder).name} at {side} px"):
            original, states = reading(head, path)
            grey = Image.open(path).convert("L")
            for name, scale in FILTERS.items():
                copy, copy_states = reading(head, png_bytes(scale(grey, side)))
                changes[name].append((copy - original).abs())
                moved[name] += copy_states != states
        for name in FILTERS:
            delta = torch.stack(changes[name])
            table.add_row(
                f"{Path(folder).name} ({head.config.image_size} px)",
                f"{name}, {side} px",
                f"{delta.mean():.4f}",
                f"{delta.max():.3f}",
                f"{moved[name]} of {len(images)}",
            )
    Console(width=140).print(table)


if __name__ == "__main__":
    main()

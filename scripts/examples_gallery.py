"""The gallery of docs/checkpoints.md: each shipped example with its NIH labels, the findings
head's top findings and the labels of the report each shipped mode writes (greedy, the app's
defaults).

    python scripts/examples_gallery.py [--write]    # --write replaces the page's gallery
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mrg.data.study import study_from_sources
from mrg.service import ReportService
from mrg.text.taxonomy import FINDINGS14, display_name

EXAMPLES = ROOT / "assets" / "examples"
BEGIN, END = "<!-- gallery:begin -->", "<!-- gallery:end -->"


def names(findings: list[str]) -> str:
    return ", ".join(display_name(f) for f in findings) or "none"


def gallery(service: ReportService) -> str:
    manifest = json.loads((EXAMPLES / "manifest.json").read_text())
    modes = [m for m in ("prompt-wise", "promptbook-wise") if m in service.models]
    lines = [
        "| example | NIH labels | findings head: top 3 (p / operating point) | written from | "
        + " | ".join(f"{m} report's labels" for m in modes)
        + " |",
        "|---|---|---|---|" + "---|" * len(modes),
    ]
    for entry in manifest["examples"]:
        study = study_from_sources(EXAMPLES / entry["file"])
        reading = service.read_findings(study)
        top = ", ".join(f"{display_name(f)} {p:.2f}/{t:.2f}" for f, p, t in reading.ranked()[:3])
        written = []
        for mode in modes:
            text = service.generate(study, mode).text
            labels = service.labeler.label14(text)
            written.append(names([f for f in FINDINGS14 if labels[f]]))
        lines.append(
            f"| `{entry['file']}` | {names(entry['nih_labels'])} | {top} | "
            f"{names(reading.named)} | " + " | ".join(written) + " |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="replace the page's gallery")
    args = parser.parse_args()
    torch.set_num_threads(2)
    table = gallery(ReportService.load(dtype="float32"))
    print(table)
    if args.write:
        page = ROOT / "docs" / "checkpoints.md"
        text = page.read_text()
        block = f"{BEGIN}\n{table}{END}"
        page.write_text(re.sub(f"{BEGIN}.*?{END}", lambda _: block, text, flags=re.DOTALL))


if __name__ == "__main__":
    main()

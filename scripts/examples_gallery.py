"""The gallery of docs/checkpoints.md: each shipped example with its NIH labels, the findings
head's top findings and states, and the labels of the report each shipped mode writes (greedy,
the app's defaults); and the README's three reports as a radiologist reads them (a normal
film, cardiomegaly and an effusion, prompt-wise).

    python scripts/examples_gallery.py [--write]    # --write replaces both
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
from mrg.ui.findings import stated

EXAMPLES = ROOT / "assets" / "examples"
BEGIN, END = "<!-- gallery:begin -->", "<!-- gallery:end -->"
README_BEGIN, README_END = "<!-- reports:begin -->", "<!-- reports:end -->"
READ = [
    "00004934_000.png",
    "00003350_000.png",
    "00015044_000.png",
]  # normal, cardiomegaly, effusion


def names(findings: list[str]) -> str:
    return ", ".join(display_name(f) for f in findings) or "none"


def gallery(service: ReportService) -> str:
    manifest = json.loads((EXAMPLES / "manifest.json").read_text())
    modes = [m for m in ("prompt-wise", "promptbook-wise") if m in service.models]
    lines = [
        "| example | NIH labels | findings head: top 3 (calibrated p) | states written from | "
        + " | ".join(f"{m} report's labels" for m in modes)
        + " |",
        "|---|---|---|---|" + "---|" * len(modes),
    ]
    for entry in manifest["examples"]:
        study = study_from_sources(EXAMPLES / entry["file"])
        reading = service.read_findings(study)
        top = ", ".join(f"{display_name(f)} {p:.2f}" for f, p, _ in reading.ranked()[:3])
        written = []
        for mode in modes:
            text = service.generate(study, mode).text
            labels = service.labeler.label14(text)
            written.append(names([f for f in FINDINGS14 if labels[f]]))
        lines.append(
            f"| `{entry['file']}` | {names(entry['nih_labels'])} | {top} | "
            f"{stated(reading.states)} | " + " | ".join(written) + " |"
        )
    return "\n".join(lines) + "\n"


def reports(service: ReportService, mode: str = "prompt-wise") -> str:
    """The README's three reports: each film's NIH labels, the states the panel shows, and
    the report as the page writes it."""
    manifest = {
        e["file"]: e for e in json.loads((EXAMPLES / "manifest.json").read_text())["examples"]
    }
    blocks = []
    for name in READ:
        study = study_from_sources(EXAMPLES / name)
        update = service.generate(study, mode)
        blocks.append(
            f"**`{name}`** (NIH labels: {names(manifest[name]['nih_labels'])}; "
            f"states: {stated(update.condition.states)})\n\n"
            f"> **FINDINGS:** {update.findings}<br>\n> **IMPRESSION:** {update.impression}\n"
        )
    return "\n".join(blocks)


def replace(path: Path, begin: str, end: str, body: str) -> None:
    text = path.read_text()
    block = f"{begin}\n{body}{end}"
    path.write_text(re.sub(f"{begin}.*?{end}", lambda _: block, text, flags=re.DOTALL))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="replace the page's gallery")
    args = parser.parse_args()
    torch.set_num_threads(2)
    service = ReportService.load(dtype="float32")
    table, read = gallery(service), reports(service)
    print(table, read, sep="\n")
    if args.write:
        replace(ROOT / "docs" / "checkpoints.md", BEGIN, END, table)
        replace(ROOT / "README.md", README_BEGIN, README_END, read)


if __name__ == "__main__":
    main()

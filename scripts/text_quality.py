"""Text quality of generated reports: vocabulary, demographics, headers, loops.

    python scripts/text_quality.py runs/demo/prompt-wise/test_generations.jsonl [more.jsonl …]

Each file holds ``{"id", "reference", "generated"}`` rows (``mrg evaluate``/``generate_split``
write them). Prints one table row per file, and one for the references of the first file
(real reports) as the yardstick, then a few failing texts to read.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mrg.environment import setting
from mrg.evaluation.text_quality import (
    corpus_counts,
    examples_of_failures,
    quality_table,
    text_quality,
)

SHARED = Path(setting("MRG_SHARED_DATA"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("generations", nargs="+", type=Path)
    parser.add_argument("--reports", type=Path, default=SHARED / "iu_xray" / "NLMCXR_reports.tgz")
    args = parser.parse_args()
    counts = corpus_counts(args.reports)
    rows, failures = {}, {}
    for path in args.generations:
        records = [json.loads(line) for line in path.read_text().splitlines()]
        if not rows:
            rows["real reports (references)"] = text_quality(
                [r["reference"] for r in records], counts
            )
        texts = [r["generated"] for r in records]
        rows[str(path)] = text_quality(texts, counts)
        failures[str(path)] = examples_of_failures(texts)
    print(quality_table(rows))
    for name, texts in failures.items():
        for text in texts:
            print(f"{name}: {text!r}")


if __name__ == "__main__":
    main()

"""How often real OpenI reports repeat a token n-gram: what ``no_repeat_ngram_size = n`` forbids.

    python benchmarks/ngram_repeats.py

Prints, per n, the share of reports (both sections, tokenised by SmolLM2 as the model writes
them, headers excluded) in which some token n-gram occurs twice, and the share with a word
3-gram loop (three or more times) as ``mrg.evaluation.text_quality`` counts it.
"""

from collections import Counter
from pathlib import Path

from transformers import AutoTokenizer

from mrg.data.reports import iter_openi_reports
from mrg.environment import setting
from mrg.evaluation.text_quality import has_loop
from mrg.model.llm import smollm2_local_dir
from mrg.text.sections import format_report

SHARED = Path(setting("MRG_SHARED_DATA"))


def repeats(ids: list[int], n: int) -> bool:
    grams = Counter(tuple(ids[i : i + n]) for i in range(len(ids) - n + 1))
    return any(c > 1 for c in grams.values())


def main() -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_local_dir())
    reports = [
        r
        for r in iter_openi_reports(SHARED / "iu_xray" / "NLMCXR_reports.tgz")
        if r.findings and r.impression
    ]
    bodies = [
        tokenizer(f" {r.findings} {r.impression}", add_special_tokens=False)["input_ids"]
        for r in reports
    ]
    print(f"{len(reports)} OpenI reports with both sections")
    for n in (2, 3, 4, 5, 6):
        share = sum(repeats(ids, n) for ids in bodies) / len(bodies)
        print(f"token {n}-gram occurring twice: {share:.1%} of reports")
    loops = sum(has_loop(format_report(r.findings, r.impression)) for r in reports) / len(reports)
    print(f"word 3-gram three times or more (a loop): {loops:.1%}")


if __name__ == "__main__":
    main()

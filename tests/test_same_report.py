"""Same study, same report, whatever the load (issue: a report in two seconds): on the real
SmolLM2 with the shipped checkpoints, greedy reports decoded in a batch of eight, four of each
of two studies, equal what each study gets alone, in every CPU setting (fp32, bf16, and the
weight-only int8 and int4 layers), whole reports of up to 120 tokens."""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mrg.config import Decoding
from mrg.data.study import study_from_sources
from mrg.model.cpu_probe import SETTINGS
from mrg.service import ReportService

EXAMPLES = sorted(Path("assets/examples").glob("*.png"))[:2]


@pytest.mark.slow
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_concurrent_identical_and_mixed_requests_get_the_lone_report(setting):
    quantization, dtype = SETTINGS[setting]
    service = ReportService.load(quantization=quantization, dtype=dtype)
    assert (service.info.quantization, service.info.dtype) == (quantization, dtype)
    decoding = Decoding()  # a whole report: bf16 once drifted only after 65 tokens
    studies = [study_from_sources(p) for p in EXAMPLES]
    alone = [service.generate(s, "prompt-wise", decoding).text for s in studies]
    assert alone[0] != alone[1], "two different images should not get one report"

    def report(i: int) -> str:
        return service.generate(studies[i], "prompt-wise", decoding).text

    with ThreadPoolExecutor(8) as pool:  # four of each study: identical and mixed at once
        together = list(pool.map(report, [i % 2 for i in range(8)]))
    batcher = next(iter(service.batchers.values()))
    assert batcher.largest_batch > 1, "the requests never shared a batch"
    assert together == [alone[i % 2] for i in range(8)]

"""``--dtype auto``: the bf16 probe measures a report's worth of work once per machine, caches
it, and says what it found in the log and in ``mrg info``."""

import json

import pytest

from mrg.model import cpu_probe


def fake(bf16: bool) -> dict:
    report = {"float32": 1.0, "bfloat16": 0.5 if bf16 else 2.0}
    return {
        "bf16": bf16,
        "speedup": 1.0 / report["bfloat16"],
        "figures": {
            d: {"step_ms": 10.0, "prefill_ms": 100.0, "report_s": s} for d, s in report.items()
        },
        "measured": "2026-12-02T00:00:00+00:00",
    }


def test_the_measurement_chooses_by_the_time_of_a_whole_report():
    measurement = cpu_probe.measure()
    f32, b16 = (measurement["figures"][d] for d in ("float32", "bfloat16"))
    for figures in (f32, b16):
        estimate = (
            figures["prefill_ms"] / 1000 + cpu_probe.REPORT_TOKENS * figures["step_ms"] / 1000
        )
        assert figures["report_s"] == pytest.approx(estimate, rel=0.02)
    assert measurement["speedup"] == pytest.approx(f32["report_s"] / b16["report_s"], abs=0.01)
    assert measurement["bf16"] == (measurement["speedup"] >= cpu_probe.SPEEDUP)


def test_it_is_measured_once_per_machine_and_again_on_another(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_probe, "measure", lambda: calls.append(1) or fake(True))
    first = cpu_probe.cached_measurement(cache_dir=tmp_path)
    assert first["bf16"] and cpu_probe.cached_measurement(cache_dir=tmp_path) == first
    assert len(calls) == 1
    stored = json.loads((tmp_path / cpu_probe.CACHE_NAME).read_text())
    assert list(stored) == [cpu_probe.machine_key()]
    monkeypatch.setattr(
        cpu_probe, "machine_key", lambda: "another CPU | avx2 | torch 9 | 4 threads"
    )
    assert cpu_probe.cached_measurement(measure_if_missing=False, cache_dir=tmp_path) is None
    cpu_probe.cached_measurement(cache_dir=tmp_path)
    assert len(calls) == 2 and len(json.loads((tmp_path / cpu_probe.CACHE_NAME).read_text())) == 2
    (tmp_path / cpu_probe.CACHE_NAME).write_text("{not json")
    cpu_probe.cached_measurement(cache_dir=tmp_path)  # a damaged cache is measured again
    assert len(calls) == 3


def test_the_line_names_the_choice_and_the_figures():
    line = cpu_probe.describe(fake(False))
    assert line.startswith("LLM dtype on this CPU: float32")
    assert "1.00 s in fp32, 2.00 s in bf16" in line and "×0.50" in line


@pytest.mark.slow
def test_mrg_info_shows_the_parameters_and_the_dtype_auto_chooses(tmp_path, monkeypatch, capsys):
    from mrg.cli import main

    monkeypatch.setattr(cpu_probe, "default_cache_dir", lambda: tmp_path)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "prompt-wise" in out and "promptbook-wise" in out and "134,515,008" in out
    measured = json.loads((tmp_path / cpu_probe.CACHE_NAME).read_text())[cpu_probe.machine_key()]
    assert f"LLM dtype on this CPU: {'bfloat16' if measured['bf16'] else 'float32'}" in out

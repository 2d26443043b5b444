"""``auto``: the CPU probe times a report's worth of work in every setting (fp32, bf16,
int8-wo, int4-wo) once per machine, caches it, and says what it found in the log and in
``mrg info``."""

import json

import pytest

from mrg.model import cpu_probe


def fake(report_s: dict[str, float]) -> dict:
    figures = {
        s: {"step_ms": 10.0, "prefill_ms": 100.0, "report_s": t} for s, t in report_s.items()
    }
    return {
        **cpu_probe.choose(figures),
        "workload": cpu_probe.WORKLOAD,
        "figures": figures,
        "measured": "2026-12-02T00:00:00+00:00",
    }


def test_the_measurement_times_every_setting_and_takes_the_fastest_report():
    measurement = cpu_probe.measure()
    figures = measurement["figures"]
    assert set(figures) == set(cpu_probe.SETTINGS)
    for setting in ("float32", "bfloat16"):  # plain matrix products run everywhere
        f = figures[setting]
        estimate = f["prefill_ms"] / 1000 + cpu_probe.REPORT_TOKENS * f["step_ms"] / 1000
        assert f["report_s"] == pytest.approx(estimate, rel=0.02)
    timed = {s: f["report_s"] for s, f in figures.items() if "report_s" in f}
    timed = {s: t for s, t in timed.items() if s in cpu_probe.AUTO_SETTINGS}
    best = min(timed, key=timed.get)
    if timed["float32"] / timed[best] >= cpu_probe.SPEEDUP:
        assert measurement["choice"] == best
    else:
        assert measurement["choice"] == "float32" and measurement["speedup"] == 1.0


def test_the_choice_needs_a_clear_gain_and_respects_what_is_allowed():
    assert fake({"float32": 1.0, "bfloat16": 0.95, "int8-wo": 0.9})["choice"] == "float32"
    chosen = fake({"float32": 1.0, "bfloat16": 0.8, "int8-wo": 0.5, "int4-wo": 0.4})
    # auto never takes a weight-only setting: int4-wo wrote worse reports than fp32
    assert (chosen["choice"], chosen["speedup"]) == ("bfloat16", 1.25)
    figures = chosen["figures"]
    every = tuple(cpu_probe.SETTINGS)
    assert cpu_probe.choose(figures, every)["choice"] == "int4-wo"
    figures["int4-wo"] = {"error": "no kernel"}  # a kernel this CPU lacks is never chosen
    assert cpu_probe.choose(figures, every)["choice"] == "int8-wo"


def test_it_is_measured_once_per_machine_and_again_on_another(tmp_path, monkeypatch):
    calls = []
    measured = fake({"float32": 1.0, "bfloat16": 0.5})
    monkeypatch.setattr(cpu_probe, "measure", lambda: calls.append(1) or measured)
    first = cpu_probe.cached_measurement(cache_dir=tmp_path)
    assert (
        first["choice"] == "bfloat16" and cpu_probe.cached_measurement(cache_dir=tmp_path) == first
    )
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
    monkeypatch.setattr(cpu_probe, "WORKLOAD", "another report's work")
    cpu_probe.cached_measurement(cache_dir=tmp_path)  # so is another workload
    assert len(calls) == 4


def test_the_line_names_the_choice_and_the_figures():
    measurement = fake({"float32": 1.0, "bfloat16": 0.5, "int4-wo": 0.25})
    measurement["figures"]["int8-wo"] = {"error": "no kernel"}
    measurement["choice"] = "int4-wo"  # cached when auto could take it: the line says today's
    line = cpu_probe.describe(measurement)
    assert line.startswith("LLM on this CPU: bfloat16 (×2.00 against fp32)")
    assert "float32 1.00 s" in line and "bfloat16 0.50 s" in line and "int4-wo 0.25 s" in line
    assert "int8-wo unavailable (no kernel)" in line


@pytest.mark.slow
def test_mrg_info_shows_the_parameters_and_the_setting_auto_chooses(tmp_path, monkeypatch, capsys):
    from mrg.cli import main

    monkeypatch.setattr(cpu_probe, "default_cache_dir", lambda: tmp_path)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "prompt-wise" in out and "promptbook-wise" in out and "134,515,008" in out
    measured = json.loads((tmp_path / cpu_probe.CACHE_NAME).read_text())[cpu_probe.machine_key()]
    assert f"LLM on this CPU: {measured['choice']}" in out

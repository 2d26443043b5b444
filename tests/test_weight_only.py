"""Weight-only int8/int4 layers for the frozen LLM on the CPU (issue: a report in two seconds):
the layers compute what their de-quantised weights would, give Grad-CAM its input gradient,
and the service loads, streams and explains with them; ``auto`` takes what the CPU probe chose."""

import copy

import pytest
import torch
from conftest import save_tiny_checkpoints
from test_service import REPORT, synthetic_study

from mrg.config import ConfigError, Decoding, LLMConfig
from mrg.model.llm import quantization_in_effect
from mrg.model.weight_only import (
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    WeightOnlyLinear,
    quantize_weight_only,
)
from mrg.service import ReportService


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


@pytest.mark.parametrize(
    ("layer", "weight_error"), [(Int8WeightOnlyLinear, 0.01), (Int4WeightOnlyLinear, 0.1)]
)
def test_a_layer_multiplies_by_its_dequantised_weight_and_back(layer, weight_error):
    torch.manual_seed(0)
    linear = torch.nn.Linear(576, 192, bias=False)
    quantized = layer(linear.weight)
    dequantized = quantized.dequantized()
    assert dequantized.shape == linear.weight.shape and dequantized.dtype == torch.bfloat16
    # int8: per-channel rounding; int4: 16 levels per group of 32 (measured 0.005 and 0.06)
    assert relative(dequantized, linear.weight) < weight_error
    x = torch.randn(3, 5, 576, requires_grad=True)
    y = quantized(x)
    assert y.shape == (3, 5, 192) and y.dtype == torch.float32
    assert relative(y, x.detach() @ dequantized.float().T) < 0.01  # bf16 activations
    upstream = torch.randn_like(y)
    y.backward(upstream)
    assert relative(x.grad, upstream @ dequantized.float()) < 0.01


def test_quantizing_an_llm_replaces_every_linear_and_keeps_it_close(tiny_llm, tokenizer):
    ids = tokenizer("FINDINGS: The heart is normal in size.", return_tensors="pt").input_ids
    reference = copy.deepcopy(tiny_llm).to(torch.bfloat16)(ids).logits[0, -1].float()
    # a random LLaMA with wide weights (initializer_range 0.3) magnifies the rounding
    for scheme, similarity in (("int8-wo", 0.99), ("int4-wo", 0.9)):
        llm = quantize_weight_only(copy.deepcopy(tiny_llm), scheme)
        assert not any(isinstance(m, torch.nn.Linear) for m in llm.modules())
        assert sum(isinstance(m, WeightOnlyLinear) for m in llm.modules()) == 2 * 7 + 1
        assert llm.get_input_embeddings().weight.dtype == torch.bfloat16  # inputs_embeds
        assert quantization_in_effect(llm) == scheme
        logits = llm(ids).logits[0, -1].float()
        assert torch.nn.functional.cosine_similarity(logits, reference, dim=0) > similarity
    with pytest.raises(ValueError, match="int8-wo"):
        quantize_weight_only(copy.deepcopy(tiny_llm), "int3")


def test_weight_only_needs_bf16_activations_and_the_cpu():
    from mrg.service.models import resolve_llm_config

    with pytest.raises(ConfigError, match="bfloat16"):
        LLMConfig(quantization="int4-wo", dtype="float32").validate()
    with pytest.raises(ConfigError, match="CPU only"):
        resolve_llm_config({}, "cuda", None, "int8-wo", None)
    config, _ = resolve_llm_config({}, "cpu", None, "int8-wo", None)
    assert (config.quantization, config.dtype) == ("int8-wo", "bfloat16")


@pytest.mark.parametrize("scheme", ["int8-wo", "int4-wo"])
def test_the_service_streams_and_explains_on_weight_only_layers(
    tiny_llm, tokenizer, tmp_path, scheme
):
    service = ReportService.load(
        save_tiny_checkpoints(tmp_path, tiny_llm, tokenizer), device="cpu", quantization=scheme
    )
    assert (service.info.quantization, service.info.dtype) == (scheme, "bfloat16")
    study = synthetic_study()
    updates = list(service.stream(study, "prompt-wise", Decoding(max_new_tokens=8)))
    assert updates[-1].finished and updates[-1].text.startswith("FINDINGS:")
    heatmaps = service.explain(study, "prompt-wise", REPORT)
    assert [h.view for h in heatmaps] == ["frontal", "lateral"]
    assert all(h.cam.max() == pytest.approx(1.0, abs=1e-5) for h in heatmaps)


@pytest.mark.parametrize(
    ("measured", "asked", "expected"),
    [
        (("int4-wo", "bfloat16"), {}, ("int4-wo", "bfloat16")),
        (("int4-wo", "bfloat16"), {"dtype": "float32"}, ("none", "float32")),
        (("none", "float32"), {"quantization": "int8-wo"}, ("int8-wo", "bfloat16")),
        (("none", "bfloat16"), {"quantization": "none"}, ("none", "bfloat16")),
    ],
)
def test_auto_takes_the_cpu_measurement_and_an_explicit_choice_wins(
    tiny_llm, tokenizer, tmp_path, monkeypatch, measured, asked, expected
):
    import mrg.service.models

    seen = []
    monkeypatch.setattr(
        mrg.service.models, "cpu_setting", lambda allowed: seen.append(allowed) or measured
    )
    checkpoints = save_tiny_checkpoints(tmp_path, tiny_llm, tokenizer)
    service = ReportService.load(checkpoints, device="cpu", **asked)
    assert (service.info.quantization, service.info.dtype) == expected
    if asked.get("quantization") == "none":  # only the dtype was left to measure
        assert seen == [("float32", "bfloat16")]


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["int4-wo", "auto"])  # int8-wo: test_same_report
def test_mrg_generate_on_the_real_smollm2_says_what_is_in_effect(flag, capsys):
    import json

    from conftest import DICOM

    from mrg.cli import main
    from mrg.model.cpu_probe import cpu_setting

    assert main(["generate", DICOM, "--quantization", flag, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = cpu_setting() if flag == "auto" else (flag, "bfloat16")
    assert (out["quantization"], out["dtype"]) == expected
    assert out["text"].startswith("FINDINGS: ") and "\nIMPRESSION: " in out["text"]
    assert out["tokens"] > 10

"""The full-scale path run small: a bitsandbytes-quantized frozen LLaMA under MRG-LLM, on the CPU.

bitsandbytes ≥ 0.48 quantizes on the CPU, so NF4 training, streaming and persistence are
exercised here exactly as on a GPU, only with a tiny random LLaMA.
"""

import logging

import pytest
import torch
from conftest import random_batch, tiny_model_config

from mrg.config import LLMConfig
from mrg.model import Decoding, MRGModel
from mrg.model import llm as llm_module
from mrg.model.llm import bitsandbytes_device, load_frozen_llm, quantization_config

REPORTS = [
    "FINDINGS: The heart is normal. IMPRESSION: No acute disease.",
    "FINDINGS: Small left effusion. IMPRESSION: Effusion.",
]
LAYER = {"nf4": "Linear4bit", "int8": "Linear8bitLt"}


@pytest.fixture(scope="module", autouse=True)
def needs_bitsandbytes():
    if bitsandbytes_device() is None:
        pytest.skip("the installed bitsandbytes quantizes on no device of this machine")


@pytest.fixture(scope="module")
def nf4(tiny_llm_dir):
    return load_frozen_llm(LLMConfig(source=str(tiny_llm_dir), quantization="nf4"))


def nf4_model(nf4, mode: str, seed: int = 0) -> MRGModel:
    llm, tokenizer = nf4
    config = tiny_model_config(mode)
    config.llm = LLMConfig(source="tiny", quantization="nf4")
    torch.manual_seed(seed)
    return MRGModel(config, llm, tokenizer)


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_quantized_layers_are_really_loaded_and_frozen(tiny_llm_dir, quantization):
    llm, _ = load_frozen_llm(LLMConfig(source=str(tiny_llm_dir), quantization=quantization))
    layer = llm.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == LAYER[quantization]
    assert getattr(llm, f"is_loaded_in_{'4' if quantization == 'nf4' else '8'}bit")
    assert not any(p.requires_grad for p in llm.parameters()) and not llm.training


def test_without_a_bitsandbytes_device_quantization_falls_back_with_a_log_line(monkeypatch, caplog):
    monkeypatch.setattr(llm_module, "bitsandbytes_device", lambda: None)
    with caplog.at_level(logging.WARNING, logger="mrg.model.llm"):
        assert quantization_config(LLMConfig(quantization="nf4")) is None
    assert "bitsandbytes cannot quantize on this machine" in caplog.text


@pytest.mark.parametrize("mode", ["static", "prompt-wise", "promptbook-wise"])
def test_nf4_training_step(nf4, mode):
    model = nf4_model(nf4, mode).train()
    before = {k: v.clone() for k, v in model.llm.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = model(random_batch(), REPORTS)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for part in ("encoder", "projection", "customizer"):
        grads = [p.grad for p in getattr(model, part).parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), part
    optimizer.step()
    after = model.llm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # 4-bit blocks included


def test_nf4_streaming_matches_greedy_generation(nf4):
    model = nf4_model(nf4, "prompt-wise").eval()
    views = random_batch(batch=1)
    decoding = Decoding(max_new_tokens=12)
    generated = model.generate(views, decoding)[0]
    streamed = "".join(model.stream(views, decoding)).strip()
    assert generated.startswith("FINDINGS:") and streamed == generated


def test_save_load_round_trip_over_an_nf4_llm(nf4, tmp_path):
    model = nf4_model(nf4, "promptbook-wise")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(random_batch(), REPORTS).loss.backward()
    optimizer.step()
    model.eval().save_pretrained(tmp_path)
    llm, tokenizer = nf4
    loaded = MRGModel.from_pretrained(tmp_path, llm=llm, tokenizer=tokenizer).eval()
    batch = random_batch(seed=3)
    with torch.no_grad():
        assert torch.equal(model(batch, REPORTS).loss, loaded(batch, REPORTS).loss)
    decoding = Decoding(max_new_tokens=8)
    assert model.generate(batch, decoding) == loaded.generate(batch, decoding)

"""Frozen-LLM loading: the cached SmolLM2 copy, local directories, the 4-bit fallback."""

import pytest
import torch

from mrg.config import ConfigError, LLMConfig
from mrg.model.llm import LLMNotFoundError, load_frozen_llm, smollm2_local_dir


def test_smollm2_cache_is_plain_safetensors(smollm2_dir):
    assert (smollm2_dir / "model.safetensors").is_file()
    assert (smollm2_dir / "config.json").is_file()
    assert smollm2_local_dir() == smollm2_dir  # second call: no conversion


@pytest.mark.slow
def test_loaded_llm_is_frozen_and_in_eval(smollm2):
    model, tokenizer = smollm2
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert model.config.model_type == "llama" and model.config.hidden_size == 576
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template


def test_local_directory_source_loads_the_same_model(tiny_llm, tokenizer, tmp_path):
    tiny_llm.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, _tok = load_frozen_llm(LLMConfig(source=str(tmp_path)))
    assert all(not p.requires_grad for p in model.parameters())
    ids = torch.tensor([[1, 2, 3]])
    assert torch.allclose(model(input_ids=ids).logits, tiny_llm(input_ids=ids).logits)


def test_bfloat16_dtype_is_honoured(tiny_llm, tokenizer, tmp_path):
    tiny_llm.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, _ = load_frozen_llm(LLMConfig(source=str(tmp_path), dtype="bfloat16"))
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16


def test_a_bf16_row_alone_gets_the_product_it_gets_in_a_batch(tiny_llm, tokenizer, tmp_path):
    tiny_llm.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, _ = load_frozen_llm(LLMConfig(source=str(tmp_path), dtype="bfloat16"))
    plain, _ = load_frozen_llm(LLMConfig(source=str(tmp_path)))
    linear = model.model.layers[0].mlp.down_proj
    assert "forward" in vars(linear) and "forward" not in vars(plain.model.layers[0].mlp.down_proj)
    torch.manual_seed(0)
    rows = torch.randn(64, 1, linear.in_features).to(torch.bfloat16)
    batch = linear(rows)
    assert all(torch.equal(linear(rows[i : i + 1]), batch[i : i + 1]) for i in range(64))
    assert torch.equal(linear(rows[:1, 0]), batch[0])  # any leading shape
    one = torch.tensor([[5]])  # one token: every product a lone row, still the same model
    assert torch.allclose(
        model(input_ids=one).logits.float(), plain(input_ids=one).logits, atol=0.3
    )


def test_bad_configs_name_the_field():
    with pytest.raises(ConfigError, match="llm.quantization"):
        LLMConfig(quantization="q4").validate()
    with pytest.raises(ConfigError, match="llm.dtype"):
        LLMConfig(dtype="fp8").validate()


def test_missing_local_llm_is_a_clear_error(tmp_path):
    with pytest.raises(LLMNotFoundError):
        load_frozen_llm(LLMConfig(source=str(tmp_path / "nope")))


def test_cached_copy_is_used_without_touching_the_gguf(smollm2_dir, monkeypatch):
    def no_conversion():
        raise AssertionError("the GGUF was read although a cached copy exists")

    monkeypatch.setattr("mrg.model.llm.smollm2_gguf_path", no_conversion)
    assert smollm2_local_dir() == smollm2_dir


def test_hub_ids_pass_through_and_bad_paths_fail(tmp_path):
    from mrg.model.llm import resolve_llm_path

    assert (
        resolve_llm_path(LLMConfig(source="meta-llama/Llama-2-7b-chat-hf"))
        == "meta-llama/Llama-2-7b-chat-hf"
    )
    with pytest.raises(LLMNotFoundError, match="config.json"):
        resolve_llm_path(LLMConfig(source=str(tmp_path)))

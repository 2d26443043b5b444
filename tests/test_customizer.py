import math

import pytest
import torch

from mrg.config import ConfigError, CustomizerConfig
from mrg.model.customizer import (
    PromptBook,
    PromptWise,
    StaticPrompt,
    build_customizer,
    usage_entropy,
)

VISUAL, EMBED = 16, 12


def make(mode, **kwargs):
    config = CustomizerConfig(mode=mode, prompt_length=3, book_size=5, hidden_dim=8, **kwargs)
    torch.manual_seed(0)
    return build_customizer(config, VISUAL, EMBED, init_std=0.02)


def test_modes_build_the_right_classes():
    assert isinstance(make("static"), StaticPrompt)
    assert isinstance(make("prompt-wise"), PromptWise)
    assert isinstance(make("promptbook-wise"), PromptBook)


def test_prompt_wise_is_identity_at_init():
    customizer = make("prompt-wise")
    visual = torch.randn(4, VISUAL) * 5
    gamma, beta = customizer.affine(visual)
    assert torch.equal(gamma, torch.ones_like(gamma)) and torch.equal(beta, torch.zeros_like(beta))
    tokens = customizer(visual).tokens
    assert tokens.shape == (4, 3, EMBED)
    assert torch.allclose(tokens, customizer.prompt.expand(4, -1, -1))


def test_promptbook_is_weighted_book_at_init_and_weights_sum_to_one():
    customizer = make("promptbook-wise")
    visual = torch.randn(6, VISUAL)
    out = customizer(visual)
    assert out.selection.shape == (6, 5)
    assert torch.allclose(out.selection.sum(-1), torch.ones(6))
    assert (out.selection >= 0).all()
    expected = torch.einsum("bk,kld->bld", out.selection, customizer.book)
    assert torch.allclose(out.tokens, expected, atol=1e-6)


def test_promptbook_top_k_keeps_exactly_k_entries():
    customizer = make("promptbook-wise", top_k=2)
    weights = customizer.selection(torch.randn(7, VISUAL))
    assert ((weights > 0).sum(-1) == 2).all()
    assert torch.allclose(weights.sum(-1), torch.ones(7))


def test_usage_entropy_bounds():
    uniform = torch.full((3, 4), 0.25)
    collapsed = torch.tensor([[1.0, 0, 0, 0]] * 3)
    assert usage_entropy(uniform).item() == pytest.approx(math.log(4))
    assert usage_entropy(collapsed).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("mode", ["prompt-wise", "promptbook-wise"])
def test_two_images_get_different_prompts_after_one_step(mode):
    customizer = make(mode)
    visual = torch.randn(2, VISUAL)
    before = customizer(visual).tokens
    if mode == "prompt-wise":  # identity at init: the image does not matter yet
        assert torch.allclose(before[0], before[1])
    optimizer = torch.optim.AdamW(customizer.parameters(), lr=1e-2)
    target = torch.randn_like(before)
    torch.nn.functional.mse_loss(customizer(visual).tokens, target).backward()
    optimizer.step()
    after = customizer(visual).tokens
    assert not torch.allclose(after[0], after[1], atol=1e-4)


def test_static_prompt_ignores_the_image():
    customizer = make("static")
    tokens = customizer(torch.randn(3, VISUAL)).tokens
    assert torch.equal(tokens[0], tokens[2])


def test_bad_config_names_the_field():
    with pytest.raises(ConfigError, match="customizer.mode"):
        CustomizerConfig(mode="promptbook").validate()
    with pytest.raises(ConfigError, match="customizer.top_k"):
        CustomizerConfig(mode="promptbook-wise", book_size=4, top_k=9).validate()


FINDINGS = 15  # 14 ChestX-ray14 findings + normal


@pytest.mark.parametrize("mode", ["prompt-wise", "promptbook-wise"])
def test_findings_conditioning_is_the_identity_at_init(mode):
    customizer = make(mode, conditioning="visual+findings")
    visual, findings = torch.randn(4, VISUAL) * 5, torch.rand(4, FINDINGS)
    plain = customizer.plain_prompt().expand(4, -1, -1)
    assert torch.allclose(customizer(visual, findings).tokens, plain, atol=1e-6)
    with pytest.raises(ValueError, match="findings"):
        customizer(visual)


@pytest.mark.parametrize("mode", ["prompt-wise", "promptbook-wise"])
def test_findings_reach_the_prompt_once_trained(mode):
    """One step on a loss that needs y moves P'(v, y) apart for two y with the same v."""
    customizer = make(mode, conditioning="visual+findings")
    visual = torch.randn(1, VISUAL).expand(2, -1)
    findings = torch.tensor([[1.0] + [0.0] * 14, [0.0] * 14 + [1.0]])
    target = torch.stack([torch.ones(3, EMBED), -torch.ones(3, EMBED)])
    optimizer = torch.optim.SGD(customizer.parameters(), lr=0.5)
    for _ in range(3):
        loss = (customizer(visual, findings).tokens - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    tokens = customizer(visual, findings).tokens
    assert (tokens[0] - tokens[1]).abs().max() > 1e-3


def test_visual_conditioning_ignores_findings_and_static_refuses_them():
    customizer = make("prompt-wise")
    visual = torch.randn(2, VISUAL)
    assert torch.equal(
        customizer(visual).tokens, customizer(visual, torch.rand(2, FINDINGS)).tokens
    )
    with pytest.raises(ConfigError, match="static"):
        make("static", conditioning="visual+findings")
    with pytest.raises(ConfigError, match="conditioning"):
        make("prompt-wise", conditioning="findings")

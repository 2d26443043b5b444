"""MRG model with a tiny random LLaMA: shapes, masking, gradients, decoding, persistence."""

import json

import pytest
import torch
from conftest import random_batch, tiny_model_config

from mrg.model import Decoding, MRGModel
from mrg.model.mrg_model import CONFIG_NAME, IGNORE_INDEX, WEIGHTS_NAME
from mrg.model.prompting import positions_from_mask

REPORTS = [
    "FINDINGS: The heart is normal. IMPRESSION: No acute disease.",
    "FINDINGS: Small left effusion.",
]


def test_context_layout_and_shapes(make_tiny_model):
    model = make_tiny_model("promptbook-wise")
    views = random_batch()
    ctx = model.context(views)
    t = model.template
    visual = 2 * model.config.encoder.pool_grid**2
    length = len(t.prefix_ids) + model.config.customizer.prompt_length + visual + len(t.suffix_ids)
    assert ctx.embeds.shape == (2, length, model.llm.config.hidden_size)
    assert ctx.attention_mask.shape == (2, length) and bool(ctx.attention_mask.all())
    # the instruction and assistant prefix are the real chat template's tokens
    assert model.tokenizer.decode(t.prefix_ids).startswith("<|im_start|>system")
    assert model.tokenizer.decode(t.suffix_ids).endswith("<|im_start|>assistant\n")


def test_missing_view_is_masked_and_skipped_in_positions(make_tiny_model):
    model = make_tiny_model()
    views = random_batch()
    views.mask[1, 1] = False
    ctx = model.context(views)
    grid = model.config.encoder.pool_grid**2
    assert int(ctx.attention_mask[0].sum() - ctx.attention_mask[1].sum()) == grid
    positions = positions_from_mask(ctx.attention_mask)
    assert positions[1, -1] == positions[0, -1] - grid


def test_labels_mask_everything_but_report_and_eos(make_tiny_model):
    model = make_tiny_model()
    views = random_batch()
    captured = {}
    original = model.llm.forward

    def spy(**kwargs):
        captured.update(kwargs)
        return original(**kwargs)

    model.llm.forward = spy
    try:
        model(views, REPORTS)
    finally:
        del model.llm.forward
    labels = captured["labels"]
    report_ids, report_mask = model.tokenize_reports(REPORTS)
    context_len = labels.shape[1] - report_ids.shape[1]
    assert (labels[:, :context_len] == IGNORE_INDEX).all()
    for row in range(2):
        n = int(report_mask[row].sum())
        kept = labels[row, context_len : context_len + n]
        assert kept.tolist() == report_ids[row, :n].tolist()
        assert kept[-1].item() == model.template.eos_id
        assert (labels[row, context_len + n :] == IGNORE_INDEX).all()
    decoded = model.tokenizer.decode(report_ids[0, : int(report_mask[0].sum()) - 1])
    assert decoded == REPORTS[0]


def test_report_truncated_to_max_tokens(make_tiny_model):
    model = make_tiny_model()
    ids, _mask = model.tokenize_reports(["word " * 200])
    assert ids.shape[1] == model.config.max_report_tokens + 1


@pytest.mark.parametrize("mode", ["static", "prompt-wise", "promptbook-wise"])
def test_gradients_reach_trainable_parts_never_the_llm(make_tiny_model, mode):
    model = make_tiny_model(mode)
    model.train()
    out = model(random_batch(), REPORTS)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for part in ("encoder", "projection", "customizer"):
        grads = [p.grad for p in getattr(model, part).parameters() if p.requires_grad]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), part
    assert all(p.grad is None and not p.requires_grad for p in model.llm.parameters())
    assert not model.llm.training
    model.zero_grad(set_to_none=True)


def test_llm_is_frozen_after_an_optimizer_step(make_tiny_model):
    model = make_tiny_model()
    before = {k: v.clone() for k, v in model.llm.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(random_batch(), REPORTS).loss.backward()
    optimizer.step()
    after = model.llm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_stream_matches_greedy_generate(make_tiny_model):
    model = make_tiny_model()
    views = random_batch(batch=1)
    decoding = Decoding(max_new_tokens=12, repetition_penalty=1.3)
    generated = model.generate(views, decoding)[0]
    ids = list(model.stream_ids(views, decoding))
    assert 0 < len(ids) <= 12
    assert model.tokenizer.decode(ids, skip_special_tokens=True).strip() == generated
    assert "".join(model.stream(views, decoding)).strip() == generated


def test_beam_and_sampling_decode(make_tiny_model):
    model = make_tiny_model()
    views = random_batch(batch=2)
    beams = model.generate(views, Decoding(strategy="beam", num_beams=3, max_new_tokens=6))
    torch.manual_seed(0)
    samples = model.generate(views, Decoding(strategy="sample", max_new_tokens=6))
    assert len(beams) == len(samples) == 2 and all(isinstance(t, str) for t in beams + samples)
    with pytest.raises(ValueError, match="not streamable"):
        next(model.stream_ids(views[:1], Decoding(strategy="beam")))


def test_closing_the_stream_stops_decoding(make_tiny_model):
    from mrg.batching import forced_run

    model, views, decoding = make_tiny_model(), random_batch(batch=1), Decoding(max_new_tokens=50)
    opening, _ = forced_run(model.decoding_request(views, decoding), [])  # FINDINGS: …
    calls = {"n": 0}
    original = model.llm.forward

    def counting(**kwargs):
        calls["n"] += 1
        return original(**kwargs)

    model.llm.forward = counting
    try:
        stream = model.stream_ids(views, decoding)
        assert [next(stream) for _ in opening] == opening and calls["n"] == 0  # not decoded
        next(stream)
        next(stream)
        stream.close()
    finally:
        del model.llm.forward
    # the context with the opening, and one cached step: none after close(); the template's
    # own opening was read once, by the first request
    assert calls["n"] == 2


@pytest.mark.parametrize("mode", ["static", "prompt-wise", "promptbook-wise"])
def test_save_load_round_trip_is_exact(make_tiny_model, tmp_path, mode):
    model = make_tiny_model(mode)
    # move off the identity initialisation so the round trip is not trivially equal
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(random_batch(), REPORTS).loss.backward()
    optimizer.step()
    model.eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["customizer"]["mode"] == mode and config["llm"]["source"] == "smollm2"
    assert config["encoder"]["name"] == "hybrid_vit_effnet_lite0"

    from safetensors.torch import load_file

    saved = load_file(tmp_path / WEIGHTS_NAME)
    assert saved and not any(k.startswith("llm.") for k in saved)

    loaded = MRGModel.from_pretrained(tmp_path, llm=model.llm, tokenizer=model.tokenizer).eval()
    assert loaded.llm is model.llm  # the frozen LLM is shared, not reloaded
    batch = random_batch(seed=3)
    with torch.no_grad():
        assert torch.equal(model(batch, REPORTS).loss, loaded(batch, REPORTS).loss)
    decoding = Decoding(max_new_tokens=8)
    assert model.generate(batch, decoding) == loaded.generate(batch, decoding)


def test_loading_a_checkpoint_into_the_wrong_mode_fails(make_tiny_model, tmp_path):
    make_tiny_model("prompt-wise").save_pretrained(tmp_path)
    model = make_tiny_model("promptbook-wise")
    with pytest.raises(ValueError, match="does not match"):
        MRGModel.from_pretrained(
            tmp_path,
            llm=model.llm,
            tokenizer=model.tokenizer,
            config_overrides={"customizer": {"mode": "promptbook-wise"}},
        )


def test_an_aligned_encoder_loads_into_another_mode(make_tiny_model, tmp_path):
    """The shared alignment stage: one mode's encoder, every other weight left as it was."""
    source = make_tiny_model("prompt-wise")
    with torch.no_grad():
        for param in source.encoder.parameters():
            if param.requires_grad:
                param.add_(0.5)
    source.save_pretrained(tmp_path)
    target = make_tiny_model("promptbook-wise")
    customizer = {k: v.clone() for k, v in target.customizer.state_dict().items()}
    target.load_trainable(tmp_path, prefix="encoder.")
    for name, tensor in target.encoder.state_dict().items():
        assert torch.equal(tensor, source.encoder.state_dict()[name]), name
    for name, tensor in target.customizer.state_dict().items():
        assert torch.equal(tensor, customizer[name]), name


def test_trainable_counts_grow_with_customization(make_tiny_model):
    counts = {
        mode: make_tiny_model(mode).num_trainable_parameters()
        for mode in ("static", "prompt-wise", "promptbook-wise")
    }
    assert (
        counts["static"]["customizer"]
        < counts["prompt-wise"]["customizer"]
        < counts["promptbook-wise"]["customizer"]
    )
    assert counts["static"]["encoder"] == counts["promptbook-wise"]["encoder"] > 0


def test_frozen_stem_is_not_saved(tiny_llm, tokenizer, tmp_path):
    config = tiny_model_config()
    config.encoder.freeze_stem = True
    model = MRGModel(config, tiny_llm, tokenizer)
    assert not any("backbone" in k for k in model.trainable_state_dict())
    model.save_pretrained(tmp_path)
    MRGModel.from_pretrained(tmp_path, llm=tiny_llm, tokenizer=tokenizer)


def test_a_timm_vit_by_name_works_as_encoder(tiny_llm, tokenizer):
    config = tiny_model_config("promptbook-wise")
    config.encoder.name = "vit_tiny_patch16_224"
    config.encoder.pretrained = False  # no hub here; GPU hosts set pretrained=True
    config.encoder.image_size = 64
    model = MRGModel(config, tiny_llm, tokenizer)
    assert model.encoder.grid_size == (4, 4) and model.encoder.stem is None
    out = model(random_batch(), REPORTS)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.encoder.vit.blocks[0].attn.qkv.weight.grad is not None

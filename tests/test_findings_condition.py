"""The findings condition y in the MRG model: words in the user turn, the affine heads, the
weighted language loss (tiny random LLaMA)."""

import pytest
import torch
from conftest import random_batch, tiny_model_config

from mrg.model import Decoding, MRGModel
from mrg.text.taxonomy import FINDINGS14, findings_vector, findings_words

REPORTS = ["FINDINGS: Cardiomegaly. Lungs clear. IMPRESSION: Cardiomegaly.", "FINDINGS: Normal."]


def conditioned(llm, tokenizer, mode="prompt-wise", words=True, affine=True) -> MRGModel:
    config = tiny_model_config(mode)
    config.findings_prompt = "words" if words else "none"
    config.customizer.conditioning = "visual+findings" if affine else "visual"
    torch.manual_seed(0)
    return MRGModel(config, llm, tokenizer)


def y_of(*named: list[str]) -> torch.Tensor:
    return torch.tensor([findings_vector(n) for n in named])


def test_findings_words_read_as_a_radiologist_writes():
    assert (
        findings_words(["Effusion", "Cardiomegaly"]) == "Findings: cardiomegaly, pleural effusion."
    )
    assert findings_words([]) == "Findings: none."
    assert findings_vector([])[-1] == 1.0 and sum(findings_vector(["Mass"])) == 1.0
    with pytest.raises(ValueError, match="unknown findings"):
        findings_vector(["Fracture"])


def test_words_follow_the_image_and_rows_are_left_padded(tiny_llm, tokenizer):
    model = conditioned(tiny_llm, tokenizer, affine=False)
    y = y_of(["Cardiomegaly", "Effusion"], [])
    ctx = model.context(random_batch(), y)
    lengths = ctx.attention_mask.sum(1)
    assert lengths[0] > lengths[1]  # more words for two findings than for "none"
    assert ctx.attention_mask[1, 0] == 0 and ctx.attention_mask[0].all()  # padding on the left
    # the words sit between the image and the assistant turn, as the tokenizer writes them
    words = tokenizer(findings_words(["Cardiomegaly", "Effusion"]), add_special_tokens=False)[
        "input_ids"
    ]
    tail = len(model.template.suffix_ids)
    embedded = tiny_llm.get_input_embeddings()(torch.tensor(words))
    assert torch.allclose(ctx.embeds[0, -tail - len(words) : -tail], embedded)
    with pytest.raises(ValueError, match="findings"):
        model.context(random_batch())


def test_unconditioned_context_is_unchanged_by_the_new_fields(make_tiny_model, tiny_llm, tokenizer):
    plain = make_tiny_model()
    same = conditioned(tiny_llm, tokenizer, words=False, affine=False)
    views = random_batch()
    assert torch.equal(plain.context(views).embeds, same.context(views, y_of([], [])).embeds)


@pytest.mark.parametrize("mode", ["prompt-wise", "promptbook-wise"])
def test_affine_findings_condition_is_the_identity_until_trained(tiny_llm, tokenizer, mode):
    model = conditioned(tiny_llm, tokenizer, mode, words=False)
    ctx_a = model.text_context(2, y_of(["Mass"], []))
    plain = model.customizer.plain_prompt()
    assert torch.allclose(ctx_a.prompt.tokens, plain.expand(2, -1, -1), atol=1e-6)
    model.generate(None, Decoding(max_new_tokens=4), y_of(["Mass"], []))


def test_weighted_loss_with_unit_weights_is_the_plain_loss(tiny_llm, tokenizer):
    model = conditioned(tiny_llm, tokenizer)
    y = y_of(["Cardiomegaly"], [])
    plain = model.language_loss(REPORTS, y)
    ones = model.token_weights(REPORTS, [[], []], 3.0)
    assert torch.equal(ones, torch.ones_like(ones))
    assert torch.allclose(model.language_loss(REPORTS, y, ones), plain, atol=1e-5)
    start = REPORTS[0].index("Cardiomegaly")
    heavy = model.token_weights(REPORTS, [[(start, start + 13)], []], 3.0)
    assert heavy[0].max() == 3.0 and heavy[1].max() == 1.0
    assert not torch.allclose(model.language_loss(REPORTS, y, heavy), plain)


def test_language_stage_trains_the_findings_code_not_the_visual_one(tiny_llm, tokenizer):
    from mrg.train.stages import TrainingModule

    model = conditioned(tiny_llm, tokenizer, words=False)
    module = TrainingModule(model, torch.nn.Identity(), None, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    trained = {names[id(p)] for p in module.stage_parameters("language")}
    assert "customizer.prompt" in trained
    assert "customizer.affine.trunk.findings.weight" in trained
    assert not any(".visual." in n for n in trained)
    assert len(FINDINGS14) + 1 == model.customizer.affine.trunk.findings.in_features


@pytest.mark.parametrize("lead_at", ["start", "heart", "end"])
def test_a_report_can_lead_with_its_findings(tiny_llm, tokenizer, lead_at):
    model = conditioned(tiny_llm, tokenizer).eval()
    decoding = Decoding(max_new_tokens=30, lead_with_findings=True, lead_at=lead_at)
    y = y_of(["Cardiomegaly", "Effusion"], [])
    texts = model.generate(random_batch(), decoding, y)
    findings, impression = texts[0].split("\nIMPRESSION:")
    lead = "Cardiomegaly. Pleural effusion."
    # at the start, and after the heart where the lead speaks for it: the findings open with
    # the lead; at the end: the LLM writes, then the lead closes them
    assert findings.startswith(f"FINDINGS: {lead}") == (lead_at != "end")
    assert findings.endswith(f" {lead}") == (lead_at == "end")
    # the impression of a report that names findings is their sentences, and nothing else
    assert impression == f" {lead}"
    assert texts[1].startswith("FINDINGS:") and "IMPRESSION:" in texts[1]
    streamed = "".join(model.stream(random_batch()[:1], decoding, y[:1]))
    assert streamed.strip() == texts[0]


def test_image_stages_can_leave_the_prompt_as_the_language_stage_wrote_it(tiny_llm, tokenizer):
    from mrg.train.stages import TrainingModule

    model = conditioned(tiny_llm, tokenizer, mode="promptbook-wise")
    names = {id(p): n for n, p in model.named_parameters()}
    kept = TrainingModule(model, torch.nn.Identity(), None, 0.0, freeze_prompt=True)
    trained = {names.get(id(p)) for p in kept.stage_parameters("generate")}
    assert "customizer.book" not in trained and "customizer.affine.to_gamma.weight" in trained
    free = TrainingModule(model, torch.nn.Identity(), None, 0.0)
    assert "customizer.book" in {names.get(id(p)) for p in free.stage_parameters("generate")}

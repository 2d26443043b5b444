"""Report-structured decoding: headers exact and once, no loops, a clean stop, on any strategy."""

import pytest
import torch
from conftest import random_batch
from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

from mrg.config import Decoding
from mrg.evaluation.text_quality import has_loop, well_formed
from mrg.model.decoding import OnBody, ReportStructureProcessor, report_structure
from mrg.text.sections import split_sections


@pytest.fixture
def structure(tokenizer):
    return report_structure(tokenizer, tokenizer.convert_tokens_to_ids("<|im_end|>"))


def test_headers_are_single_tokens_sequences_and_the_newline_marks_the_impression(
    structure, tokenizer
):
    assert tokenizer.decode(structure.findings) == "FINDINGS:"
    assert tokenizer.decode(structure.impression) == "\nIMPRESSION:"
    assert structure.impression[0] in structure.newline_ids.tolist()


def test_closing_the_findings_moves_newline_and_eos_mass_to_the_impression_header(structure):
    processor = ReportStructureProcessor(structure, max_new_tokens=100)
    encode = lambda text: structure.tokenizer.encode(text, add_special_tokens=False)
    ids = torch.tensor([structure.findings + encode(" The aorta is normal.")])
    scores = torch.zeros(1, len(structure.tokenizer))
    scores[0, structure.eos_id] = 10.0  # the model wants to stop in the findings
    out = processor(ids, scores.clone())
    assert out[0].argmax() == structure.impression[0]
    assert out[0, structure.eos_id] == float("-inf")
    assert torch.isinf(
        out[0, structure.newline_ids[structure.newline_ids != structure.impression[0]]]
    ).all()
    mid_sentence = torch.tensor([structure.findings + encode(" The aorta is a normal")])
    out = processor(mid_sentence, scores.clone())  # the findings close at a sentence end only
    assert torch.isinf(out[0, structure.impression[0]]) and torch.isinf(out[0, structure.eos_id])


def test_in_the_impression_a_newline_ends_the_report(structure):
    processor = ReportStructureProcessor(structure, max_new_tokens=100)
    ids = torch.tensor([structure.findings + [1234] + structure.impression + [567]])
    scores = torch.zeros(1, len(structure.tokenizer))
    scores[0, structure.impression[0]] = 10.0
    out = processor(ids, scores.clone())
    assert out[0].argmax() == structure.eos_id
    assert torch.isinf(out[0, structure.newline_ids]).all()


def test_the_impression_is_never_empty(structure):
    processor = ReportStructureProcessor(structure, max_new_tokens=100)
    ids = torch.tensor([structure.findings + [1234] + structure.impression])
    scores = torch.zeros(1, len(structure.tokenizer))
    scores[0, structure.eos_id] = 10.0
    out = processor(ids, scores.clone())
    assert out[0, structure.eos_id] == float("-inf")


def test_a_colon_after_a_header_word_is_banned(structure, tokenizer):
    processor = ReportStructureProcessor(structure, max_new_tokens=100)
    body = tokenizer(" normal. Impression", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([structure.findings + body])
    scores = torch.zeros(1, len(tokenizer))
    colon = tokenizer(":", add_special_tokens=False)["input_ids"][0]
    scores[0, colon] = 10.0
    assert processor(ids, scores.clone())[0, colon] == float("-inf")


def test_the_repetition_penalty_never_sees_the_headers(structure, tokenizer):
    penalty = OnBody(RepetitionPenaltyLogitsProcessor(2.0), structure)
    ids = torch.tensor([structure.findings + structure.impression])  # no body yet
    scores = torch.ones(1, len(tokenizer))
    out = penalty(ids, scores.clone())
    assert torch.equal(out, torch.ones(1, len(tokenizer)))


def test_the_ngram_ban_never_spans_the_two_sections(structure, tokenizer):
    """After "… disease. No focal airspace disease." the impression may open on " No" (the
    findings' "disease. No" banned it, and the impression read "Heart size and contour."),
    while a trigram written whole in the findings stays banned in the impression."""
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    findings = structure.findings + encode(" No effusion or disease. No focal disease.")
    no, focal = encode(" No")[0], encode(" focal")[0]
    for apart, banned in ((False, True), (True, False)):
        ban = OnBody(NoRepeatNGramLogitsProcessor(3), structure, apart=apart)
        out = ban(torch.tensor([findings + structure.impression]), torch.zeros(1, len(tokenizer)))
        assert (out[0, no] == float("-inf")) == banned
    ban = OnBody(NoRepeatNGramLogitsProcessor(3), structure, apart=True)
    ids = torch.tensor([findings + structure.impression + encode(" disease. No")])
    assert ban(ids, torch.zeros(1, len(tokenizer)))[0, focal] == float("-inf")
    # the sections' joint is no close: an impression ending as the findings did may close
    ids = torch.tensor([findings + structure.impression + encode(" Focal disease.")])
    out = ban(ids, torch.zeros(1, len(tokenizer)))
    assert torch.isfinite(out[0, structure.newline_ids]).all()
    assert structure.separator not in structure.newline_ids.tolist() + [structure.eos_id]


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sample"])
def test_every_strategy_writes_exactly_one_findings_and_one_impression(make_tiny_model, strategy):
    model = make_tiny_model("promptbook-wise").eval()
    torch.manual_seed(0)
    decoding = Decoding(strategy=strategy, max_new_tokens=40, num_beams=2)
    texts = model.generate(random_batch(3), decoding)
    for text in texts:
        assert well_formed(text), text
        sections = split_sections(text)
        assert sections.findings and sections.impression


def test_a_random_model_never_loops_with_the_ngram_ban(make_tiny_model):
    model = make_tiny_model("prompt-wise").eval()
    texts = model.generate(random_batch(4), Decoding(max_new_tokens=60, repetition_penalty=1.0))
    assert not any(has_loop(t) for t in texts)


def test_streaming_yields_the_same_report_as_generate(make_tiny_model):
    model = make_tiny_model("prompt-wise").eval()
    views = random_batch(1)
    decoding = Decoding(max_new_tokens=40)
    streamed = "".join(model.stream(views, decoding))
    assert streamed.startswith("FINDINGS:")
    assert streamed.strip() == model.generate(views, decoding)[0]


def test_a_section_cannot_close_before_its_first_word(structure):
    processor = ReportStructureProcessor(structure, max_new_tokens=100)
    scores = torch.zeros(1, len(structure.tokenizer))
    scores[0, structure.eos_id] = scores[0, structure.impression[0]] = 10.0
    for ids in (structure.findings, structure.findings + [1234] + structure.impression):
        out = processor(torch.tensor([ids]), scores.clone())
        assert out[0, structure.eos_id] == out[0, structure.impression[0]] == float("-inf")


def test_a_short_budget_still_leaves_room_for_the_impression(structure):
    processor = ReportStructureProcessor(structure, max_new_tokens=40)
    ids = structure.findings + [1234] * 25  # 29 of 40 tokens used: 11 left
    out = processor(torch.tensor([ids]), torch.zeros(1, len(structure.tokenizer)))
    assert (
        out[0].argmax() == structure.impression[0] and torch.isinf(out[0]).sum() == out.shape[1] - 1
    )


def test_the_llm_s_choices_are_skipped_only_where_every_token_is_forced(structure, tokenizer):
    from transformers import LogitsProcessorList

    from mrg.model.decoding import UnlessForced

    lead = tokenizer(" Cardiomegaly.", add_special_tokens=False)["input_ids"]
    shape = ReportStructureProcessor(structure, max_new_tokens=60, leads=[lead])
    calls = []
    spy = lambda ids, scores: calls.append(ids.shape[0]) or scores - 1.0
    chain = LogitsProcessorList([UnlessForced(LogitsProcessorList([spy]), shape), shape])
    scores = torch.randn(1, len(tokenizer))
    in_lead = torch.tensor([structure.findings + lead[:1]])  # the lead's second token is forced
    assert shape.forced(in_lead[0].tolist(), 0, 1) == lead[1]
    forced = chain(in_lead, scores.clone())
    assert calls == [] and int(forced.argmax()) == lead[1]
    free = torch.tensor([structure.findings + lead + [1234]])  # the LLM chooses after the lead
    assert shape.forced(free[0].tolist(), 0, 1) is None
    chosen = chain(free, scores.clone())
    assert calls == [1]
    assert torch.equal(chosen, shape(free, scores.clone() - 1.0))  # what the whole chain gives
    two = ReportStructureProcessor(structure, max_new_tokens=60, leads=[lead, []])
    chain = LogitsProcessorList([UnlessForced(LogitsProcessorList([spy]), two), two])
    both = torch.tensor([structure.findings + lead[:1], structure.findings + [1234]])
    chain(both, torch.randn(2, len(tokenizer)))  # the second study has no lead: all rows run
    assert calls == [1, 2]


def test_a_lead_at_the_end_closes_the_findings_the_llm_wrote(structure, tokenizer):
    lead = tokenizer(" Possible nodule.", add_special_tokens=False)["input_ids"]
    shape = ReportStructureProcessor(structure, max_new_tokens=100, leads=[lead], lead_at="end")
    scores = torch.zeros(1, len(tokenizer))
    scores[0, lead[0]] = 10.0
    first = shape(torch.tensor([structure.findings]), scores.clone())
    assert first[0, lead[0]] == float("-inf")  # the LLM begins its findings, not the lead
    free = structure.findings + tokenizer.encode(" The heart is normal.")
    assert shape.forced(free, 0, 1) is None
    closing = torch.zeros(1, len(tokenizer))
    closing[0, structure.eos_id] = 10.0  # the LLM would close its findings here
    out = shape(torch.tensor([free]), closing)
    assert out[0].argmax() == lead[0] and out[0, structure.impression[0]] == float("-inf")
    ids = free + lead[:1]
    while (token := shape.forced(ids, 0, 1)) is not None and token != structure.eos_id:
        ids.append(token)
    text = tokenizer.decode(ids)
    assert text == "FINDINGS: The heart is normal. Possible nodule.\nIMPRESSION: Possible nodule."
    # near the end of the budget the lead begins whatever the LLM says
    short = ReportStructureProcessor(structure, max_new_tokens=24, leads=[lead], lead_at="end")
    late = structure.findings + [1234] * 10
    assert short(torch.tensor([late]), torch.zeros(1, len(tokenizer)))[0].argmax() == lead[0]


def test_a_lead_after_the_heart_follows_its_sentence_and_the_llm_goes_on(structure, tokenizer):
    """A radiologist's order: "The heart is normal. Possible nodule. The lungs are otherwise
    clear." (at the end, "The lungs are otherwise clear." came before the nodule it excepts)."""
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    lead = encode(" Possible nodule.")
    shape = ReportStructureProcessor(structure, max_new_tokens=100, leads=[lead], lead_at="heart")
    assert shape.forced(structure.findings, 0, 1) is None  # the LLM opens its findings
    assert shape.forced(structure.findings + encode(" The heart is normal"), 0, 1) is None
    heart = structure.findings + encode(" The heart is normal.")
    assert shape.forced(heart, 0, 1) == lead[0]  # its sentence on the heart ends: the lead
    lungs_first = structure.findings + encode(" The lungs are clear.")
    assert shape.forced(lungs_first, 0, 1) is None  # not yet: the heart is unaddressed
    ids = heart + lead[:1]
    while (token := shape.forced(ids, 0, 1)) is not None:
        ids.append(token)
    assert ids == heart + lead  # the LLM goes on after the lead
    assert shape.own(ids + encode(" The lungs"), lead) == encode(" The heart is normal. The lungs")
    closing = torch.zeros(1, len(tokenizer))
    closing[0, structure.eos_id] = 10.0  # the LLM would close its findings here
    after = ids + encode(" The lungs are otherwise clear.")
    out = shape(torch.tensor([after]), closing.clone())
    assert out[0].argmax() == structure.impression[0]  # the impression, not the lead again
    ids = after + structure.impression[:1]
    while (token := shape.forced(ids, 0, 1)) is not None and token != structure.eos_id:
        ids.append(token)
    assert tokenizer.decode(ids).endswith("clear.\nIMPRESSION: Possible nodule.")
    # a lead that speaks for the heart opens the findings; one the LLM closes before its
    # heart is addressed comes at the close, as at the end
    cardiomegaly = encode(" Cardiomegaly.")
    first = ReportStructureProcessor(
        structure, max_new_tokens=100, leads=[cardiomegaly], lead_at="heart"
    )
    assert first.forced(structure.findings, 0, 1) == cardiomegaly[0]
    assert shape(torch.tensor([lungs_first]), closing.clone())[0].argmax() == lead[0]


def test_past_anatomy_words_the_findings_close_at_the_next_sentence_end(structure, tokenizer):
    """Left to the budget, one ran on to be cut mid-word ("… is normal without medi Pleural
    effusion.")."""
    shape = ReportStructureProcessor(structure, max_new_tokens=100, anatomy_words=12)
    wants_on = torch.zeros(1, len(tokenizer))
    (the,) = tokenizer.encode(" The")
    wants_on[0, the] = 10.0

    def next_token(findings: str) -> int:
        ids = torch.tensor([structure.findings + tokenizer.encode(findings)])
        return shape(ids, wants_on.clone())[0].argmax().item()

    long = " The heart is normal in size and appearance. The bones are normal."
    assert next_token(long) == structure.impression[0]
    assert next_token(long[:-1]) != structure.impression[0]  # not inside a sentence
    assert next_token(" The heart is normal. The lungs are clear.") == the  # 8 words: on


def test_the_findings_close_only_once_heart_lungs_and_pleura_are_addressed(structure, tokenizer):
    shape = ReportStructureProcessor(structure, max_new_tokens=100, anatomy_words=12)
    wants_to_close = torch.zeros(1, len(tokenizer))
    wants_to_close[0, structure.eos_id] = 10.0

    def closes(findings: str) -> bool:
        ids = torch.tensor([structure.findings + tokenizer.encode(findings)])
        return shape(ids, wants_to_close.clone())[0].argmax().item() == structure.impression[0]

    assert not closes(" The heart is normal. The lungs are clear.")  # the pleura is not
    assert closes(" The heart is normal. The lungs are clear. No pleural effusion.")
    # after anatomy_words words of the LLM's the findings may close anyway
    assert closes(" The heart is normal in size and appearance. The bones are normal. It is.")
    # nor before they name each finding the condition states absent, in any words
    absent = ReportStructureProcessor(
        structure, max_new_tokens=100, anatomy_words=20, absent=[["Consolidation"]]
    )
    addressed = " The heart is normal. The lungs are clear. No pleural effusion."
    header = structure.impression[0]
    ids = structure.findings + tokenizer.encode(addressed)
    assert absent(torch.tensor([ids]), wants_to_close.clone())[0].argmax() != header
    ids = structure.findings + tokenizer.encode(f"{addressed} No focal consolidation.")
    assert absent(torch.tensor([ids]), wants_to_close.clone())[0].argmax() == header
    off = ReportStructureProcessor(structure, max_new_tokens=100)
    ids = torch.tensor([structure.findings + tokenizer.encode(" The heart is normal.")])
    assert off(ids, wants_to_close.clone())[0].argmax() == structure.impression[0]


def test_a_lead_s_sentences_address_anatomy_too(structure, tokenizer):
    lead = tokenizer(" Pleural effusion.", add_special_tokens=False)["input_ids"]
    shape = ReportStructureProcessor(
        structure, max_new_tokens=100, leads=[lead], lead_at="end", anatomy_words=40
    )
    wants_to_close = torch.zeros(1, len(tokenizer))
    wants_to_close[0, structure.eos_id] = 10.0
    lungs_only = structure.findings + tokenizer.encode(" The lungs are clear.")
    heart_and_lungs = structure.findings + tokenizer.encode(
        " The heart is normal. The lungs are clear."
    )
    assert shape(torch.tensor([lungs_only]), wants_to_close.clone())[0].argmax() != lead[0]
    assert shape(torch.tensor([heart_and_lungs]), wants_to_close.clone())[0].argmax() == lead[0]


def test_near_the_end_of_the_budget_the_findings_close_at_a_sentence_end(structure, tokenizer):
    shape = ReportStructureProcessor(structure, max_new_tokens=64, reserve=16)
    llm_goes_on = torch.zeros(1, len(tokenizer))
    llm_goes_on[0, 1234] = 10.0
    # 2 · reserve tokens left: a finished sentence closes, a word on the way is finished first
    ended = structure.findings + tokenizer.encode(" The heart is normal." + " No" * 24 + ".")
    midword = ended[:-1] + tokenizer.encode(" nonspec")[:1]
    assert 16 < 64 - len(ended) - len(structure.impression) <= 32
    assert shape(torch.tensor([ended]), llm_goes_on.clone())[0].argmax() == structure.impression[0]
    assert shape(torch.tensor([midword]), llm_goes_on.clone())[0].argmax() == 1234


def test_the_close_bias_moves_the_close_only_where_a_section_may_close(structure, tokenizer):
    biased = ReportStructureProcessor(structure, max_new_tokens=100, close_bias=2.0)
    plain = ReportStructureProcessor(structure, max_new_tokens=100)
    scores = torch.zeros(1, len(tokenizer))
    header, eos = structure.impression[0], structure.eos_id

    def close(processor, ids: list[int], token: int) -> float:
        return processor(torch.tensor([ids]), scores.clone())[0, token].item()

    findings = structure.findings + tokenizer.encode(" The heart is normal.")
    assert close(biased, findings, header) == pytest.approx(close(plain, findings, header) + 2.0)
    impression = findings + structure.impression + tokenizer.encode(" No acute disease.")
    assert close(biased, impression, eos) == pytest.approx(close(plain, impression, eos) + 2.0)
    mid = findings + structure.impression + tokenizer.encode(" No acute")  # mid-sentence
    assert close(biased, mid, eos) == pytest.approx(close(plain, mid, eos))

"""The report phrasing model (word trigrams of training reports) and its fusion with the LLM."""

import math

import pytest
import torch
from conftest import random_batch

from mrg.config import Decoding
from mrg.model import MRGModel
from mrg.model.decoding import report_structure
from mrg.model.phrasing_fusion import PhrasingFusion
from mrg.text.phrasing import END, PHRASING_NAME, START, Phrasing, state

REPORTS = [
    (
        "FINDINGS: The heart is normal in size. The lungs are clear. No pleural effusion.\n"
        "IMPRESSION: No acute cardiopulmonary abnormality."
    ),
    (
        "FINDINGS: The heart is normal. The lungs are clear. No pneumothorax.\n"
        "IMPRESSION: No acute cardiopulmonary abnormality."
    ),
    (
        "FINDINGS: The heart is enlarged. The lungs are hyperinflated, clear.\n"
        "IMPRESSION: Cardiomegaly. No acute cardiopulmonary abnormalities."
    ),
]


@pytest.fixture(scope="module")
def phrasing():
    return Phrasing.from_reports(REPORTS)


def test_each_context_gives_a_distribution_over_the_next_token(phrasing):
    for context in [(START, START), ("lungs", "are"), ("are", "clear"), ("never", "seen")]:
        total = sum(phrasing.mass(context, w, whole=True) for w in phrasing.words)
        assert total == pytest.approx(1.0)
    heart = phrasing.mass(("is", "normal"), "in", whole=True)
    assert heart > phrasing.mass(("is", "normal"), "clear", whole=True)  # seen beats backoff
    assert phrasing.mass(("lungs", "are"), "c") == pytest.approx(
        phrasing.mass(("lungs", "are"), "clear", whole=True)
        + phrasing.mass(("lungs", "are"), "cardiomegaly", whole=True)
        + phrasing.mass(("lungs", "are"), "cardiopulmonary", whole=True)
    )  # a prefix's mass is its words'


def test_a_words_pieces_add_up_to_its_log_probability(phrasing):
    context = ("acute", "cardiopulmonary")
    pieces = phrasing.increment(context, "", " abnormal") + phrasing.increment(
        context, "abnormal", "ity."
    )
    whole = math.log(phrasing.mass(context, "abnormality", whole=True)) + math.log(
        phrasing.mass(("cardiopulmonary", "abnormality"), ".", whole=True)
    )
    assert pieces == pytest.approx(whole)
    assert phrasing.increment(context, "abnormal", "ity") > phrasing.increment(
        context, "abnormal", "ities"
    )  # the reports' singular
    closing = phrasing.increment(("no", "pneumothorax"), "", ".\n")
    assert closing == pytest.approx(
        math.log(phrasing.mass(("no", "pneumothorax"), ".", whole=True))
        + math.log(phrasing.mass(("pneumothorax", "."), END, whole=True))
    )


def test_state_reads_the_two_tokens_before_the_open_word(phrasing):
    assert state("The heart is normal. The lungs are cl") == (("lungs", "are"), "cl")
    assert state("The heart is normal.") == (("normal", "."), "")
    assert state("") == ((START, START), "")
    after = state("The heart is normal. The lungs are")
    assert phrasing.increment(*after, " clear") > phrasing.increment(*after, " hyperinflated")
    assert phrasing.increment(*after, " (") < phrasing.increment(*after, " hyperinflated")
    assert phrasing.increment(*after, "\x0b") < phrasing.increment(*after, " hyperinflated")


def test_the_phrasing_is_saved_and_loaded(phrasing, tmp_path):
    loaded = Phrasing.load(phrasing.save(tmp_path / PHRASING_NAME))
    assert loaded.trigrams == phrasing.trigrams and loaded.discount == phrasing.discount
    with pytest.raises(ValueError, match="discount"):
        Phrasing({"a b": {"c": 1}}, discount=0.0)  # unseen words would get no mass
    with pytest.raises(ValueError, match="counts"):
        Phrasing({})


def test_the_fusion_reorders_the_allowed_tokens_and_leaves_the_rest(phrasing, tokenizer):
    structure = report_structure(tokenizer, tokenizer.convert_tokens_to_ids("<|im_end|>"))
    fusion = PhrasingFusion(structure, phrasing, weight=1.0)
    ids = structure.findings + tokenizer.encode(" The heart is normal. The lungs are")
    clear, hyper = tokenizer.encode(" clear")[0], tokenizer.encode(" hyper")[0]
    scores = torch.full((1, len(tokenizer)), float("-inf"))
    scores[0, clear], scores[0, hyper] = 1.0, 1.5  # the LLM prefers "hyper…"
    out = fusion(torch.tensor([ids]), scores.clone())
    assert out[0].argmax() == clear and torch.isfinite(out[0]).sum() == 2
    forced = torch.full((1, len(tokenizer)), float("-inf"))
    forced[0, hyper] = 0.0  # one allowed token (forced): left alone
    assert torch.equal(fusion(torch.tensor([ids]), forced.clone()), forced)
    header = torch.zeros(1, len(tokenizer))  # inside the findings' header: left alone
    assert torch.equal(fusion(torch.tensor([structure.findings[:1]]), header.clone()), header)


def test_the_phrasing_travels_with_the_checkpoint_and_steers_decoding(make_tiny_model, tmp_path):
    model = make_tiny_model("prompt-wise").eval()
    model.report_vocabulary = frozenset(
        w for r in REPORTS for w in r.lower().split() if w.isalpha()
    )
    model.report_phrasing = Phrasing.from_reports(REPORTS)
    model.save_pretrained(tmp_path)
    loaded = MRGModel.from_pretrained(tmp_path, llm=model.llm, tokenizer=model.tokenizer).eval()
    assert loaded.report_phrasing.trigrams == model.report_phrasing.trigrams
    batch = random_batch()
    fused = loaded.generate(batch, Decoding(max_new_tokens=24))
    plain = loaded.generate(batch, Decoding(max_new_tokens=24, phrasing_weight=0.0))
    assert fused != plain  # a random LLM's words, reordered by the reports'
    with pytest.raises(ValueError, match="phrasing_weight"):
        Decoding(phrasing_weight=-1.0).validate()


def test_the_word_pairs_the_reports_never_wrote_are_never_written(phrasing, tokenizer):
    from mrg.model.closed_vocabulary import ClosedVocabulary
    from mrg.text.position import Position

    vocabulary = frozenset({"the", "heart", "is", "normal", "clear", "lungs", "are", "limits"})
    assert phrasing.pairs.unseen_after("is", vocabulary) == vocabulary - {"normal", "enlarged"}
    assert not phrasing.pairs.unseen_after("unseen", vocabulary)  # nothing known of it
    structure = report_structure(tokenizer, tokenizer.convert_tokens_to_ids("<|im_end|>"))
    closed = ClosedVocabulary(structure, vocabulary, pairs=phrasing.pairs)
    free = ClosedVocabulary(structure, vocabulary)
    after_is = Position(previous="is", sentence=frozenset({"the", "heart", "is"}), opening=False)
    assert closed.fits(" normal", after_is) and not closed.fits(" clear", after_is)
    assert free.fits(" clear", after_is)
    assert closed.fits(" clear", Position(open_word="are"))  # "are clear": seen
    assert closed.fits(" The")  # a sentence opens freely

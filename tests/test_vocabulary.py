"""The closed report vocabulary: what it keeps, how decoding holds to it, and that it travels
with the checkpoint."""

import pytest
import torch
from conftest import random_batch

from mrg.config import Decoding
from mrg.model import MRGModel
from mrg.model.decoding import ClosedVocabulary, report_structure
from mrg.text.sections import split_sections
from mrg.text.taxonomy import naming_words
from mrg.text.vocabulary import VOCABULARY_NAME, report_vocabulary, words

WORDS = frozenset({"the", "heart", "is", "normal", "no", "acute", "cardiomegaly", "effusion"})


@pytest.fixture
def closed(tokenizer):
    structure = report_structure(tokenizer, tokenizer.convert_tokens_to_ids("<|im_end|>"))
    return ClosedVocabulary(structure, WORDS)


def test_the_vocabulary_keeps_common_words_and_never_a_comparison_with_a_prior_study():
    texts = ["FINDINGS: The heart is stable. Unchanged effusion.\nIMPRESSION: Stable."] * 5
    kept = report_vocabulary(texts, min_count=5)
    assert {"the", "heart", "effusion"} <= kept
    assert not {"stable", "unchanged", "findings", "impression"} & kept
    assert report_vocabulary(texts[:4], min_count=5) == frozenset()


def test_a_word_may_be_begun_only_toward_a_vocabulary_word_and_ended_only_as_one(closed):
    assert closed.fits("", " heart")
    assert closed.fits("card", "iomeg")  # on the way to "cardiomegaly"
    assert not closed.fits("card", "iff")  # no word begins "cardiff"
    assert closed.fits("heart", ".") and not closed.fits("hear", ".")  # "hear" is no word here
    assert not closed.fits("", " 5")  # no digits: nothing measures a size
    assert not closed.fits("norm", "AL")  # no capital after a small letter
    assert closed.fits("", " Normal")  # a capital at the start of a word is fine


def test_after_the_findings_lead_no_word_names_them_again(closed):
    stated = naming_words(["Cardiomegaly", "Effusion"])
    assert stated == {"cardiomegaly", "effusion"}
    assert closed.fits("", " cardi") and not closed.fits("", " cardiomeg", stated)
    assert not closed.fits("", " effusion", stated) and closed.fits("", " heart", stated)


def test_the_processor_keeps_only_fitting_tokens(closed, tokenizer):
    scores = torch.zeros(1, len(tokenizer))
    heart, bad = tokenizer.encode(" heart")[0], tokenizer.encode(" rehab")[0]
    scores[0, heart], scores[0, bad] = 5.0, 9.0  # the likeliest token is no report word
    out = closed(torch.empty(1, 0, dtype=torch.long), scores.clone())
    assert out[0].argmax() == heart and torch.isinf(out[0, bad])


def test_the_vocabulary_is_saved_beside_the_weights_and_constrains_generation(
    make_tiny_model, tmp_path
):
    model = make_tiny_model("prompt-wise").eval()
    model.report_vocabulary = WORDS
    model.save_pretrained(tmp_path)
    assert (tmp_path / VOCABULARY_NAME).read_text().split() == sorted(WORDS)
    loaded = MRGModel.from_pretrained(tmp_path, llm=model.llm, tokenizer=model.tokenizer).eval()
    assert loaded.report_vocabulary == WORDS
    decoding = Decoding(max_new_tokens=24)
    for text in loaded.generate(random_batch(), decoding):  # a random LLM, held to 8 words
        assert set(finished_words(text)) <= WORDS, text
    open_text = loaded.generate(
        random_batch(), Decoding(max_new_tokens=24, closed_vocabulary=False)
    )
    assert any(not set(finished_words(t)) <= WORDS for t in open_text)  # the constraint worked


def finished_words(report: str) -> list[str]:
    """The words of each section but its last, which the token budget may have cut short (a
    random LLM never ends a section by itself)."""
    sections = split_sections(report)
    return [w for text in (sections.findings, sections.impression) for w in words(text)[:-1]]

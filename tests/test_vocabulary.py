"""The closed report vocabulary: what it keeps, how decoding holds to it, and that it travels
with the checkpoint."""

import pytest
import torch
from conftest import random_batch

from mrg.config import Decoding
from mrg.model import MRGModel
from mrg.model.closed_vocabulary import ClosedVocabulary, Rules
from mrg.model.decoding import report_structure
from mrg.text.position import Position
from mrg.text.sections import split_sections
from mrg.text.states import naming_prefixes
from mrg.text.vocabulary import VOCABULARY_NAME, report_vocabulary, words

WORDS = frozenset({"the", "heart", "is", "normal", "no", "acute", "cardiomegaly", "effusion"})


@pytest.fixture
def closed(tokenizer):
    structure = report_structure(tokenizer, tokenizer.convert_tokens_to_ids("<|im_end|>"))
    return ClosedVocabulary(structure, WORDS)


def test_decoding_never_writes_a_comparison_with_a_prior_study(tokenizer):
    structure = report_structure(tokenizer, tokenizer.convert_tokens_to_ids("<|im_end|>"))
    closed = ClosedVocabulary(structure, WORDS | {"improved", "remains", "clear"})
    assert closed.fits(" clear") and not closed.fits(" improved") and not closed.fits(" remains")


def test_the_vocabulary_keeps_common_words_and_never_a_comparison_with_a_prior_study():
    texts = ["FINDINGS: The heart is stable. Unchanged effusion.\nIMPRESSION: Stable."] * 5
    kept = report_vocabulary(texts, min_count=5)
    assert {"the", "heart", "effusion"} <= kept
    assert not {"stable", "unchanged", "findings", "impression"} & kept
    assert report_vocabulary(texts[:4], min_count=5) == frozenset()


def test_a_word_may_be_begun_only_toward_a_vocabulary_word_and_ended_only_as_one(closed):
    assert closed.fits(" heart")
    assert closed.fits("iomeg", Position(open_word="card"))  # on the way to "cardiomegaly"
    assert not closed.fits("iff", Position(open_word="card"))  # no word begins "cardiff"
    assert closed.fits(".", Position(open_word="heart"))
    assert not closed.fits(".", Position(open_word="hear"))  # "hear" is no word here
    assert not closed.fits(" 5")  # no digits: nothing measures a size
    assert not closed.fits("AL", Position(open_word="norm"))  # no capital after a small letter
    assert closed.fits(" Normal")  # a capital where a sentence opens is fine
    assert not closed.fits(
        " Normal", Position(previous="is", sentence=frozenset({"is"}), opening=False)
    )
    assert not closed.fits(" normal Acute")  # "No Acute cardiopulmonary"
    inside = Position(previous="is", sentence=frozenset({"is"}), opening=False)
    assert not closed.fits(" B", inside)  # no capital that no abbreviation begins with
    abbreviations = ClosedVocabulary(closed.structure, WORDS | {"ap"})
    assert abbreviations.fits(" AP.", inside) and not abbreviations.fits(" Ap", inside)
    assert abbreviations.fits(" A", inside) and not closed.fits(" A", inside)  # toward "AP"
    assert not closed.fits(" NORMAL") and not closed.fits("AL", Position(open_word="NORM"))
    assert not closed.fits("al", Position(open_word="NORM"))  # nor capitals, then small letters
    assert not closed.fits(" normal.The") and not closed.fits("The", Position(glued=True))
    assert closed.fits(" normal. The") and not closed.fits(":")  # no header of its own
    assert not closed.fits("é", Position(open_word="normal"))  # no letter outside ASCII
    assert not closed.fits(" ", Position(open_word="normal"))  # no lone or double space
    assert not closed.fits("  heart") and closed.fits("\n", Position(open_word="normal"))


def test_after_the_findings_lead_no_word_names_them_again(closed):
    stated = naming_prefixes(["Cardiomegaly", "Effusion"])
    assert {"cardiomegal", "effusion", "large"} <= stated
    rules = Rules(stated=stated)
    assert closed.fits(" cardi") and not closed.fits(" cardiomeg", rules=rules)
    assert not closed.fits(" effusion", rules=rules) and closed.fits(" heart", rules=rules)
    wider = ClosedVocabulary(closed.structure, WORDS | {"large"})
    assert wider.fits(" large") and not wider.fits(" large", rules=rules)  # "The heart is large."


def test_a_finding_not_stated_present_or_possible_is_named_only_to_negate_it(closed, tokenizer):
    from mrg.text.position import position
    from mrg.text.states import unstated_prefixes

    rules = Rules(unstated=unstated_prefixes({"Effusion": "absent", "Edema": "possible"}))
    assert "effusion" in rules.unstated and "cardiomegal" in rules.unstated
    assert not any(p.startswith("edema") for p in rules.unstated)
    assert not closed.fits(" effusion", rules=rules)  # "Effusion." would affirm it
    assert closed.fits(" effusion", Position(negated=True), rules)  # "No effusion."
    assert closed.fits(" no effusion", rules=rules)  # the negation within the same piece
    pieces = closed.structure.pieces
    at = position(pieces, tokenizer.encode(" The heart is normal. No acute"))
    assert (at.previous, at.negated, at.open_word) == ("no", True, "acute")
    assert at.sentence == {"no"}  # the sentence so far, "The heart is normal." ended
    assert not position(pieces, tokenizer.encode(" No effusion. The")).negated  # a new sentence


def test_a_section_names_a_finding_once_and_a_large_heart_only_where_stated(closed, tokenizer):
    from mrg.text.position import position
    from mrg.text.states import unstated_prefixes

    pieces = closed.structure.pieces
    twice = position(pieces, tokenizer.encode(" No effusion or"))
    assert "effusion" in twice.sentence and not closed.fits(" effusion", twice)
    again = position(pieces, tokenizer.encode(" No effusion. The heart is normal. No"))
    assert again.named == {"effusion"} and not closed.fits(" effusion", again)  # "No effusion."
    impression = position(pieces, tokenizer.encode(" No effusion.\nIMPRESSION: No"))
    assert not impression.named and closed.fits(" effusion", impression)  # a new section
    assert not closed.fits(" no effusion or effusion")  # within one piece too
    unstated = Rules(unstated=unstated_prefixes({}))  # "The heart is large." names cardiomegaly
    large = ClosedVocabulary(closed.structure, WORDS | {"large"})
    assert not large.fits(" large", rules=unstated) and large.fits(" large")


def test_a_section_describes_each_part_once(closed, tokenizer):
    from mrg.text.position import position

    pieces = closed.structure.pieces
    heart = position(pieces, tokenizer.encode(" The heart is normal. The"))
    assert heart.subject and heart.described == {"heart"}
    assert not closed.fits(" heart", heart) and closed.fits(" acute", heart)
    assert not closed.fits(" Heart", position(pieces, tokenizer.encode(" The heart is normal.")))
    later = position(pieces, tokenizer.encode(" The heart is normal. No"))
    assert closed.fits(" heart", later)  # "No heart…": not the subject, free
    spoken = Rules(subjects=frozenset({"heart"}))  # a cardiomegaly's sentence speaks for it
    assert not closed.fits(
        " heart", Position(previous="the", sentence=frozenset({"the"}), opening=False), spoken
    )
    assert closed.fits(" No", Position(), spoken)
    lungs = ClosedVocabulary(closed.structure, WORDS | {"lungs", "lung", "right", "clear"})
    right = position(pieces, tokenizer.encode(" The lungs are clear. The right"))
    assert right.subject and not lungs.fits(" lung", right)  # "The right lung is normal."
    assert lungs.fits(
        " lung", position(pieces, tokenizer.encode(" The heart is normal. The right"))
    )


def test_once_consolidation_or_infiltrates_are_named_no_sentence_says_it_again(closed, tokenizer):
    from mrg.text.position import position

    extra = {"consolidation", "focal", "airspace", "infiltrates"}
    words = ClosedVocabulary(closed.structure, WORDS | extra)
    pieces = closed.structure.pieces
    after = position(pieces, tokenizer.encode(" No focal consolidation. No focal"))
    assert not words.fits(" airspace", after)  # "No evidence of focal airspace disease."
    after = position(pieces, tokenizer.encode(" No focal infiltrates. No focal"))
    assert not words.fits(" airspace", after)  # nor after infiltrates
    lead = Rules(stated=frozenset({"infiltrat"}))  # "Possible infiltrate." closes the findings
    assert not words.fits(" airspace", position(pieces, tokenizer.encode(" No focal")), lead)
    assert words.fits(" airspace", position(pieces, tokenizer.encode(" The heart is normal. No")))


def test_the_processor_keeps_only_fitting_tokens(closed, tokenizer):
    scores = torch.zeros(1, len(tokenizer))
    heart, bad = tokenizer.encode(" heart")[0], tokenizer.encode(" rehab")[0]
    scores[0, heart], scores[0, bad] = 5.0, 9.0  # the likeliest token is no report word
    out = closed(torch.empty(1, 0, dtype=torch.long), scores.clone())
    assert out[0].argmax() == heart and torch.isinf(out[0, bad])


def test_a_row_whose_next_token_is_forced_is_left_as_it_is(closed, tokenizer):
    """The structure overwrites a forced row after: no search there (a lead's word fits none of
    the rules that follow it, and every token was searched)."""
    scores = torch.zeros(2, len(tokenizer))
    bad = tokenizer.encode(" rehab")[0]
    scores[:, bad] = 9.0
    forced_first = ClosedVocabulary(
        closed.structure, WORDS, forced=lambda ids, row, rows: 0 if row == 0 else None
    )
    out = forced_first(torch.empty(2, 0, dtype=torch.long), scores.clone())
    assert torch.equal(out[0], scores[0]) and torch.isinf(out[1, bad])


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


def test_the_word_being_built_is_read_back_to_its_first_letter_however_many_tokens_it_spans(
    closed, tokenizer
):
    from mrg.text.position import position

    pieces = closed.structure.pieces
    ids = tokenizer.encode(" No acute cardiomediastinalmallostenokarboxolakemalosteno")
    assert len(ids) > 16  # more than the 16 tokens the check once looked back on
    at = position(pieces, ids)
    assert (
        at.previous == "acute" and at.open_word == "cardiomediastinalmallostenokarboxolakemalosteno"
    )
    assert not closed.fits("y", at)  # no vocabulary word begins with it
    assert position(pieces, tokenizer.encode(" No acute. Card")) == Position(open_word="Card")
    from mrg.text.states import normal_anatomy

    rules = Rules(normal=normal_anatomy({"Cardiomegaly": "possible"}))
    heart = position(pieces, tokenizer.encode(" The heart is"))
    assert not closed.fits(" normal", heart, rules) and closed.fits(" normal", heart)
    assert closed.fits(" normal", position(pieces, tokenizer.encode(" The heart. It is")), rules)


def test_beside_a_present_or_possible_finding_no_global_normal_statement_is_begun(closed):
    from mrg.text.states import global_normal_bigrams

    rules = Rules(bigrams=global_normal_bigrams({"Effusion": "present"}))
    assert global_normal_bigrams({"Effusion": "possible"}) == rules.bigrams  # a hedge too
    assert global_normal_bigrams({"Effusion": "absent"}) == frozenset()
    assert not closed.fits(" acute", Position(previous="no"), rules)  # "No acute cardiac."
    assert closed.fits(" acute", Position(previous="no"))  # fine where nothing is named
    words = frozenset(WORDS | {"cardiopulmonary", "abnormality", "pulmonary"})
    closed = ClosedVocabulary(closed.structure, words)
    assert not closed.fits(" cardiopulmonary", Position(previous="acute"), rules)
    within = Position(previous="the", open_word="acute", opening=False)  # within one piece
    assert not closed.fits(" cardiop", within, rules)
    assert closed.fits(" cardiom", within, rules)  # on the way to cardiomegaly
    assert closed.fits(" pulmonary", Position(previous="acute"), rules)
    assert closed.fits(" cardiopulmonary", Position(previous="acute"))  # no finding present


def test_the_findings_describe_and_the_impression_concludes(closed, tokenizer):
    """ "No acute cardiopulmonary abnormality." is the impression's, whatever the states: at the
    end of the findings it left the impression "No active disease."."""
    structure = closed.structure
    (acute,) = tokenizer.encode(" acute")
    body = tokenizer.encode(" The heart is normal. No")

    def chosen(ids):
        scores = torch.zeros(1, len(tokenizer))
        scores[0, acute] = 9.0
        return closed(torch.tensor([ids]), scores)[0].argmax().item()

    assert chosen(structure.findings + body) != acute
    assert chosen(structure.findings + body[:-1] + structure.impression + body[-1:]) == acute


def test_where_no_likely_token_fits_any_fitting_token_is_taken(closed, tokenizer):
    narrow = ClosedVocabulary(closed.structure, WORDS, top_k=1, wider_k=2)
    scores = torch.full((1, len(tokenizer)), float("-inf"))
    rehab, five, heart = (tokenizer.encode(t)[0] for t in (" rehab", " hello", " heart"))
    scores[0, rehab], scores[0, five], scores[0, heart] = 9.0, 8.0, -20.0
    out = narrow(torch.tensor([tokenizer.encode(" The")]), scores.clone())
    assert out[0].argmax() == heart and torch.isinf(out[0, rehab]) and torch.isinf(out[0, five])


def test_where_no_token_fits_the_rules_one_that_fits_the_vocabulary_is_taken(closed, tokenizer):
    """A row is never left unmasked: " The hear" can only become "heart", which the rules ban."""
    banned = ClosedVocabulary(closed.structure, WORDS, rules=[Rules(stated=frozenset({"heart"}))])
    ids = tokenizer.encode(" The hear")
    out = banned(torch.tensor([ids]), torch.zeros(1, len(tokenizer)))
    kept = [tokenizer.decode([t]) for t in torch.isfinite(out[0]).nonzero().flatten().tolist()]
    assert kept and all(("hear" + k).lower().startswith("heart") for k in kept), kept


def test_no_hyphen_joins_two_words(closed):
    assert not closed.fits("-", Position(open_word="heart"))  # "heart-normal"
    assert not closed.fits(" heart-normal")
    assert closed.fits(" heart.") and closed.fits(".", Position(open_word="heart"))


def test_otherwise_lets_a_sentence_call_the_rest_of_an_anatomy_normal(closed, tokenizer):
    from mrg.text.position import position
    from mrg.text.states import normal_anatomy

    words = frozenset(WORDS | {"lungs", "are", "clear", "otherwise", "pleural"})
    closed = ClosedVocabulary(closed.structure, words, [Rules()])
    rules = Rules(normal=normal_anatomy({"Infiltration": "possible", "Effusion": "present"}))
    pieces = closed.structure.pieces
    lungs = position(pieces, tokenizer.encode(" The lungs are"))
    assert not closed.fits(" clear", lungs, rules)  # beside an infiltrate
    excepted = position(pieces, tokenizer.encode(" The lungs are otherwise"))
    assert closed.fits(" clear", excepted, rules)
    pleura = position(pieces, tokenizer.encode(" The pleural space is otherwise"))
    assert not closed.fits(" clear", pleura, rules)  # beside an effusion: no "rest"
    # where the LLM's first choice calls the anatomy normal, "otherwise" comes first
    clear = tokenizer.encode(" clear")[0]
    scores = torch.zeros(len(tokenizer))
    scores[clear] = 5.0
    assert closed._excepting(scores, [], lungs, rules) == [closed.excepting]
    heart = Rules(normal=normal_anatomy({"Cardiomegaly": "possible"}))
    size = position(pieces, tokenizer.encode(" The heart is"))
    assert closed._excepting(scores, [], size, heart) == []  # not "otherwise normal"
    assert tokenizer.decode([closed.excepting]) == " otherwise"
    are = tokenizer.encode(" are")[0]
    scores[are] = 9.0  # a first choice the rules allow is kept as it is
    assert closed._excepting(scores, [are], lungs, rules) == [are]


def test_impression_is_a_header_never_a_word_of_the_body(closed):
    assert not closed.fits(" Impression") and not closed.fits(" impression.")
    assert closed.fits(" findings.")  # "No acute findings."


def test_no_word_is_written_twice_in_a_row(closed):
    after = Position(previous="normal", sentence=frozenset({"is", "normal"}), opening=False)
    assert not closed.fits(" normal", after)  # "otherwise otherwise", "pleural pleural"
    assert not closed.fits(" normal.", after) and not closed.fits(" normal normal.")
    assert closed.fits(" the", after) and closed.fits(". Normal", after)  # a new sentence may
    heart = Position(previous="heart", sentence=frozenset({"heart"}), opening=False)
    assert not closed.fits(" hear", heart)  # a dead end: "hear…" could only become "heart"
    longer = ClosedVocabulary(closed.structure, WORDS | {"normally"})
    assert longer.fits(" normal", after)  # on the way to "normally"
    assert not longer.fits(".", Position(previous="normal", open_word="normal", opening=False))
    assert longer.fits("ly.", Position(previous="normal", open_word="normal", opening=False))


def test_between_words_only_report_punctuation_and_a_compound_half_before_its_other(
    closed, tokenizer
):
    from mrg.text.position import position

    wider = ClosedVocabulary(closed.structure, WORDS | {"cardio", "mediastinal", "pulmonary"})
    is_no = position(closed.structure.pieces, tokenizer.encode(" The heart is no"))
    assert not wider.fits(" acute", is_no) and wider.fits("rmal", is_no)  # "is no" only in
    there = position(closed.structure.pieces, tokenizer.encode(" There is no"))
    assert wider.fits(" acute", there)  # "There is no acute…"
    assert not wider.fits("_", Position(open_word="cardio"))  # "cardio_mediastinal"
    assert not wider.fits("\t", Position(open_word="normal")) and wider.fits(",")
    after = Position(previous="cardio", sentence=frozenset({"the", "cardio"}), opening=False)
    assert wider.fits(" mediastinal", after) and not wider.fits(" pulmonary", after)
    assert wider.fits(" pulmonary", Position(previous="the", opening=False))
    assert not wider.fits(".", Position(open_word="cardio"))  # "No acute cardio."
    assert not wider.fits(".", Position(glued=True)) and wider.fits("\n", Position(glued=True))
    assert not wider.fits("..", Position(open_word="normal")) and wider.fits(".")  # one token
    assert not wider.fits(". .", Position(open_word="normal")) and not wider.fits(".,")

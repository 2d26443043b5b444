"""Once the heart, lungs and pleura are addressed, the mediastinum and the bones are described,
and then the findings close."""

import pytest
import torch
from conftest import tiny_model_config

from mrg.config import Decoding
from mrg.model.decoding import ReportStructureProcessor, report_structure
from mrg.model.normal_anatomy import OPENERS, NormalAnatomy

ESSENTIALS = " The heart is normal. The lungs are clear. No pleural effusion."


@pytest.fixture
def structure(tokenizer):
    return report_structure(tokenizer, tokenizer.convert_tokens_to_ids("<|im_end|>"))


def ids(structure, tokenizer, findings: str) -> list[int]:
    return structure.findings + tokenizer.encode(findings)


def test_the_findings_close_once_every_part_is_described_and_then_must(structure, tokenizer):
    shape = ReportStructureProcessor(
        structure, max_new_tokens=100, anatomy_words=40, parts=tuple(OPENERS)
    )
    wants_on = torch.zeros(1, len(tokenizer))
    (the,) = tokenizer.encode(" The")
    wants_on[0, the] = 10.0

    def next_token(findings: str) -> int:
        row = torch.tensor([ids(structure, tokenizer, findings)])
        return shape(row, wants_on.clone())[0].argmax().item()

    assert shape.undescribed(ESSENTIALS) == ["mediastinum", "bones"]
    assert next_token(ESSENTIALS) == the  # the mediastinum and the bones are left
    mediastinum = f"{ESSENTIALS} The mediastinum is unremarkable."
    assert shape.undescribed(mediastinum) == ["bones"]
    assert next_token(mediastinum) == the
    # described in the LLM's own words, the chest is whole: the findings close, though the
    # LLM would go on
    whole = f"{mediastinum} The thoracic spine is normal."
    assert next_token(whole) == structure.impression[0]
    # without parts, the LLM's wish goes on
    plain = ReportStructureProcessor(structure, max_new_tokens=100, anatomy_words=40)
    assert (
        plain(torch.tensor([ids(structure, tokenizer, whole)]), wants_on.clone())[0].argmax() == the
    )


def test_the_next_sentence_opens_the_next_part_and_its_opener_is_favoured(structure, tokenizer):
    """Once the findings are otherwise complete, the next sentence opens the first part left:
    where the LLM preferred another negation, it wrote "No focal areas of pulmonary edema."."""
    shape = ReportStructureProcessor(
        structure, max_new_tokens=100, anatomy_words=40, parts=tuple(OPENERS)
    )
    anatomy = NormalAnatomy(shape, bias=5.0)
    mediastinum = tokenizer(f" {OPENERS['mediastinum']}", add_special_tokens=False)["input_ids"]
    bones = tokenizer(f" {OPENERS['bones']}", add_special_tokens=False)["input_ids"]
    (no,) = tokenizer.encode(" No")

    def scores(findings: str) -> torch.Tensor:
        base = torch.full((1, len(tokenizer)), -20.0)
        base[0, structure.eos_id] = 3.0  # the LLM would close,
        base[0, no] = 4.0  # or rather negate once more
        return anatomy(torch.tensor([ids(structure, tokenizer, findings)]), base)[0]

    at_start = scores(ESSENTIALS)
    # the first token of the mediastinum's opener takes the row's whole probability
    assert at_start.argmax() == mediastinum[0]
    assert torch.isinf(at_start).sum() == len(tokenizer) - 1
    assert at_start[mediastinum[0]] == pytest.approx(
        float(torch.logaddexp(*torch.tensor([3.0, 4.0]))), abs=1e-2
    )
    within = scores(f"{ESSENTIALS}{tokenizer.decode(mediastinum[:2])}")
    assert within[mediastinum[2]] == -15.0  # its next token: the bias
    then = scores(f"{ESSENTIALS} The mediastinum is unremarkable.{tokenizer.decode(bones[:1])}")
    assert then[bones[1]] == -15.0  # the next part: the bones
    untouched = lambda findings: (scores(findings) != -20).sum() == 2  # the close and " No"
    assert untouched(" The heart is normal. The lungs are clear.")  # the pleura is left
    assert untouched(f"{ESSENTIALS} There is")  # the LLM left the opener
    assert untouched(f"{ESSENTIALS} The mediastinum is normal. The bones are intact.")


def test_an_opener_is_followed_to_its_end_though_its_words_describe_the_part(structure, tokenizer):
    """ "bony" describes the bones: read on the sentence so far, the bias stopped there (the
    LLM wrote "The bony abnormalities are within normal limits." after "The bony")."""
    shape = ReportStructureProcessor(
        structure, max_new_tokens=100, anatomy_words=40, parts=tuple(OPENERS)
    )
    anatomy = NormalAnatomy(shape, bias=5.0)
    bones = tokenizer(f" {OPENERS['bones']}", add_special_tokens=False)["input_ids"]
    said = f"{ESSENTIALS} The mediastinum is unremarkable."
    for k in range(1, len(bones)):
        row = torch.tensor([structure.findings + tokenizer.encode(said) + bones[:k]])
        assert anatomy(row, torch.zeros(1, len(tokenizer)))[0, bones[k]] == 5.0


def test_the_model_decodes_with_the_parts_and_without_them_when_off(tiny_llm, tokenizer):
    from mrg.model import MRGModel

    model = MRGModel(tiny_model_config("prompt-wise"), tiny_llm, tokenizer).eval()

    def built(decoding: Decoding) -> tuple[set[str], tuple[str, ...]]:
        choosing, shape = model.processors(decoding)
        return {type(p).__name__ for p in choosing.processors}, shape.parts

    kinds, parts = built(Decoding())
    assert "NormalAnatomy" in kinds and parts == tuple(OPENERS)
    # before the closed vocabulary and top-p, which keep the LLM's top tokens only: after
    # them, the opener's next token was gone before its bias ("The mediastinum is
    # unremarkable. The aorta is a small right upper lobe.")
    model.report_vocabulary = frozenset({"the", "heart", "is", "normal"})
    order = [type(p).__name__ for p in model.processors(Decoding(strategy="sample"))[0].processors]
    for later in ("TopPLogitsWarper", "ClosedVocabulary"):
        assert order.index("NormalAnatomy") < order.index(later)
    for off in (Decoding(describe_bias=0.0), Decoding(anatomy_words=0)):
        kinds, parts = built(off)
        assert "NormalAnatomy" not in kinds and parts == ()
    with pytest.raises(ValueError, match="describe_bias"):
        Decoding(describe_bias=-1.0).validate()


def test_the_closed_vocabulary_keeps_the_openers_token_that_its_rules_ban(structure, tokenizer):
    """The bones' opener is "No acute bony" (OpenI's most frequent bones sentence, "No acute
    bony abnormality."), and the findings write "No acute" nowhere else: the closed vocabulary
    keeps the token the opener favours, and only where it favours it."""
    from mrg.model.closed_vocabulary import ClosedVocabulary

    shape = ReportStructureProcessor(
        structure, max_new_tokens=100, anatomy_words=40, parts=tuple(OPENERS)
    )
    anatomy = NormalAnatomy(shape, bias=5.0)
    words = frozenset(
        [
            "the",
            "heart",
            "is",
            "normal",
            "lungs",
            "are",
            "clear",
            "no",
            "pleural",
            "effusion",
            "mediastinum",
            "unremarkable",
            "acute",
            "bony",
            "abnormality",
            "cardiopulmonary",
        ]
    )
    opened = ClosedVocabulary(structure, words, forced=shape.forced, opening=anatomy.next)
    plain = ClosedVocabulary(structure, words, forced=shape.forced)
    (acute,) = tokenizer.encode(" acute")

    def kept(closed: ClosedVocabulary, findings: str) -> bool:
        row = torch.tensor([ids(structure, tokenizer, findings)])
        return bool(torch.isfinite(closed(row, torch.zeros(1, len(tokenizer)))[0, acute]))

    ready = f"{ESSENTIALS} The mediastinum is unremarkable. No"
    assert anatomy.next(ids(structure, tokenizer, ready), 0, 1) == acute
    assert kept(opened, ready) and not kept(plain, ready)
    # the LLM's own "No acute" before the findings are complete stays banned
    assert not kept(opened, " The heart is normal. No")
    assert anatomy.next(ids(structure, tokenizer, " The heart is normal. No"), 0, 1) is None


def test_after_a_lead_the_next_sentence_opens_the_lungs(structure, tokenizer):
    """After the heart and the findings' sentences, "The lungs are otherwise clear." (the LLM
    negated in lists instead: "No focal lung mass.")."""
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    lead = encode(" Possible infiltrate.")
    shape = ReportStructureProcessor(
        structure,
        max_new_tokens=100,
        leads=[lead],
        lead_at="heart",
        anatomy_words=40,
        parts=tuple(OPENERS),
    )
    anatomy = NormalAnatomy(shape, bias=5.0)
    lungs = encode(" The lungs are")
    heart = ids(structure, tokenizer, " The heart is normal.") + lead
    assert anatomy.favoured(heart, 0, 1) == (tuple(lungs), 0)
    assert anatomy.next(heart + lungs[:1], 0, 1) == lungs[1]
    # not before the lead, and not once the LLM's own words describe the lungs
    assert anatomy.favoured(heart[: -len(lead)], 0, 1) == ((), 0)
    described = heart + encode(" The lungs are otherwise clear.")
    assert anatomy.favoured(described, 0, 1) == ((), 0)
    # a lead at the end: no lungs opener
    end = ReportStructureProcessor(
        structure, max_new_tokens=100, leads=[lead], lead_at="end", parts=tuple(OPENERS)
    )
    assert "lungs" not in NormalAnatomy(end, bias=5.0).openers


def test_a_lead_at_the_start_opens_no_part_before_the_llm_s_first_sentence(structure, tokenizer):
    lead = tokenizer(" Cardiomegaly. Pulmonary edema. Pleural effusion.", add_special_tokens=False)[
        "input_ids"
    ]
    shape = ReportStructureProcessor(
        structure, max_new_tokens=100, leads=[lead], anatomy_words=40, parts=tuple(OPENERS)
    )
    anatomy = NormalAnatomy(shape, bias=5.0)
    assert shape.essential(tokenizer.decode(lead))  # the lead alone addresses all three
    assert anatomy.favoured(structure.findings + lead, 0, 1) == ((), 0)
    first = structure.findings + lead + tokenizer.encode(" The aorta is normal.")
    mediastinum = tokenizer(f" {OPENERS['mediastinum']}", add_special_tokens=False)["input_ids"]
    assert anatomy.next(first, 0, 1) == mediastinum[0]

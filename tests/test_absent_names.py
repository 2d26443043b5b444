"""After a negation, the names of the findings the condition states absent are favoured."""

import pytest
import torch
from conftest import tiny_model_config

from mrg.config import Decoding
from mrg.model.absent_names import AbsentNames
from mrg.model.decoding import report_structure
from mrg.text.states import state_vector


@pytest.fixture
def structure(tokenizer):
    return report_structure(tokenizer, tokenizer.convert_tokens_to_ids("<|im_end|>"))


def first(tokenizer, text: str) -> int:
    return tokenizer(text, add_special_tokens=False)["input_ids"][0]


def test_after_a_negation_cue_the_absent_findings_not_yet_named_are_favoured(structure, tokenizer):
    names = AbsentNames(structure, [["Effusion", "Pneumothorax"]], bias=6.0)
    effusion, pneumothorax = first(tokenizer, " pleural"), first(tokenizer, " pneumothorax")
    consolidation = first(tokenizer, " consolidation")

    def favoured(findings: str, impression: str | None = None, absent=None) -> set[int]:
        ids = structure.findings + tokenizer.encode(findings)
        if impression is not None:
            ids += structure.impression + tokenizer.encode(impression)
        return set(names.favoured(ids, absent or ["Effusion", "Pneumothorax"]))

    # the first not yet named, in ChestX-ray14 order: "No pleural effusion or pneumothorax."
    # (380 OpenI reports; "No pneumothorax or pleural effusion.": 303)
    assert favoured(" The heart is normal. There is no") == {effusion}
    assert favoured(" The lungs are free of") == {effusion}  # "free" negates
    assert favoured(" No pleural effusion or") == {pneumothorax}  # named once is enough
    assert favoured(" Pneumothorax is absent. There is no") == {effusion}  # in any words
    assert favoured(" The pleural space is") == set()  # no negation cue
    joiner = first(tokenizer, " or")
    assert favoured(" There is no pneumothorax") == {joiner}  # the list goes on with "or"
    assert favoured(" There is no pleural effusion or pneumothorax") == set()  # all named
    assert favoured(" The pneumothorax") == set()  # not negated
    lungs_and_pleura = ["Effusion", "Consolidation"]
    assert favoured(" There is no", absent=lungs_and_pleura) == {effusion}
    assert favoured(" The pleural space is free of", absent=lungs_and_pleura) == {effusion}
    assert favoured(" The heart is normal and") == set()  # a cue, but nothing negated
    assert favoured(" There is no focal", absent=lungs_and_pleura) == {consolidation}
    assert favoured(" No focal airspace", absent=lungs_and_pleura) == {consolidation}
    assert favoured(" There is no", absent=["Atelectasis"]) == set()  # " at" is a word
    assert favoured(" Normal.", impression=" No") == set()  # the impression is left alone
    rows = [structure.findings + tokenizer.encode(t) for t in (" There is no", " The heart is")]
    assert len(rows[0]) == len(rows[1])
    two = AbsentNames(structure, [["Pneumothorax"], ["Pneumothorax"]], bias=6.0)
    out = two(torch.tensor(rows), torch.zeros(2, len(tokenizer)))  # only the first negates
    assert out[0, pneumothorax] == 6.0 and out[0].sum() == 6.0 and out[1].sum() == 0.0


def test_a_states_model_decodes_with_the_bias_and_without_it_when_off(tiny_llm, tokenizer):
    from mrg.model import MRGModel

    config = tiny_model_config("prompt-wise")
    config.customizer.conditioning, config.findings_prompt = "visual+states", "states"
    model = MRGModel(config, tiny_llm, tokenizer).eval()
    states = torch.tensor([state_vector({"Effusion": "absent", "Nodule": "possible"})])

    def kinds(decoding: Decoding) -> set[str]:
        return {type(p).__name__ for p in model.processors(decoding, states)[0].processors}

    assert "AbsentNames" in kinds(Decoding())
    assert "AbsentNames" not in kinds(Decoding(absent_bias=0.0))
    with pytest.raises(ValueError, match="absent_bias"):
        Decoding(absent_bias=-1.0).validate()


def test_once_the_lungs_are_described_sentences_open_on_the_negations(structure, tokenizer):
    """A radiologist's order: heart, lungs, then what is absent, before the aorta and the spine
    (after them the findings ran on to their word cap, and the cap cut the negations)."""
    names = AbsentNames(structure, [["Effusion"]], bias=6.0)
    negation = first(tokenizer, " No")

    def favoured(findings: str, absent=("Effusion",)) -> set[int]:
        return set(names.favoured(structure.findings + tokenizer.encode(findings), list(absent)))

    assert favoured(" The heart is normal. The lungs are clear.") == {negation}
    assert favoured(" The heart is normal.") == set()  # the lungs come first
    assert favoured(" The heart is normal. The lungs are clear.", absent=["Atelectasis"]) == {
        negation
    }
    assert favoured(" The heart is normal. The lungs are clear. No pneumothorax.") == {negation}
    assert favoured(" The lungs are clear.") == {negation}  # the heart may come after
    done = " The heart is normal. The lungs are clear. No pleural effusion."
    assert favoured(done) == set()  # named already
    # with nothing stated absent, the pleura still comes next (15 of 130 held-out OpenI reports
    # went on to the aorta, the spine and the vessels and never reached it)
    assert favoured(" The heart is normal. The lungs are clear.", absent=()) == {negation}
    assert favoured(" The lungs are clear. No pneumothorax.", absent=()) == set()
    assert favoured(" The lungs are clear. There is no", absent=()) == set()  # nothing to name
    # a stated pleural finding's sentence speaks for the pleura (its lead comes after)
    ids = structure.findings + tokenizer.encode(" The heart is normal. The lungs are clear.")
    assert names.favoured(ids, [], named=["Effusion"]) == []
    assert names.favoured(ids, [], named=["Nodule"]) == [negation]

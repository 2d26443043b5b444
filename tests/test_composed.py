"""The composed no-training baseline's pieces: sentence retrieval, threshold, context."""

import numpy as np
import pytest
import torch

from mrg.evaluation.composed import (
    NO_FINDING,
    composed_context,
    composed_user,
    finding_sentences,
    probe_threshold,
)


@pytest.fixture(scope="module")
def labeler():
    from mrg.text.labeler import ReportLabeler

    return ReportLabeler()


REPORTS = [
    "FINDINGS: Stable cardiomegaly. Small right pleural effusion.\nIMPRESSION: Cardiomegaly.",
    "FINDINGS: Cardiomegaly. The lungs are clear.\nIMPRESSION: Cardiomegaly.",
    "FINDINGS: Large left pleural effusion.\nIMPRESSION: Pleural effusion.",
]


def test_retrieved_sentences_claim_no_prior_study_side_or_size(labeler):
    sentences = finding_sentences(REPORTS, labeler)
    assert sentences["Cardiomegaly"] == "Cardiomegaly."  # not "Stable cardiomegaly."
    assert sentences["Effusion"] == "Pleural effusion."  # not the sided, sized ones
    assert composed_user([], sentences).endswith(NO_FINDING)
    assert "Cardiomegaly. Pleural effusion." in composed_user(
        ["Effusion", "Cardiomegaly"], sentences
    )


def test_the_probe_threshold_is_the_one_of_highest_micro_f1():
    labels = np.array([[1, 0], [0, 1], [0, 0]])
    probabilities = np.array([[0.9, 0.2], [0.3, 0.6], [0.4, 0.1]])
    assert 0.4 < probe_threshold(probabilities, labels) <= 0.6


def test_the_composed_context_is_the_chat_prompt_alone_left_padded(make_tiny_model):
    model = make_tiny_model("prompt-wise").eval()
    ctx = composed_context(model, ["The radiograph shows: Mass.", "x"])
    assert ctx.embeds.shape[:2] == ctx.attention_mask.shape and ctx.prompt.tokens.shape[1] == 0
    assert ctx.attention_mask[1, 0] == 0 and ctx.attention_mask[:, -1].all()
    assert torch.equal(ctx.attention_mask[0], torch.ones_like(ctx.attention_mask[0]))

"""Continuous batching (mrg.batching) with tiny random LLaMAs: same tokens as alone, cancels, bound."""

import threading

import pytest
import torch
from conftest import random_batch, tiny_model_config, wait_idle

from mrg.batching import BUSY, Batcher, Request, ServiceBusy, forced_run, prefill
from mrg.batching.rows import GrowingLayer
from mrg.model import Decoding, MRGModel
from mrg.model.prompting import positions_from_mask


@pytest.fixture
def models(tiny_llm, tokenizer):
    made = {}
    for seed, mode in enumerate(("prompt-wise", "promptbook-wise")):
        torch.manual_seed(seed)
        made[mode] = MRGModel(tiny_model_config(mode), tiny_llm, tokenizer).eval()
    return made


def studies(n: int):
    """``n`` one-study batches; odd ones lack the lateral view, so their contexts are shorter."""
    made = []
    for i in range(n):
        views = random_batch(batch=1, seed=i)
        if i % 2:
            views.mask[0, 1] = False
        made.append(views)
    return made


def cases(models, n=6):
    """(model, study, decoding) for both modes and budgets of several lengths."""
    modes = list(models.values())
    return [
        (modes[i % 2], study, Decoding(max_new_tokens=6 + 5 * i, repetition_penalty=1.2))
        for i, study in enumerate(studies(n))
    ]


def alone(model, study, decoding) -> list[int]:
    return list(model.stream_ids(study, decoding))


def test_batched_greedy_tokens_equal_decoding_alone_for_mixed_lengths_and_modes(models, tiny_llm):
    runs = cases(models)
    expected = [alone(*run) for run in runs]
    assert len({len(e) for e in expected}) > 1  # the rows end at different steps
    batcher = Batcher(tiny_llm, max_batch=8)
    tickets = [batcher.submit(model.decoding_request(study, d)) for model, study, d in runs]
    assert [list(t) for t in tickets] == expected
    assert batcher.largest_batch >= 2 and wait_idle(batcher)


def test_forced_tokens_run_until_the_llm_chooses_or_the_report_ends():
    request = Request(torch.zeros(1, 1, 4), torch.ones(1, 1), None, max_new_tokens=6, eos_id=9)
    assert forced_run(request, [3]) == ([], False)  # nothing forced: the LLM chooses
    request.forced = lambda ids: {0: 1, 1: 2}.get(len(ids))
    assert forced_run(request, []) == ([1, 2], False)  # the opening, then the LLM
    request.forced = lambda ids: [1, 2, 9][len(ids)]
    assert forced_run(request, []) == ([1, 2], True)  # the rest is forced, to its end
    request.forced = lambda ids: 5
    assert forced_run(request, [7, 7]) == ([5] * 4, True)  # until the budget


def test_a_growing_layer_holds_what_concatenation_would_and_never_writes_into_its_inputs():
    layer, shared = GrowingLayer(), torch.randn(2, 3, 5, 4)
    kept = shared.clone()
    keys, _ = layer.update(shared, shared)
    expected = shared
    for step in range(GrowingLayer.ROOM + 3):  # past the first buffer's room
        new = torch.randn(2, 3, 1, 4)
        expected = torch.cat([expected, new], dim=-2)
        keys, values = layer.update(new, new)
        assert torch.equal(keys, expected) and torch.equal(values, expected)
    layer.keys, layer.values = keys[[1]], values[[1]]  # a row leaves (the batcher's drop)
    new = torch.randn(1, 3, 1, 4)
    keys, _ = layer.update(new, new)
    assert torch.equal(keys, torch.cat([expected[[1]], new], dim=-2))
    assert torch.equal(shared, kept)  # the shared prefix is copied, not written into


@torch.inference_mode()
def test_a_prefill_after_the_shared_prefix_is_a_pass_over_the_whole_context(models, tiny_llm):
    model = models["promptbook-wise"]
    study = studies(2)[1]  # no lateral view: masked slots after the prefix
    request = model.decoding_request(study, Decoding())
    assert request.prefix[0][0].shape[2] == len(model.template.prefix_ids)
    assert model.shared_prefix() is request.prefix  # made once, shared by every request
    ctx = model.context(study)
    mask = ctx.attention_mask
    whole = tiny_llm(
        inputs_embeds=ctx.embeds, attention_mask=mask, position_ids=positions_from_mask(mask)
    )
    after, after_mask = prefill(tiny_llm, request)
    assert torch.equal(after_mask, mask)
    assert torch.allclose(after.logits[:, -1], whole.logits[:, -1], atol=1e-5)
    for ours, theirs in zip(after.past_key_values.layers, whole.past_key_values.layers):
        assert torch.allclose(ours.keys, theirs.keys, atol=1e-5)
    # the forced opening read with the context: as if its tokens were decoded one by one
    opening, ends = forced_run(request, [])
    assert opening and not ends  # FINDINGS: is forced; the LLM writes after it
    assert [request.forced(opening[:i]) for i in range(len(opening))] == opening
    read, read_mask = prefill(tiny_llm, request, opening)
    assert read_mask.shape[1] == mask.shape[1] + len(opening)
    out = whole
    for token in opening:
        mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
        out = tiny_llm(
            input_ids=torch.tensor([[token]]),
            attention_mask=mask,
            position_ids=positions_from_mask(mask)[:, -1:],
            past_key_values=out.past_key_values,
        )
    assert torch.allclose(read.logits[:, -1], out.logits[:, -1], atol=1e-4)  # float order


def test_a_request_joins_a_running_batch_and_its_tokens_do_not_change(models, tiny_llm):
    runs = cases(models, n=4)
    expected = [alone(*run) for run in runs]
    batcher = Batcher(tiny_llm, max_batch=8)
    model, study, decoding = runs[-1]
    first = batcher.submit(model.decoding_request(study, decoding))
    tokens = iter(first)
    head = [next(tokens) for _ in range(3)]  # the first request is decoding...
    later = [batcher.submit(m.decoding_request(s, d)) for m, s, d in runs[:-1]]  # ...others join
    assert head + list(tokens) == expected[-1]
    assert [list(t) for t in later] == expected[:-1]


def test_cancelling_one_request_mid_batch_leaves_the_others_correct(models, tiny_llm):
    runs = cases(models, n=4)
    runs = [(m, s, Decoding(max_new_tokens=40, repetition_penalty=1.2)) for m, s, _ in runs]
    expected = [alone(*run) for run in runs]
    batcher = Batcher(tiny_llm, max_batch=8)
    streams = [batcher.stream(m.decoding_request(s, d)) for m, s, d in runs]
    got = [[next(stream)] for stream in streams]  # every request is in the batch
    streams[1].close()  # the second user leaves
    for i in (0, 2, 3):
        got[i] += list(streams[i])
    assert [got[i] for i in (0, 2, 3)] == [expected[i] for i in (0, 2, 3)]
    assert got[1] == expected[1][:1]
    assert wait_idle(batcher)


class Gate(torch.nn.Module):
    """The LLM behind a gate: every call waits until the test opens it."""

    def __init__(self, llm):
        super().__init__()
        self.llm, self.open, self.config = llm, threading.Event(), llm.config

    def forward(self, **kwargs):
        self.open.wait(timeout=30)
        return self.llm(**kwargs)

    def set_attn_implementation(self, name):
        self.llm.set_attn_implementation(name)

    def get_input_embeddings(self):
        return self.llm.get_input_embeddings()


def test_past_the_batch_and_the_waiting_room_a_request_is_refused_with_the_message(
    models, tiny_llm
):
    model = models["prompt-wise"]
    study, decoding = studies(1)[0], Decoding(max_new_tokens=16)  # past the forced opening
    gate = Gate(tiny_llm)
    batcher = Batcher(gate, max_batch=1, max_waiting=1)
    first = batcher.submit(model.decoding_request(study, decoding))  # held in its prefill
    second = batcher.submit(model.decoding_request(study, decoding))  # waits for a place
    with pytest.raises(ServiceBusy) as refused:
        batcher.submit(model.decoding_request(study, decoding))
    assert str(refused.value) == BUSY and "try again" in BUSY
    gate.open.set()
    expected = alone(model, study, decoding)
    assert list(first) == expected and list(second) == expected
    assert wait_idle(batcher)
    assert list(batcher.submit(model.decoding_request(study, decoding))) == expected


def test_a_failing_request_fails_alone(models, tiny_llm):
    runs = cases(models, n=3)
    expected = [alone(*run) for run in runs]
    batcher = Batcher(tiny_llm, max_batch=8)
    requests = [m.decoding_request(s, d) for m, s, d in runs]

    def broken(ids, scores):
        raise RuntimeError("a processor failed")

    requests[1].processors = broken
    tickets = [batcher.submit(r) for r in requests]
    with pytest.raises(RuntimeError, match="a processor failed"):
        list(tickets[1])
    assert [list(tickets[i]) for i in (0, 2)] == [expected[0], expected[2]]
    assert wait_idle(batcher)


def test_calls_run_on_the_batcher_s_thread_between_steps_and_raise_their_errors(models, tiny_llm):
    """Every torch computation of a service goes through ``call``: on the decoding thread
    (one OpenMP team), in order, while a report is decoding, errors handed back."""
    batcher = Batcher(tiny_llm, max_batch=8)
    model, study, _ = cases(models, 1)[0]
    assert batcher.call(threading.current_thread) is batcher.thread
    request = model.decoding_request(study, Decoding(max_new_tokens=40))
    stream = batcher.stream(request)
    first = next(stream)  # decoding has started
    order = []
    assert batcher.call(lambda: order.append(len(order)) or "done") == "done"
    assert batcher.call(lambda: batcher.call(lambda: 7)) == 7  # a call from a call runs inline
    with pytest.raises(ZeroDivisionError):
        batcher.call(lambda: 1 / 0)
    tokens = [first, *stream]
    assert tokens == alone(model, study, Decoding(max_new_tokens=40)) and order == [0]
    assert wait_idle(batcher) and not batcher.calls


def test_an_idle_batcher_s_thread_ends_and_the_next_call_starts_another(monkeypatch, tiny_llm):
    """A live OpenMP team, even idle, slows every other (``mrg.batching``): idle threads end."""
    import time

    import mrg.batching.batcher

    monkeypatch.setattr(mrg.batching.batcher, "IDLE_S", 0.05)
    batcher = Batcher(tiny_llm)
    first = batcher.call(threading.current_thread)
    deadline = time.monotonic() + 5
    while batcher.thread is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batcher.thread is None and not first.is_alive()
    second = batcher.call(threading.current_thread)
    assert second is not first and second.name == "mrg-batcher"
    batcher.close()
    assert not second.is_alive()

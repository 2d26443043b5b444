"""A decoding request for ``mrg.batching``: one study's context, processors, budget and
forced tokens; the tokens its structure forces (``forced_run``) and its context pass
(``prefill``), the same for the batcher and for ``MRGModel.stream_ids``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.profiler import record_function
from transformers import LogitsProcessorList, PreTrainedModel

from mrg.batching.rows import growing_cache


@dataclass
class Request:
    """One study's decoding: its context row, processors, budget and end token.

    ``prefix``: the LLM's keys and values (``[1, kv_heads, P, head_dim]`` per layer) of the
    context's first P positions, the chat template's opening that every study shares, made
    once (``ReportGeneration.shared_prefix``); ``embeds`` then holds the rest of the context
    and ``attention_mask`` all of it."""

    embeds: torch.Tensor  # [1, L − P, H]
    attention_mask: torch.Tensor  # [1, L]
    processors: LogitsProcessorList
    max_new_tokens: int
    eos_id: int
    sample: bool = False
    prefix: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()
    forced: Callable[[list[int]], int | None] | None = None  # see ``forced_run``


def forced_run(request: Request, generated: list[int]) -> tuple[list[int], bool]:
    """(the tokens ``request.forced`` imposes after ``generated``, one after another, until
    the LLM would choose; whether they end the report: its end token or its budget). Forced
    tokens do not depend on the LLM's logits, so none is decoded: the opening (``FINDINGS:``
    and the findings' sentences) is read with the context, and a report whose rest is forced
    (the impression of named findings, then the end) is finished without another step."""
    run: list[int] = []
    if request.forced is None:
        return run, False
    while len(generated) + len(run) < request.max_new_tokens:
        token = request.forced(generated + run)
        if token is None:
            return run, False
        if token == request.eos_id:
            return run, True
        run.append(token)
    return run, True


def next_tokens(
    request: Request, generated: list[int], logits: torch.Tensor
) -> tuple[list[int], bool]:
    """(the tokens to hand out after ``generated``: the one ``logits`` ``[1, V]`` give through
    the request's processors, then, where the rest of the report is forced, that rest; whether
    the report ends: its end token (then no token), its forced end or its budget)."""
    ids = torch.tensor([generated], dtype=torch.long, device=logits.device)
    with record_function("mrg.processors"):
        scores = request.processors(ids, logits.float())
    if request.sample:
        token = int(torch.multinomial(scores.softmax(-1), 1))
    else:
        token = int(scores.argmax(-1))
    if token == request.eos_id:
        return [], True
    rest, ends = forced_run(request, [*generated, token])
    budget = len(generated) + 1 >= request.max_new_tokens
    return [token, *(rest if ends else [])], ends or budget


def prefill(llm: PreTrainedModel, request: Request, opening: list[int] = ()):
    """The LLM's pass over ``request``'s context and then the tokens ``opening`` (the report's
    forced first tokens, ``forced_run``), after the shared prefix's keys and values where the
    request has them: the output (the cache of all of it, the last position's logits) and the
    attention mask of all of it."""
    mask = request.attention_mask.long()
    embeds = request.embeds
    if opening:
        ids = torch.tensor([list(opening)], device=embeds.device)
        embeds = torch.cat([embeds, llm.get_input_embeddings()(ids).to(embeds.dtype)], dim=1)
        mask = torch.cat([mask, mask.new_ones(1, len(opening))], dim=1)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # positions_from_mask
    done = request.prefix[0][0].shape[2] if request.prefix else 0
    out = llm(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=positions[:, done:],
        past_key_values=growing_cache(llm, request.prefix),
        use_cache=True,
        logits_to_keep=1,
    )
    return out, mask

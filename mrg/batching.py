"""Continuous batching: concurrent requests decode together over one frozen LLM.

A request is a context (``inputs_embeds`` and mask, one row: what ``MRGModel.context`` made
from the image) with its own logits processors, budget and forced tokens. The batcher's
thread owns the LLM's decoding: a request that arrives while others decode is prefilled alone
(``prefill``: after the keys and values of the chat template's opening, made once per model,
and with the report's forced opening read in the same pass, ``forced_run``) and joins the
running batch at the next step; a row whose rest is forced ends without decoding it. The
batch shares one KV cache (``GrowingLayer``: written in place), left-padded to its longest
row; every step feeds each row the token it chose last, with position ids that count that
row's real tokens only (``mask.sum − 1``, the rule ``positions_from_mask`` gives the prefill),
and attention that reads each row's own tokens only (``ROW_ATTENTION``: the row alone, in the
very shapes it would have alone; rows that start together attend together), so a row's tokens do not depend on who else is in the
batch: the weights' products are per row already (checked for fp32 and for the weight-only
kernels), while attention over a left-padded cache with a mask took another kernel path and
changed a bf16 report in 8 of 8 concurrent requests. A finished, cancelled or failed
row leaves at the next step and the cache's all-padding columns are dropped. Prompt-wise and
promptbook-wise requests share the batch: they differ only in their context.

The queue is bounded: past ``max_batch`` decoding and ``max_waiting`` waiting requests,
``submit`` raises ``ServiceBusy`` at once rather than making anyone wait without end.

**One thread for all torch work.** PyTorch's CPU kernels run on an OpenMP team that belongs
to the thread which calls them. Where two threads each have a team (a web server's handler
that encoded an image, and the batcher that decodes), the teams oversubscribe the cores and
GNU OpenMP stops spinning between the hundreds of small parallel regions of a decoding step:
measured on 2 cores, a SmolLM2 step took 90–114 ms instead of 45–54 ms. So the service runs
every torch computation on this thread (``call``: encoding a study, the findings head, the
gate, beam search, Grad-CAM), between two decoding steps: 10.4 → 21.5 tokens/s for one
report (``benchmarks/profile_decoding.py``). A team counts while its thread lives, even
idle: an idle batcher of a second service made the first one's report 0.62 → 1.32 s. So the
thread ends after ``IDLE_S`` without work (its team with it), and the next request or call
starts another.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch.profiler import record_function
from transformers import AttentionInterface, DynamicCache, LogitsProcessorList, PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

log = logging.getLogger(__name__)

T = TypeVar("T")
BUSY = "The service is busy with other reports right now. Please try again in a moment."


ROW_ATTENTION = "mrg_rows"


def rows_attention(module, query, key, value, attention_mask, **kwargs):
    """PyTorch's SDPA, except that a decoding step of a padded batch (one query per row, a
    mask) attends from each row's first real position, with the mask it would have alone
    (None where it masks nothing, as transformers makes it for a lone row; a context without
    its lateral view masks those slots), on contiguous keys and values, as a lone row's cache
    is: the call the row makes when it decodes alone. Rows that start at the same position and
    mask nothing attend in one call (their batch, like a lone row, takes no mask); a row with
    masked slots attends alone."""
    if attention_mask is None or query.shape[2] != 1 or query.shape[0] == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    out = None
    for (start, alone), rows in _row_groups(attention_mask):
        mask = None if alone < 0 else attention_mask[alone : alone + 1, :, :, start:]
        attended = sdpa_attention_forward(
            module,
            query[rows],
            key[rows, :, start:].contiguous(),
            value[rows, :, start:].contiguous(),
            mask,
            **kwargs,
        )[0]
        out = attended.new_empty(query.shape[0], *attended.shape[1:]) if out is None else out
        out[rows] = attended
    return out, None


# (a weak reference to the last step's mask, its groups), replaced whole: one read is atomic
_last_groups: tuple = (lambda: None, [])


def _row_groups(attention_mask: torch.Tensor) -> list[tuple[tuple[int, int], slice | list]]:
    """((first real position, −1 or the row that attends alone), the rows) of a decoding
    step's mask ``[B, 1, 1, T]``: made once per step, as every layer gets the same mask."""
    global _last_groups
    mask_ref, groups_made = _last_groups
    if mask_ref() is attention_mask:
        return groups_made
    keep = attention_mask[:, 0, -1]
    keep = keep if keep.dtype == torch.bool else keep == 0  # a float mask adds 0 or −∞
    groups: dict[tuple[int, int], list[int]] = {}
    for b, start in enumerate(keep.int().argmax(dim=-1).tolist()):  # each row's left padding
        whole = bool(keep[b, start:].all())
        groups.setdefault((start, -1 if whole else b), []).append(b)
    made = [  # consecutive rows as a slice: a view, not a gathered copy
        (k, slice(r[0], r[-1] + 1) if r == list(range(r[0], r[-1] + 1)) else r)
        for k, r in groups.items()
    ]
    _last_groups = (weakref.ref(attention_mask), made)
    return made


AttentionInterface.register(ROW_ATTENTION, rows_attention)
AttentionMaskInterface.register(ROW_ATTENTION, sdpa_mask)

IDLE_S = 2.0  # an idle batcher's thread ends after this; the next request starts another
_RUNNING: weakref.WeakSet = weakref.WeakSet()  # batchers to stop before the interpreter ends


@atexit.register
def _stop_all() -> None:
    """Stop every batcher's thread at exit: a daemon thread killed inside a torch kernel
    aborts the process ("terminate called without an active exception")."""
    for batcher in list(_RUNNING):
        batcher.close()


class ServiceBusy(RuntimeError):
    """The queue is full; the message says so in words a clinician understands."""

    def __init__(self):
        super().__init__(BUSY)


_DONE = object()


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


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values are views of buffers with room for more
    positions: a step writes its token in place where ``DynamicLayer`` copies the whole cache
    (``torch.cat``, per layer and step: 11 of a batch of eight's 60 ms on 2 cores). Keys set
    from outside (the batcher's joins and drops) move to a new buffer at the next update."""

    ROOM = 64  # positions added to a buffer beyond what it must hold

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]
            self.buffers = (None, None)
        keys, key_buffer = _written(self.keys, key_states, self.buffers[0])
        values, value_buffer = _written(self.values, value_states, self.buffers[1])
        self.keys, self.values, self.buffers = keys, values, (key_buffer, value_buffer)
        return self.keys, self.values


def _written(cached: torch.Tensor, new: torch.Tensor, buffer: torch.Tensor | None):
    """(``cached`` then ``new`` along the positions, the buffer it is a view of): written into
    ``buffer`` where ``cached`` is its beginning and it has room, else into a new one."""
    length = cached.shape[-2] + new.shape[-2]
    ours = (
        buffer is not None
        and cached.data_ptr() == buffer.data_ptr()
        and cached.shape[:2] == buffer.shape[:2]
        and cached.stride() == buffer.stride()
    )
    if not ours or length > buffer.shape[-2]:
        buffer = new.new_empty(*new.shape[:2], length + GrowingLayer.ROOM, new.shape[-1])
        buffer[..., : cached.shape[-2], :] = cached
    buffer[..., cached.shape[-2] : length, :] = new
    return buffer[..., :length, :], buffer


def growing_cache(llm: PreTrainedModel, prefix=()) -> DynamicCache:
    """An empty cache for ``llm`` of ``GrowingLayer``s (where its layers are plain dynamic
    ones), holding ``prefix``'s keys and values (per layer) to begin with."""
    cache = DynamicCache(config=llm.config)
    if all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [GrowingLayer() for _ in cache.layers]
    for layer, (keys, values) in zip(cache.layers, prefix):
        layer.update(keys, values)
    return cache


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


@dataclass
class Ticket:
    """The consumer's end of a request: iterate for token ids; ``cancel`` to stop early.

    The batcher wakes the consumer for its first token, then at most every ``WAKE_S`` (a
    token written in between waits for the next one, at most a step more) and at the end: a
    woken thread takes a core from the decoding thread's OpenMP team in the middle of a step
    (measured on 2 cores: eight consumers woken every step made a batch of eight's step 54 →
    74 ms). A consumer that comes back while tokens wait takes them without being woken."""

    request: Request
    cancelled: threading.Event = field(default_factory=threading.Event)
    ended: bool = False  # set once, by the batcher's thread, with the last item it puts
    pending: deque = field(default_factory=deque)  # token ids, then _DONE or the error
    ready: threading.Condition = field(default_factory=threading.Condition)
    woken: float = float("-inf")  # when the batcher last woke the consumer (perf_counter)

    WAKE_S: ClassVar[float] = 0.2

    def put(self, item: object, wake: bool = False) -> None:
        """Hand the consumer ``item`` (the batcher's side); wake it if ``wake`` or if it was
        last woken ``WAKE_S`` ago."""
        with self.ready:
            self.pending.append(item)
            now = time.perf_counter()
            if wake or now - self.woken >= self.WAKE_S:
                self.woken = now
                self.ready.notify()

    def __iter__(self) -> Iterator[int]:
        while True:
            with self.ready:
                while not self.pending:
                    self.ready.wait()
                items = list(self.pending)
                self.pending.clear()
            for item in items:
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class _Row:
    ticket: Ticket
    generated: list[int] = field(default_factory=list)


class Batcher:
    """Decodes every submitted request in one running batch (see the module docstring)."""

    def __init__(self, llm: PreTrainedModel, max_batch: int = 8, max_waiting: int = 8):
        if max_batch < 1 or max_waiting < 0:
            raise ValueError("max_batch >= 1 and max_waiting >= 0 are required")
        self.llm, self.max_batch, self.max_waiting = llm, max_batch, max_waiting
        config = getattr(llm, "config", None)
        if getattr(config, "_attn_implementation", None) == "sdpa":  # not a GPU's flash kernels
            llm.set_attn_implementation(ROW_ATTENTION)
        self.waiting: deque[Ticket] = deque()
        self.admitted = 0  # submitted and not ended: waiting, being prefilled or decoding
        self.rows: list[_Row] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [B, T]: 0 on each row's left padding
        self.calls: deque[tuple[Callable, Future]] = deque()  # torch work to run between steps
        self.wakeup = threading.Condition()
        self.largest_batch = 0  # the most rows decoded in one step so far (for benchmarks)
        self.closed = False
        self.thread: threading.Thread | None = None  # started by work, ended by idleness
        _RUNNING.add(self)

    def _start(self) -> None:
        """Start the decoding thread where none runs (called holding ``wakeup``)."""
        if self.thread is None and not self.closed:
            self.thread = threading.Thread(target=self._run, name="mrg-batcher", daemon=True)
            self.thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread after its current step (rows still decoding get no more tokens)."""
        with self.wakeup:
            self.closed = True
            self.wakeup.notify_all()
            thread = self.thread
        if thread is not None and threading.current_thread() is not thread:
            thread.join(timeout)

    # ------------------------------------------------------------------ consumer side

    def submit(self, request: Request) -> Ticket:
        """Queue ``request``; raises ``ServiceBusy`` when the batch and the queue are full."""
        ticket = Ticket(request)
        with self.wakeup:
            if self.admitted >= self.max_batch + self.max_waiting:
                raise ServiceBusy()
            self.admitted += 1
            self.waiting.append(ticket)
            self._start()
            self.wakeup.notify()
        return ticket

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()`` run on the batcher's thread between two decoding steps (see the module
        docstring); its result, or its exception raised here. Calls run one at a time, in
        the order they came."""
        if threading.current_thread() is self.thread:
            return fn()
        future: Future = Future()
        with self.wakeup:
            self.calls.append((fn, future))
            self._start()
            self.wakeup.notify()
        return future.result()

    def stream(self, request: Request) -> Iterator[int]:
        """Token ids of ``request``; closing the iterator cancels it."""
        ticket = self.submit(request)
        try:
            yield from ticket
        finally:
            ticket.cancel()

    # ------------------------------------------------------------------ decoding thread

    def _run(self) -> None:
        while True:
            with self.wakeup:
                if not self._busy() and not self.wakeup.wait_for(self._busy, timeout=IDLE_S):
                    self.thread = None  # idle: the thread ends, and its OpenMP team with it
                    return
                if self.closed:
                    return
                calls, joining = list(self.calls), []
                self.calls.clear()
                while self.waiting and len(self.rows) + len(joining) < self.max_batch:
                    joining.append(self.waiting.popleft())
            for fn, future in calls:
                try:
                    future.set_result(fn())
                except BaseException as err:  # noqa: BLE001 — handed to the caller
                    future.set_exception(err)
            with torch.inference_mode():
                for ticket in joining:
                    self._join(ticket)
                self._drop([i for i, r in enumerate(self.rows) if r.ticket.cancelled.is_set()])
                if self.rows:
                    self._step()

    def _busy(self) -> bool:
        """Work to do, or the order to stop (read holding ``wakeup``)."""
        return bool(self.waiting or self.rows or self.calls or self.closed)

    def _join(self, ticket: Ticket) -> None:
        """Prefill ``ticket`` alone, choose its first token, and append it to the batch."""
        request, row = ticket.request, _Row(ticket)
        try:
            opening, ends = forced_run(request, [])
            if not self._hand_out(row, opening, ends):
                return
            with record_function("mrg.prefill"):
                out, mask = prefill(self.llm, request, opening)
        except Exception as err:
            log.exception("prefill failed")
            self._end(ticket, err)
            return
        if not self._choose(row, out.logits[:, -1]):
            return
        self._append(out.past_key_values, mask)
        self.rows.append(row)

    def _hand_out(self, row: _Row, tokens: list[int], ends: bool) -> bool:
        """Give ``row`` ``tokens``; False where it has ended: cancelled (then without them),
        or ``ends``."""
        if row.ticket.cancelled.is_set():
            self._end(row.ticket)
            return False
        row.generated.extend(tokens)
        for token in tokens:
            row.ticket.put(token)
        if ends:
            self._end(row.ticket)
            return False
        return True

    def _choose(self, row: _Row, logits: torch.Tensor) -> bool:
        """Pick ``row``'s next token and hand it out; False when the row has ended."""
        request, ticket = row.ticket.request, row.ticket
        try:
            ids = torch.tensor([row.generated], dtype=torch.long, device=logits.device)
            with record_function("mrg.processors"):
                scores = request.processors(ids, logits.float())
            if request.sample:
                token = int(torch.multinomial(scores.softmax(-1), 1))
            else:
                token = int(scores.argmax(-1))
            if token == request.eos_id:
                self._end(ticket)
                return False
            rest, ends = forced_run(request, [*row.generated, token])
        except Exception as err:
            log.exception("choosing a token failed")
            self._end(ticket, err)
            return False
        budget = len(row.generated) + 1 >= request.max_new_tokens
        return self._hand_out(row, [token, *(rest if ends else [])], ends or budget)

    def _end(self, ticket: Ticket, last: object = _DONE) -> None:
        """Hand ``ticket`` its last item (the end, or the error) once, and free its place."""
        if ticket.ended:
            return
        ticket.ended = True
        ticket.put(last, wake=True)
        with self.wakeup:
            self.admitted -= 1

    def _step(self) -> None:
        """One token for every row, from the shared cache."""
        self.largest_batch = max(self.largest_batch, len(self.rows))
        last = torch.tensor([[r.generated[-1]] for r in self.rows], device=self.mask.device)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        try:
            with record_function("mrg.llm_step"):
                out = self.llm(
                    input_ids=last,
                    attention_mask=self.mask,
                    position_ids=self.mask.sum(-1, keepdim=True) - 1,
                    past_key_values=self.cache,
                    use_cache=True,
                )
        except Exception as err:
            log.exception("decoding step failed")
            for row in self.rows:
                self._end(row.ticket, err)
            self._drop(list(range(len(self.rows))))
            return
        ended = [
            i for i, row in enumerate(self.rows) if not self._choose(row, out.logits[i : i + 1, -1])
        ]
        self._drop(ended)

    # ------------------------------------------------------------------ the shared cache

    def _append(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Concatenate a prefilled row's cache to the batch's, left-padding the shorter one."""
        if self.cache is None:
            self.cache, self.mask = cache, mask
            return
        ours, theirs = self.mask.shape[1], mask.shape[1]
        pad_ours, pad_theirs = max(0, theirs - ours), max(0, ours - theirs)
        for layer, new in zip(self.cache.layers, cache.layers):
            layer.keys = torch.cat(
                [_left_pad(layer.keys, pad_ours), _left_pad(new.keys, pad_theirs)]
            )
            layer.values = torch.cat(
                [_left_pad(layer.values, pad_ours), _left_pad(new.values, pad_theirs)]
            )
        self.mask = torch.cat([F.pad(self.mask, (pad_ours, 0)), F.pad(mask, (pad_theirs, 0))])

    def _drop(self, indices: list[int]) -> None:
        """Remove rows ``indices`` from the batch and the cache columns no row needs."""
        if not indices:
            return
        gone = set(indices)
        for i in gone:
            self._end(self.rows[i].ticket)  # a cancelled row's end; ended rows have theirs
        self.rows = [r for i, r in enumerate(self.rows) if i not in gone]
        if not self.rows:
            self.cache = self.mask = None
            return
        keep = torch.tensor([i for i in range(self.mask.shape[0]) if i not in gone])
        self.mask = self.mask[keep]
        start = int(
            (self.mask.sum(0) > 0).nonzero()[0]
        )  # leading columns that are padding in every row
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[keep, :, start:]
            layer.values = layer.values[keep, :, start:]


def _left_pad(tensor: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, heads, T, D]`` with ``n`` zero positions before the first."""
    return F.pad(tensor, (0, 0, n, 0)) if n else tensor

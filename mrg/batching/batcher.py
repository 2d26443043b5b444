"""The continuous batcher: concurrent requests decode together over one frozen LLM.

A request is a context (``inputs_embeds`` and mask, one row: what ``MRGModel.context`` made
from the image) with its own logits processors, budget and forced tokens (``requests``). The
batcher's thread owns the LLM's decoding: a request that arrives while others decode is
prefilled alone (``prefill``: after the keys and values of the chat template's opening, made
once per model, with the report's forced opening read in the same pass, ``forced_run``) and
joins the running batch at the next step; a row whose rest is forced ends without decoding
it. The batch shares one KV cache (``rows.GrowingLayer``: written in place), left-padded to
its longest row; every step feeds each row the token it chose last, with position ids that
count that row's real tokens only (``mask.sum − 1``, the rule ``positions_from_mask`` gives
the prefill), and attention that reads each row's own tokens only (``rows.ROW_ATTENTION``: the
row alone, in the very shapes it would have alone; rows that start together attend
together), so a row's tokens do not depend on who else is in the batch: the weights'
products are per row already (checked for fp32 and for the weight-only kernels; bf16 once a
lone row is computed as two, ``mrg.model.llm.one_row_as_two``), while
attention over a left-padded cache with a mask took another kernel path and changed a bf16
report in 8 of 8 concurrent requests. A finished, cancelled or failed row leaves at the next
step and the cache's all-padding columns are dropped. Prompt-wise and promptbook-wise
requests share the batch: they differ only in their context.

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
from transformers import DynamicCache, PreTrainedModel

from mrg.batching.requests import Request, forced_run, next_tokens, prefill
from mrg.batching.rows import ROW_ATTENTION

log = logging.getLogger(__name__)

T = TypeVar("T")
BUSY = "The service is busy with other reports right now. Please try again in a moment."


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
        try:
            tokens, ends = next_tokens(row.ticket.request, row.generated, logits)
        except Exception as err:
            log.exception("choosing a token failed")
            self._end(row.ticket, err)
            return False
        return self._hand_out(row, tokens, ends)

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

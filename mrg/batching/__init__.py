"""Continuous batching: concurrent requests decode together over one frozen LLM.

``batcher.Batcher`` owns the decoding thread (how it batches, and why all torch work runs
on its thread, is in ``mrg.batching.batcher``); ``requests`` holds what a request is and
its prefill; ``rows`` the per-row attention and the growing KV cache.

This face only hands the names on, as ``transformers.models.llama`` does.
"""

from mrg.batching.batcher import BUSY, Batcher, ServiceBusy, Ticket
from mrg.batching.requests import Request, forced_run, next_tokens, prefill

__all__ = [
    "BUSY",
    "Batcher",
    "Request",
    "ServiceBusy",
    "Ticket",
    "forced_run",
    "next_tokens",
    "prefill",
]

"""Per-row computation of a padded decoding batch, for ``mrg.batching``: attention that reads
each row's own positions as a lone row does, and a KV cache that grows in place.

Attention (``ROW_ATTENTION``, registered with transformers): a decoding step over a
left-padded cache with a mask takes another SDPA kernel path than a lone row's (it changed a
bf16 report in 8 of 8 concurrent requests), so each row attends from its first real
position with the mask it would have alone; rows that start together and mask nothing
attend in one call, as a batch without padding does.

The cache (``GrowingLayer``): ``DynamicLayer`` concatenates every layer's keys and values
each step, copying the whole cache; these layers write the new position into a buffer with
room to spare.
"""

from __future__ import annotations

import weakref

import torch
from transformers import AttentionInterface, DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

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

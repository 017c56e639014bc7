"""`BildCache`: both models' KV caches in one object, with the sequence index each cache slot holds.

Rows of a batch advance by different amounts each round. Every cache slot therefore carries the sequence
index of the token it holds, or -1 for a slot to ignore (left padding, a rejected draft, a row that sat
out a forward). The models see those slots through the attention mask and get explicit position ids, so
a rolled-back draft in one row never disturbs another row, and a batch of one never has a gap at all.
T5-style decoders take no position ids but place tokens by slot: for them the slots in use are moved to the
end of the cache before each forward (`TrackedCache.right_align`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from .compat import (
    cache_kwarg,
    crop_cache,
    gather_cache_slots,
    has_recurrent_state,
    is_attention_free,
    keep_recurrent_states,
    new_cache,
)


class TrackedCache:
    """One model's KV cache plus, per row, which sequence index each slot holds (-1: ignore the slot)."""

    def __init__(self, model: PreTrainedModel, batch_size: int, device: torch.device):
        self.kv = new_cache(model)
        self.kwarg = cache_kwarg(model)
        self.is_recurrent = has_recurrent_state(model)  # rows alone, no slot ever skipped (see `record_from`)
        self.is_attention_free = is_attention_free(model)
        self.slot_index = torch.empty(batch_size, 0, dtype=torch.long, device=device)  # [B, S]
        self.n_seen = torch.zeros(batch_size, dtype=torch.long, device=device)  # read seq[:, :n_seen]

    @property
    def length(self) -> int:
        return self.slot_index.shape[1]

    def attention_mask(self, chunk_slot_index: torch.Tensor) -> torch.Tensor | None:
        """`(batch_size, S + L)` mask over the cache and a new chunk (attention-free models: the chunk's only,
        `(batch_size, L)`); None when every slot is visible."""
        if self.is_attention_free:
            visible = chunk_slot_index >= 0
        else:
            visible = torch.cat([self.slot_index, chunk_slot_index], dim=1) >= 0
        return None if bool(visible.all()) else visible.long()

    def right_align(self) -> None:
        """Move each row's slots in use to the end of the cache, in order, and drop columns no row uses.

        For decoders that place tokens by cache slot (T5's relative attention): afterwards a row's tokens sit
        in consecutive slots that end where the next token goes, so slot distances are token distances.
        """
        is_used = self.slot_index >= 0  # [B, S]
        n_slots = self.length
        order = (is_used.long() * n_slots + torch.arange(n_slots, device=is_used.device)).argsort(dim=1)  # [B, S]
        n_drop = int((~is_used).sum(dim=1).min()) if n_slots else 0  # leading columns every row leaves unused
        order = order[:, n_drop:]
        if n_drop == 0 and bool((order == torch.arange(n_slots, device=order.device)).all()):
            return
        self.slot_index = self.slot_index.gather(1, order)
        gather_cache_slots(self.kv, order)

    def append(self, chunk_slot_index: torch.Tensor, new_n_seen: torch.Tensor) -> None:
        """Record the slots a forward over a `(batch_size, L)` chunk just wrote."""
        self.slot_index = torch.cat([self.slot_index, chunk_slot_index], dim=1)
        self.n_seen = new_n_seen

    def keep_sibling(self, n_tree: int, kept: torch.Tensor, index: torch.Tensor) -> None:
        """Settle a forward that fed ``n_tree`` siblings of the token at ``index[b]`` in its last columns: row ``b``
        keeps sibling ``kept[b]`` in place of that token, or (-1) the token itself; the others are forgotten."""
        columns = torch.arange(self.length, device=kept.device)
        is_tree = columns >= self.length - n_tree  # [S]
        is_chosen = (kept >= 0)[:, None]
        is_kept_column = columns[None, :] == (self.length - n_tree + kept)[:, None]  # [B, S]
        drop = (is_tree & ~(is_chosen & is_kept_column)) | (is_chosen & ~is_tree & (self.slot_index == index[:, None]))
        self.slot_index = self.slot_index.masked_fill(drop, -1)

    def record_from(self, chunk_index: torch.Tensor, is_fed: torch.Tensor, settled: torch.Tensor) -> None:
        """Before a forward over ``chunk_index`` `(batch_size, L)` (``is_fed``: real tokens): recurrent layers keep
        their state after every fed token at index >= ``settled[b]``, the tokens a later `discard_from` may drop."""
        if self.is_recurrent:
            n_open = int(((chunk_index >= settled[:, None]) & is_fed).sum(dim=1).max())
            keep_recurrent_states(self.kv, min(chunk_index.shape[1], n_open + 1))

    def discard_from(self, keep_len: torch.Tensor, settle: bool = True) -> None:
        """Forget every token at sequence index >= ``keep_len[b]`` in row ``b``; crop slots no row uses.

        ``settle``: every token kept is final (the round is over); otherwise a later call may still drop some.
        """
        self.slot_index = self.slot_index.masked_fill(self.slot_index >= keep_len[:, None], -1)
        self.n_seen = torch.minimum(self.n_seen, keep_len)
        used = (self.slot_index >= 0).any(dim=0).nonzero()
        new_length = int(used[-1]) + 1 if len(used) else 0
        if new_length < self.length or (self.is_recurrent and settle):
            crop_cache(self.kv, self.length - new_length, settle)
            self.slot_index = self.slot_index[:, :new_length]


@dataclass
class BildCache:
    """The large and the small model's caches of one BiLD generate() call."""

    large: TrackedCache
    small: TrackedCache

    def discard_from(self, keep_len: torch.Tensor) -> None:
        """Roll both models back to the first ``keep_len[b]`` tokens of each row, which are final."""
        self.large.discard_from(keep_len)
        self.small.discard_from(keep_len)

"""What the loop passes around: the rules every token obeys, how tokens are picked, where each row stands,
the prompts generate() prepared, and one round's drafts. Below the loop (decoding.py) and the modules it uses
(context_drafts.py), which all read these types."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    EosTokenCriteria,
    LogitsProcessorList,
    MaxLengthCriteria,
    MaxTimeCriteria,
    StoppingCriteriaList,
    StopStringCriteria,
)

from .stats import BildStats

MIN_CAPACITY = 64  # token slots per row allocated up front; the buffer doubles when it fills
# Stopping criteria that judge each row alone and keep no state between calls: they may see rows at any length.
# Any other criterion may remember rows (lm-eval's MultiTokenEOSCriteria does), so it sees the batch as stock does.
STATELESS_CRITERIA = (EosTokenCriteria, MaxLengthCriteria, MaxTimeCriteria, StopStringCriteria)


@dataclass
class TokenRules:
    """What constrains every token, whichever model proposes it."""

    logits_processor: LogitsProcessorList
    stopping_criteria: StoppingCriteriaList
    max_length: int  # prompt (with its padding) + new tokens
    pad_token_id: int
    eos_token_ids: torch.Tensor | None  # [n_eos]
    vocab_size: int  # shared by both models; logits beyond it are ignored

    def is_eos(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.eos_token_ids is None:
            return torch.zeros_like(token_ids, dtype=torch.bool)
        return torch.isin(token_ids, self.eos_token_ids)


@dataclass
class Sampling:
    """How tokens are picked from processed distributions: argmax, or drawn from ``generator``."""

    do_sample: bool = False
    generator: torch.Generator | None = None  # None: torch's global generator, like stock sampling


@dataclass
class BatchState:
    """Where each row stands: its tokens (left-padded prompt, accepted tokens, this round's drafts) and counts."""

    token_ids: torch.Tensor  # [B, capacity]; capacity grows on demand, never past max_length
    lengths: torch.Tensor  # [B] tokens in use per row (prompt padding included)
    n_pads: torch.Tensor  # [B] left-padding tokens of each prompt
    finished: torch.Tensor  # [B] bool
    stats: BildStats  # [B] long tensors, counted as the loop goes
    max_length: int
    checked_length: int = 0  # every row has been shown to the stateful stopping criteria up to this length
    round_start: torch.Tensor | None = None  # [B] tokens before it are final: no rollback reaches them

    @classmethod
    def from_prompts(cls, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_length: int, pad_id: int):
        batch_size, prompt_length = input_ids.shape
        device = input_ids.device
        capacity = min(max_length, prompt_length + MIN_CAPACITY)
        token_ids = torch.full((batch_size, capacity), pad_id, dtype=torch.long, device=device)
        token_ids[:, :prompt_length] = input_ids
        n_pads = torch.zeros(batch_size, dtype=torch.long, device=device)
        if attention_mask is not None:
            n_pads = (attention_mask == 0).sum(dim=1)
        return cls(
            token_ids=token_ids,
            lengths=torch.full((batch_size,), prompt_length, dtype=torch.long, device=device),
            n_pads=n_pads,
            finished=torch.zeros(batch_size, dtype=torch.bool, device=device),
            stats=BildStats.zeros(batch_size, device),
            max_length=max_length,
            checked_length=prompt_length,
            round_start=torch.full((batch_size,), prompt_length, dtype=torch.long, device=device),
        )

    def write(self, rows: torch.Tensor, index: torch.Tensor, token_ids: torch.Tensor) -> None:
        """token_ids[b, index[b]] = token_ids[b] for the rows where ``rows[b]``; grows the buffer if needed."""
        b = rows.nonzero().squeeze(-1)
        if len(b) == 0:
            return
        self._reserve(int(index[b].max()) + 1)
        self.token_ids[b, index[b]] = token_ids[b]

    def tokens_at(self, index: torch.Tensor) -> torch.Tensor:
        """token_ids[b, index[b, i]], `(batch_size, n)`; indices past the buffer are clamped."""
        return self.token_ids.gather(1, index.clamp(max=self.token_ids.shape[1] - 1))

    def _reserve(self, n_slots: int) -> None:
        capacity = self.token_ids.shape[1]
        if n_slots <= capacity:
            return
        new_capacity = min(self.max_length, max(n_slots, 2 * capacity))
        grown = self.token_ids.new_full((self.token_ids.shape[0], new_capacity - capacity), 0)
        self.token_ids = torch.cat([self.token_ids, grown], dim=1)


@dataclass
class DecoderInputs:
    """What generate() prepared for one batch.

    input_ids: `(batch_size, prompt_length)` left-padded prompts (decoder-only) or decoder start ids.
    attention_mask: `(batch_size, prompt_length)` mask of ``input_ids`` (None: no padding).
    large_encoder_kwargs / small_encoder_kwargs: ``encoder_outputs`` and the encoder ``attention_mask`` of
        each model (encoder-decoder models only).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    large_encoder_kwargs: dict | None = None
    small_encoder_kwargs: dict | None = None

    def row(self, b: int) -> DecoderInputs:
        """Row ``b`` alone, as a batch of one."""
        return DecoderInputs(
            self.input_ids[b : b + 1],
            None if self.attention_mask is None else self.attention_mask[b : b + 1],
            _select_row(self.large_encoder_kwargs, b),
            _select_row(self.small_encoder_kwargs, b),
        )


@dataclass
class Drafts:
    """What the small model proposed this round, per row (all `(batch_size,)` unless said otherwise)."""

    n_drafted: torch.Tensor  # drafts made, the unsure token excluded
    n_steps: torch.Tensor  # small-model forwards
    fell_back: torch.Tensor  # bool, drafting ended because the small model was unsure
    has_candidate: torch.Tensor  # bool, the unsure token follows the drafts for the large model to check
    n_context: torch.Tensor | None = None  # the first n_context drafts were copied from the text (prompt lookup)
    n_proposed: torch.Tensor | None = None  # context drafts proposed, before the small model's check kept n_context
    probs: torch.Tensor | None = None  # [B, K, V] sampling only: the distributions draft i was drawn from
    # fallback_candidates > 1: the small model's next-best tokens at the unsure position, checked beside it
    siblings: torch.Tensor | None = None  # [B, S] token ids; row b uses its first n_siblings[b]
    n_siblings: torch.Tensor | None = None  # [B]
    sibling_scores: torch.Tensor | None = None  # [B, S, V] the large model's processed scores after each sibling
    sibling_logits: torch.Tensor | None = None  # [B, S, V_large] and its raw logits
    kept_sibling: torch.Tensor | None = None  # [B] which sibling the large model chose (-1: none)

    @classmethod
    def empty(cls, start: torch.Tensor) -> Drafts:
        zeros = torch.zeros_like(start)
        return cls(zeros.clone(), zeros.clone(), zeros.bool(), zeros.bool())

    @property
    def has_siblings(self) -> bool:
        return self.n_siblings is not None and bool((self.n_siblings > 0).any())

    @property
    def n_columns(self) -> int:
        """Large-model distributions the round needs: one per draft and candidate, plus the one after them."""
        return int((self.n_drafted + self.has_candidate).max()) + 1


def _select_row(kwargs: dict | None, b: int) -> dict | None:
    """Row ``b`` of every tensor in encoder kwargs (tensors and ModelOutputs such as ``encoder_outputs``)."""
    if kwargs is None:
        return None
    selected = {}
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            value = value[b : b + 1]
        elif hasattr(value, "items"):  # a ModelOutput
            value = type(value)(**{k: v[b : b + 1] if isinstance(v, torch.Tensor) else v for k, v in value.items()})
        selected[name] = value
    return selected

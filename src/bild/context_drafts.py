"""Context drafts: free drafts copied from each row's own text (prompt lookup), before the small model drafts.

With ``prompt_lookup_num_tokens=k`` (the stock `GenerationConfig` field), each round starts, per row, by looking
the row's last n-gram up in the row's text so far (its prompt without left padding, then its accepted tokens;
an encoder-decoder's decoder tokens): n from ``max_matching_ngram_size`` (stock default 2) down to 1, the most
recent earlier occurrence that is followed by at least one token. Up to ``k`` of the tokens that followed it
become drafts at no model cost, never past an EOS token (it is the last one) or the length limit. In greedy
decoding the small model's next forward reads them in one chunk and keeps those it would have drafted itself,
sure of them (`bild.decoding.check_context_drafts`), then drafts on from there as usual; the large model checks
every draft in its one verification forward, so the rollback rule treats them like any draft.

Sampling: a context draft ``x`` was "drawn" from a point mass at ``x``, so exact speculative sampling
(``rollback_threshold=0``) keeps it with probability ``p(x)`` and otherwise draws from ``p`` without ``x``,
renormalized (`context_draft_probs` gives `policies.find_rollback_sampled` that point mass).
"""

from __future__ import annotations

import torch

from .config import BildSettings
from .state import BatchState, TokenRules

DEFAULT_MAX_MATCHING_NGRAM_SIZE = 2  # stock prompt lookup's default when max_matching_ngram_size is None


def propose_context_drafts(
    state: BatchState, rules: TokenRules, settings: BildSettings, caps: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write each open row's context drafts after its tokens (``state.lengths`` grows with them), at most
    ``prompt_lookup_num_tokens``, or ``caps[b]`` for row ``b`` (`DraftSchedule.context_caps`).

    Returns two `(batch_size,)` tensors: ``n_context`` (context drafts written per row) and ``ends_in_eos``
    (bool, the last context draft is an EOS token: the row drafts nothing after it this round).
    """
    n_context = torch.zeros_like(state.lengths)
    ends_in_eos = torch.zeros_like(state.lengths, dtype=torch.bool)
    n_lookup = settings.prompt_lookup_num_tokens
    is_open = ~state.finished & (state.lengths < rules.max_length)
    if not n_lookup or not bool(is_open.any()):
        return n_context, ends_in_eos
    max_ngram = settings.max_matching_ngram_size or DEFAULT_MAX_MATCHING_NGRAM_SIZE
    follows = last_match_end(state.token_ids, state.n_pads, state.lengths, is_open, max_ngram)  # [B]
    offsets = torch.arange(n_lookup, device=follows.device)  # [k]
    n_room = torch.where(follows >= 0, state.lengths - follows, 0).clamp(max=n_lookup)  # tokens that followed
    n_room = torch.minimum(n_room, rules.max_length - state.lengths).clamp(min=0)
    if caps is not None:
        n_room = torch.minimum(n_room, caps)
    token_ids = state.tokens_at(follows.clamp(min=0)[:, None] + offsets)  # [B, k]
    is_unknown = (token_ids >= rules.vocab_size) & (offsets < n_room[:, None])  # an id only one model has
    n_room = torch.where(is_unknown.any(dim=1), is_unknown.int().argmax(dim=1), n_room)  # stop before it
    is_eos = rules.is_eos(token_ids) & (offsets < n_room[:, None])  # [B, k]
    ends_in_eos = is_eos.any(dim=1)
    n_context = torch.where(ends_in_eos, is_eos.int().argmax(dim=1) + 1, n_room)  # stop after the first EOS
    for i in range(int(n_context.max())):
        state.write(n_context > i, state.lengths + i, token_ids[:, i])
    state.lengths = state.lengths + n_context
    return n_context, ends_in_eos


def last_match_end(
    token_ids: torch.Tensor, first: torch.Tensor, lengths: torch.Tensor, is_open: torch.Tensor, max_ngram: int
) -> torch.Tensor:
    """Per row, the index just after the most recent earlier occurrence of its last n-gram, or -1.

    Row ``b``'s text is ``token_ids[b, first[b]:lengths[b]]``. The longest n (``max_ngram`` down to 1) with an
    occurrence that starts before the row's last n tokens (so at least one token follows it) wins.
    """
    width = int(lengths[is_open].max())
    token_ids = token_ids[:, :width]
    found = torch.full_like(lengths, -1)
    for n in range(min(max_ngram, width - 1), 0, -1):
        # a match needs n + 1 tokens before the suffix: the n-gram and a token after it
        is_looking = is_open & (found < 0) & (lengths - first > n)
        if not bool(is_looking.any()):
            continue
        suffix_index = lengths[:, None] - n + torch.arange(n, device=lengths.device)  # [B, n]
        suffix = token_ids.gather(1, suffix_index.clamp(0, width - 1))  # [B, n] each looking row's last n tokens
        windows = token_ids.unfold(1, n, 1)  # [B, width - n + 1, n]
        starts = torch.arange(windows.shape[1], device=lengths.device)  # [W]
        is_match = (windows == suffix[:, None, :]).all(dim=-1)  # [B, W]
        is_match &= is_looking[:, None] & (starts >= first[:, None]) & (starts + n < lengths[:, None])
        last = torch.where(is_match, starts, -1).max(dim=1).values  # [B]
        found = torch.where(last >= 0, last + n, found)
    return found


def context_draft_probs(
    step_probs: torch.Tensor, state: BatchState, start: torch.Tensor, n_context: torch.Tensor,
    n_drafted: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """`(batch_size, K, V)` the distribution each draft was drawn from: a point mass at a context draft, then the
    small model's distributions (``step_probs[:, j]``: its step ``j``) for the drafts it made after them."""
    batch_size, n_steps, vocab_size = step_probs.shape
    k = int(n_drafted.max())
    columns = torch.arange(k, device=start.device)  # [K]
    is_context = columns < n_context[:, None]  # [B, K]
    token_ids = state.tokens_at(start[:, None] + columns).clamp(0, vocab_size - 1)  # garbage past a row's drafts
    point = torch.nn.functional.one_hot(token_ids, vocab_size).to(step_probs.dtype)
    if n_steps == 0:
        return point
    step = (columns - n_context[:, None]).clamp(0, n_steps - 1)  # [B, K]
    from_small = step_probs[torch.arange(batch_size, device=start.device)[:, None], step]  # [B, K, V]
    return torch.where(is_context[..., None], point, from_small)

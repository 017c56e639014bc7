"""BiLD's fallback and rollback decisions as pure tensor functions (no model calls)."""

from __future__ import annotations

import torch


def should_fall_back(draft_probs: torch.Tensor, fallback_threshold: float) -> torch.Tensor:
    """Whether the small model is too unsure to draft: its top probability is below alpha_FB.

    Args:
        draft_probs: `(batch_size, vocab_size)` processed small-model probabilities.
    Returns:
        `(batch_size,)` bool.
    """
    return draft_probs.max(dim=-1).values < fallback_threshold


def find_rollback(
    draft_ids: torch.Tensor,
    n_drafted: torch.Tensor,
    target_logprobs: torch.Tensor,
    target_ids: torch.Tensor,
    rollback_threshold: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each row's drafts stop being acceptable.

    Draft ``d_i`` is rolled back when the large model would have chosen another token there and its
    cross-entropy under the large model, ``-log p_i(d_i)``, exceeds alpha_RB. The first such draft and
    everything after it are discarded.

    Args:
        draft_ids: `(batch_size, k)` drafted tokens; row ``b`` uses its first ``n_drafted[b]``.
        n_drafted: `(batch_size,)` number of real drafts per row.
        target_logprobs: `(batch_size, k + 1, vocab_size)` large-model processed log-probabilities;
            column ``i`` is the distribution for draft ``i`` (column ``k`` follows the last draft).
        target_ids: `(batch_size, k + 1)` the large model's own choice at each column.
        rollback_threshold: alpha_RB.
    Returns:
        n_accepted: `(batch_size,)` drafts kept (== ``n_drafted`` when nothing is rolled back).
        is_rollback: `(batch_size,)` bool, whether a draft was rolled back.
    """
    k = draft_ids.shape[1]
    if k == 0:  # every row fell back before drafting
        return n_drafted, torch.zeros_like(n_drafted, dtype=torch.bool)
    is_real = torch.arange(k, device=draft_ids.device) < n_drafted[:, None]  # [B, k]
    nll = -target_logprobs[:, :k].gather(-1, draft_ids[..., None]).squeeze(-1)  # [B, k]
    is_bad = is_real & (draft_ids != target_ids[:, :k]) & (nll > rollback_threshold)  # [B, k]
    is_rollback = is_bad.any(dim=-1)
    first_bad = is_bad.int().argmax(dim=-1)  # 0 where nothing is bad, masked below
    n_accepted = torch.where(is_rollback, first_bad, n_drafted)
    return n_accepted, is_rollback

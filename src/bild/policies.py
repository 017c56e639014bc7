"""BiLD's fallback and rollback decisions as pure tensor functions (no model calls)."""

from __future__ import annotations

import torch

NLL, MARGIN = "nll", "margin"
ROLLBACK_RULES = (NLL, MARGIN)  # what rollback_threshold bounds: see `draft_scores`


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
    rule: str = NLL,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each row's drafts stop being acceptable.

    Draft ``d_i`` is rolled back when the large model would have chosen another token there and its score
    (`draft_scores`: by default its cross-entropy under the large model, ``-log p_i(d_i)``) exceeds alpha_RB.
    The first such draft and everything after it are discarded.

    Args:
        draft_ids: `(batch_size, k)` drafted tokens; row ``b`` uses its first ``n_drafted[b]``.
        n_drafted: `(batch_size,)` number of real drafts per row.
        target_logprobs: `(batch_size, k + 1, vocab_size)` large-model processed log-probabilities;
            column ``i`` is the distribution for draft ``i`` (column ``k`` follows the last draft).
        target_ids: `(batch_size, k + 1)` the large model's own choice at each column.
        rollback_threshold: alpha_RB.
        rule: what alpha_RB bounds, ``"nll"`` or ``"margin"`` (`draft_scores`).
    Returns:
        n_accepted: `(batch_size,)` drafts kept (== ``n_drafted`` when nothing is rolled back).
        is_rollback: `(batch_size,)` bool, whether a draft was rolled back.
    """
    k = draft_ids.shape[1]
    if k == 0:  # every row fell back before drafting
        return n_drafted, torch.zeros_like(n_drafted, dtype=torch.bool)
    is_real = torch.arange(k, device=draft_ids.device) < n_drafted[:, None]  # [B, k]
    is_bad = is_real & (draft_ids != target_ids[:, :k])  # [B, k]
    if rollback_threshold > 0:  # 0: lossless under either rule, exact ties included
        is_bad &= draft_scores(target_logprobs[:, :k], draft_ids, rule, are_logprobs=True) > rollback_threshold
    is_rollback = is_bad.any(dim=-1)
    first_bad = is_bad.int().argmax(dim=-1)  # 0 where nothing is bad, masked below
    n_accepted = torch.where(is_rollback, first_bad, n_drafted)
    return n_accepted, is_rollback


def find_rollback_sampled(
    draft_ids: torch.Tensor,
    n_drafted: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    rollback_threshold: float,
    generator: torch.Generator | None = None,
    rule: str = NLL,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sampling counterpart of `find_rollback`, which also draws the large model's next token.

    With ``rollback_threshold > 0`` (BiLD): draft ``d_i`` is rolled back when its score (`draft_scores`: by
    default its cross-entropy under the large model, ``-log p_i(d_i)``) exceeds alpha_RB; the next token is
    drawn from ``p`` at the first rolled-back draft (or after the last draft when none is).
    With ``rollback_threshold == 0``: exact speculative sampling (Leviathan et al., 2023; Chen et al., 2023).
    Draft ``d_i`` is kept with probability ``min(1, p_i(d_i) / q_i(d_i))``; at the first rejection the next
    token is drawn from ``max(0, p_i - q_i)`` renormalized, so every token is distributed exactly as ``p``.

    Args:
        draft_ids: `(batch_size, k)` drafted tokens; row ``b`` uses its first ``n_drafted[b]``.
        n_drafted: `(batch_size,)` number of real drafts per row.
        draft_probs: `(batch_size, k, vocab_size)` processed small-model probabilities the drafts were drawn from.
        target_probs: `(batch_size, k + 1, vocab_size)` processed large-model probabilities.
        rollback_threshold: alpha_RB.
        generator: source of randomness (None: torch's global generator, like stock sampling).
        rule: what alpha_RB bounds when it is above 0, ``"nll"`` or ``"margin"`` (`draft_scores`).
    Returns:
        n_accepted: `(batch_size,)` drafts kept.
        is_rollback: `(batch_size,)` bool, whether a draft was rolled back (rejected).
        next_ids: `(batch_size,)` the large model's token after the kept drafts.
    """
    batch_size, k = draft_ids.shape
    batch = torch.arange(batch_size, device=draft_ids.device)
    is_real = torch.arange(k, device=draft_ids.device) < n_drafted[:, None]  # [B, k]
    p_drafts = target_probs[:, :k].gather(-1, draft_ids[..., None]).squeeze(-1)  # [B, k]
    if rollback_threshold == 0:
        q_drafts = draft_probs.gather(-1, draft_ids[..., None]).squeeze(-1)  # [B, k], > 0: drafts came from q
        u = torch.rand(p_drafts.shape, generator=generator, device=p_drafts.device)
        is_bad = is_real & (u * q_drafts > p_drafts)  # reject unless u <= p / q
    else:
        is_bad = is_real & (draft_scores(target_probs[:, :k], draft_ids, rule, are_logprobs=False) > rollback_threshold)
    is_rollback = is_bad.any(dim=-1)
    first_bad = is_bad.int().argmax(dim=-1) if k > 0 else n_drafted  # k == 0: every row fell back at once
    n_accepted = torch.where(is_rollback, first_bad, n_drafted)

    next_probs = target_probs[batch, n_accepted]  # [B, V]
    if rollback_threshold == 0 and k > 0:
        residual = (next_probs - draft_probs[batch, n_accepted.clamp(max=k - 1)]).clamp(min=0)
        # p == q leaves no residual, but then a rejection has probability 0; guard against rounding
        use_residual = is_rollback & (residual.sum(dim=-1) > 0)
        next_probs = torch.where(use_residual[:, None], residual, next_probs)
    next_ids = sample(next_probs, generator)
    return n_accepted, is_rollback, next_ids


def draft_scores(target: torch.Tensor, draft_ids: torch.Tensor, rule: str, are_logprobs: bool) -> torch.Tensor:
    """`(batch_size, k)` how implausible the large model finds each draft, the score alpha_RB bounds.

    ``"nll"`` (the paper's): the draft's cross-entropy, ``-log p(d)``. ``"margin"``: how far its log-probability
    falls below the large model's top token's, ``log max p - log p(d)``: the same where the large model is sure of
    its top token, looser where it is not (a draft nearly as likely as the top one stays, however flat ``p``).

    Args:
        target: `(batch_size, k, vocab_size)` the large model's log-probabilities (``are_logprobs``) or
            probabilities at the drafts; of probabilities only the few that matter are logged.
        draft_ids: `(batch_size, k)`.
    """
    at_drafts = target.gather(-1, draft_ids[..., None]).squeeze(-1)  # [B, k]
    top = target.max(dim=-1).values if rule == MARGIN else None  # [B, k]
    if not are_logprobs:  # log is monotone: the log of the top probability is the top log-probability
        at_drafts, top = at_drafts.log(), None if top is None else top.log()
    return -at_drafts if top is None else top - at_drafts


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from `(batch_size, vocab_size)` unnormalized non-negative weights."""
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)

"""The BiLD loop: the small model drafts, the large model verifies in one forward, bad drafts roll back."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch
from transformers import PreTrainedModel, StoppingCriteriaList

from .cache import BildCache, TrackedCache
from .compat import (
    absolute_positions,
    attention_window,
    embeds_decoder_positions,
    has_recurrent_state,
    has_relative_positions,
    recurrent_rollback_obstacle,
    relative_positions,
    takes_custom_4d_mask,
    takes_forward_arg,
    tree_attention_mask,
)
from .config import BildSettings
from .context_drafts import context_draft_probs, propose_context_drafts
from .drafters import reading_text
from .lean import LeanForward, lean_forward
from .policies import find_rollback, find_rollback_sampled, sample, should_fall_back
from .schedule import AUTO, CandidateRule, DraftCosts, DraftSchedule
from .state import STATELESS_CRITERIA, BatchState, DecoderInputs, Drafts, Sampling, TokenRules
from .stats import BildStats

# B: batch rows, T: sequence length, L: chunk fed in one forward, K: most drafts in a round, V: vocabulary.


class Decoder:
    """One model as the loop sees it: its cache, its encoder output, and a forward over unseen tokens."""

    def __init__(
        self, model: PreTrainedModel, cache: TrackedCache, vocab_size: int, encoder_kwargs: dict | None = None,
        lean: LeanForward | None = None,
    ):  # fmt: skip
        self.model = model
        self.lean = lean  # the model's forward without transformers' machinery (the Llama family: `bild.lean`)
        self.cache = cache
        self.vocab_size = vocab_size
        self.encoder_kwargs = encoder_kwargs or {}
        self.is_encoder_decoder = model.config.is_encoder_decoder
        self.places_by_slot = has_relative_positions(model)  # T5: positions come from cache slots
        # a row's slots are kept contiguous where slot distances matter: T5's positions, attention windows
        self.aligns_slots = self.places_by_slot or attention_window(model) is not None
        self.embeds_positions = embeds_decoder_positions(model)  # BART: from the cache length (rows run alone)
        self.takes_position_ids = takes_forward_arg(model, "position_ids")
        self.takes_logits_to_keep = takes_forward_arg(model, "logits_to_keep")
        self.keep_logits = False  # keep the last forward's logits over the model's whole vocabulary
        self.last_logits: torch.Tensor | None = None  # [B, n_targets, V_model] float32, when keep_logits
        self.sibling_logits: torch.Tensor | None = None  # [B, S, V_model] float32, after a forward with siblings

    def forward(
        self, state: BatchState, is_advancing: torch.Tensor, first_target: torch.Tensor, n_targets: int,
        siblings: torch.Tensor | None = None, n_siblings: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Read every token of the ``is_advancing`` rows the model has not seen yet; return next-token logits.

        Args:
            is_advancing: `(batch_size,)` bool, rows to advance; the others sit this forward out.
            first_target: `(batch_size,)` the first sequence index to predict.
            n_targets: number of consecutive indices to predict from ``first_target``.
            siblings: `(batch_size, S)` alternatives to each row's last token: fed in the same forward at the same
                position (position ids, T5's relative bias or BART's position embeddings: see `sibling_obstacle`),
                each seeing the tokens before that one and not each other (a tree, through a 4D attention mask).
                Row ``b`` uses its first ``n_siblings[b]``. Their next-token logits land in
                ``self.sibling_logits`` `(batch_size, S, V_model)`, and their cache slots hold the last token's
                index until `TrackedCache.keep_sibling` settles which one stays.
        Returns:
            `(batch_size, n_targets, vocab_size)` float32 logits; column ``i`` predicts index
            ``first_target + i``. Columns past a row's last fed token hold garbage.
        """
        cache = self.cache
        if self.is_encoder_decoder or self.aligns_slots:  # T5 and windowed rows line up; BART closes a sibling's gap
            cache.right_align()
        start = cache.n_seen  # [B]
        n_feed = torch.where(is_advancing, state.lengths - start, 0)  # [B]
        chunk_len = int(n_feed.max())
        offsets = torch.arange(chunk_len, device=start.device)  # [L]
        index = start[:, None] + offsets  # [B, L] sequence index of each chunk position
        is_fed = offsets < n_feed[:, None]  # [B, L]
        input_ids = state.tokens_at(index).masked_fill(~is_fed, 0)  # [B, L]
        slot_index = torch.where(is_fed & (index >= state.n_pads[:, None]), index, -1)  # [B, L]

        # offsets (in the chunk) of the tokens whose outputs predict first_target, first_target + 1, ...
        target_offsets = (first_target - 1 - start)[:, None] + torch.arange(n_targets, device=start.device)
        n_keep = chunk_len - int(target_offsets[is_advancing, 0].min())  # logits needed from the chunk's end

        positions = index - state.n_pads[:, None]  # [B, L]
        n_tree = 0 if siblings is None else siblings.shape[1]
        if n_tree:
            input_ids, slot_index, positions, mask = self._with_siblings(
                state, is_advancing, n_feed, input_ids, slot_index, positions, siblings, n_siblings
            )  # fmt: skip
        else:
            mask = cache.attention_mask(slot_index)
        kwargs = {cache.kwarg: cache.kv, "use_cache": True, **self.encoder_kwargs}
        kwargs.update(self._input_kwargs(input_ids, mask, positions))
        if self.takes_logits_to_keep:
            kwargs["logits_to_keep"] = n_keep + n_tree
        cache.record_from(index, is_fed, state.round_start)
        placing = self._placing_siblings(n_tree, n_feed, chunk_len, positions)
        with placing, reading_text(self.model, state.token_ids, state.lengths):  # a pruned drafter head reads its rows
            logits = None
            if self.lean is not None and not n_tree:  # None where its cache is not a plain dynamic one
                keep = kwargs.get("logits_to_keep")
                logits = self.lean(self.model, input_ids, mask, positions.clamp(min=0), cache.kv, keep)
            if logits is None:
                logits = self.model(**kwargs).logits  # [B, L + S or n_keep + S, V_model]
        cache.append(slot_index, torch.where(is_advancing, state.lengths, start))
        if n_tree:
            self.sibling_logits = logits[:, -n_tree:].float()
            logits = logits[:, :-n_tree]

        columns = (target_offsets - (chunk_len - logits.shape[1])).clamp(0, logits.shape[1] - 1)  # [B, n_targets]
        batch = torch.arange(logits.shape[0], device=logits.device)[:, None]
        if not self.keep_logits:
            return logits[batch, columns, : self.vocab_size].float()
        self.last_logits = logits[batch, columns].float()
        return self.last_logits[..., : self.vocab_size]

    def _with_siblings(self, state, is_advancing, n_feed, input_ids, slot_index, positions, siblings, n_siblings):
        """The chunk with sibling columns after it, and a 4D mask in which each sibling sees what the row's last
        token sees (everything before it) and itself."""
        batch_size, chunk_len = input_ids.shape
        n_tree = siblings.shape[1]
        is_sibling = is_advancing[:, None] & (torch.arange(n_tree, device=siblings.device) < n_siblings[:, None])
        last = state.lengths - 1  # [B] sequence index of the token the siblings stand in for
        input_ids = torch.cat([input_ids, siblings.masked_fill(~is_sibling, 0)], dim=1)  # [B, L + S]
        slot_index = torch.cat([slot_index, torch.where(is_sibling, last[:, None], -1)], dim=1)
        positions = torch.cat([positions, (last - state.n_pads)[:, None].expand(-1, n_tree)], dim=1)

        n_cached, n_query = self.cache.length, chunk_len + n_tree
        keys = torch.arange(n_query, device=siblings.device)
        allowed = keys[None, :] <= keys[:, None]  # [Q, Q] causal within the chunk
        allowed[chunk_len:, chunk_len:] = torch.eye(n_tree, dtype=torch.bool, device=siblings.device)
        allowed = allowed[None].repeat(batch_size, 1, 1)  # [B, Q, Q]
        last_column = (n_feed - 1).clamp(min=0)  # [B] the replaced token's chunk column
        rows = torch.arange(batch_size, device=siblings.device)
        allowed[rows, chunk_len:, last_column] = allowed[rows, chunk_len:, last_column] & (n_feed == 0)[:, None]
        is_visible = torch.cat([self.cache.slot_index, slot_index], dim=1) >= 0  # [B, S_cache + Q]
        allowed = torch.cat(
            [is_visible[:, None, :n_cached].expand(-1, n_query, -1), allowed & is_visible[:, None, n_cached:]], dim=2
        )  # [B, Q, S_cache + Q]
        allowed[:, keys, n_cached + keys] = True  # every query sees itself: no row of the mask is empty
        return input_ids, slot_index, positions, tree_attention_mask(self.model, allowed)

    def _placing_siblings(self, n_tree: int, n_feed: torch.Tensor, chunk_len: int, positions: torch.Tensor):
        """Where positions do not come from ``position_ids``, the context in which siblings stand at the replaced
        token's place rather than at their own slots: T5's relative bias, or (a batch of one) BART's position
        embeddings."""
        if n_tree and self.places_by_slot:
            return relative_positions(self.model, *self._slot_positions(n_feed, chunk_len, n_tree))
        if n_tree and self.embeds_positions:
            return absolute_positions(self.model, positions[0])
        return contextlib.nullcontext()

    def _slot_positions(self, n_feed: torch.Tensor, chunk_len: int, n_tree: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For a right-aligned cache: each query's and each key's position, a slot's own index except for the
        siblings, which stand at the row's last fed token. `(batch_size, L + S)` and `(batch_size, S_cache + L + S)`."""
        n_cached = self.cache.length
        queries = n_cached + torch.arange(chunk_len + n_tree, device=n_feed.device).repeat(n_feed.shape[0], 1)
        queries[:, chunk_len:] = (n_cached + n_feed - 1)[:, None]
        cached = torch.arange(n_cached, device=n_feed.device).expand(n_feed.shape[0], -1)
        return queries, torch.cat([cached, queries], dim=1)

    def _input_kwargs(self, input_ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor) -> dict:
        if self.is_encoder_decoder:
            if mask is not None and mask.dim() == 2 and not self.places_by_slot:
                raise RuntimeError("bild internal error: this decoder cannot skip cache slots; decode rows alone.")
            return {"decoder_input_ids": input_ids, "decoder_attention_mask": mask}
        kwargs = {"input_ids": input_ids, "attention_mask": mask}
        if self.takes_position_ids:  # those that don't are only ever given batches of one, without gaps
            kwargs["position_ids"] = positions.clamp(min=0)
        return kwargs


def apply_processors(
    rules: TokenRules, state: BatchState, logits: torch.Tensor, target_index: torch.Tensor, is_real: torch.Tensor
) -> torch.Tensor:
    """Apply the logits processors to each real column of `(batch_size, n, vocab_size)` logits.

    Column ``i`` of row ``b`` predicts index ``target_index[b, i]`` and is processed with prefix
    ``token_ids[b, :target_index[b, i]]``, exactly as stock generate() would at that step. Processors may
    keep per-row state (e.g. each prompt's padding), so they always see the whole batch: one call per
    distinct prefix length, whose outputs are kept for the rows at that length.
    """
    if not rules.logits_processor:
        return logits
    scores = logits.clone()
    batch = torch.arange(logits.shape[0], device=logits.device)
    for length in torch.unique(target_index[is_real]).tolist():
        is_at = is_real & (target_index == length)  # [B, n], at most one column per row
        has_column = is_at.any(dim=1)
        column = is_at.int().argmax(dim=1)  # [B]
        processed = rules.logits_processor(state.token_ids[:, :length], logits[batch, column].clone())  # [B, V]
        scores[batch[has_column], column[has_column]] = processed[has_column]
    return scores


def draft(
    small: Decoder, state: BatchState, rules: TokenRules, sampling: Sampling, settings: BildSettings, cap: int,
    candidates: CandidateRule | None = None, context_caps: torch.Tensor | None = None,
) -> Drafts:  # fmt: skip
    """Step 1: the small model drafts until it is unsure, drafts ``cap`` tokens, or reaches EOS or the length limit.

    Drafts are written into ``state.token_ids`` (tentatively) and ``state.lengths`` grows with them. With
    ``candidates`` (default: ``settings.n_candidates`` for every unsure row) >= 1, the token the small model was
    unsure of is written after them too, for the large model to check (it is not a draft: `Drafts.has_candidate`);
    with K > 1 candidates, its K - 1 next-best tokens are kept in `Drafts.siblings`, to be checked at the same
    position.
    """
    candidates = candidates or CandidateRule(settings.n_candidates)
    start = state.lengths.clone()
    # free drafts first, no model call: what followed the row's last n-gram earlier in its text (prompt lookup)
    n_context, ends_in_eos = propose_context_drafts(state, rules, settings, context_caps)
    is_drafting = ~state.finished & ~ends_in_eos & (state.lengths < rules.max_length) & (cap > 0)
    drafts = Drafts.empty(start)
    drafts.n_context = drafts.n_proposed = n_context
    draft_probs = []
    checked = None  # greedy: the small model's first step, from the forward that checked the context drafts
    if bool((n_context > 0).any()) and not sampling.do_sample and bool(is_drafting.any()) and isinstance(small, Decoder):
        checked = check_context_drafts(small, state, rules, settings, start, drafts, is_drafting)
    for _ in range(cap):
        if not bool(is_drafting.any()):
            break
        if checked is not None:
            scores, checked = checked, None
        else:
            logits = small.forward(state, is_drafting, first_target=state.lengths, n_targets=1)  # [B, 1, V]
            drafts.n_steps += is_drafting
            scores = apply_processors(rules, state, logits, state.lengths[:, None], is_drafting[:, None])[:, 0]
        probs = scores.softmax(dim=-1)  # [B, V]
        is_unsure = is_drafting & should_fall_back(probs, settings.fallback_threshold)
        drafts.fell_back |= is_unsure
        n_candidates = torch.zeros_like(start)
        if bool(is_unsure.any()):
            n_fed = state.lengths - start + 1  # [B] each row's part of the large model's chunk, the unsure token in
            n_candidates = torch.where(is_unsure, candidates.per_row(probs, n_fed), 0)  # [B]
        is_written = is_drafting & (~is_unsure | (n_candidates > 0))
        token_ids = probs.argmax(dim=-1)  # [B]
        if sampling.do_sample:
            draft_probs.append(probs)
            token_ids[is_written] = sample(probs[is_written], sampling.generator)
        if candidates.most > 1 and bool((n_candidates > 1).any()):
            add_siblings(drafts, probs, token_ids, n_candidates > 1, candidates.most, n_candidates - 1)
        state.write(is_written, state.lengths, token_ids)
        state.lengths += is_written
        drafts.has_candidate |= is_unsure & is_written
        is_drafting &= ~is_unsure & ~rules.is_eos(token_ids) & (state.lengths < rules.max_length)
    drafts.n_drafted = state.lengths - start - drafts.has_candidate.long()
    if sampling.do_sample:
        # row b's draft i was drawn at step i: drafting only ever stops, so step i never skips a drafting row
        draft_probs = draft_probs[: int(drafts.n_drafted.max())]
        drafts.probs = torch.stack(draft_probs, dim=1) if draft_probs else probs_placeholder(start, rules)
        if bool(n_context.any()):  # a row's small steps come after its context drafts, each a point mass
            drafts.probs = context_draft_probs(drafts.probs, state, start, n_context, drafts.n_drafted)
    state.stats.small_forwards += drafts.n_steps
    return drafts


def check_context_drafts(
    small: Decoder, state: BatchState, rules: TokenRules, settings: BildSettings, start: torch.Tensor, drafts: Drafts,
    is_drafting: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """Greedy: one small forward reads a row's context drafts and keeps them up to the first one it would not have
    drafted itself: another token than its own choice, or one where it is unsure (below the fallback threshold).
    The rest are dropped from the tokens and the small cache. Returns the small model's processed scores
    `(batch_size, V)` for the token after the kept ones: its next step, which this forward already made, and from
    which the row drafts on as usual (an unsure step ends the round with its candidates at that position).

    So a row drafts what it would have drafted without context drafts, but reads the stretch it copied in one
    forward instead of a step per token. A context draft the small model disagrees with is mostly one the large
    model rejects too; one it doubts is where the large model rolls back most, and there the fallback's
    candidates (``fallback_candidates``) give the large model more than the one copied token to choose from.
    """
    n_context = torch.where(is_drafting, drafts.n_context, 0)
    n_columns = int(n_context.max()) + 1
    columns = torch.arange(n_columns, device=start.device)
    target_index = start[:, None] + columns  # [B, C]
    logits = small.forward(state, is_drafting, first_target=start, n_targets=n_columns)  # [B, C, V]
    drafts.n_steps += is_drafting
    is_real = is_drafting[:, None] & (columns <= n_context[:, None])
    scores = apply_processors(rules, state, logits, target_index, is_real)  # [B, C, V]
    is_unsure = should_fall_back(scores.softmax(dim=-1), settings.fallback_threshold)  # [B, C]
    is_other = (scores.argmax(dim=-1) != state.tokens_at(target_index)) | is_unsure
    is_other &= columns < n_context[:, None]
    n_kept = torch.where(is_other.any(dim=1), is_other.int().argmax(dim=1), n_context)  # [B]
    drafts.n_context = torch.where(is_drafting, n_kept, drafts.n_context)
    state.lengths = torch.where(is_drafting, start + n_kept, state.lengths)
    small.cache.discard_from(state.lengths, settle=False)
    return scores[torch.arange(len(start), device=start.device), n_kept]


def add_siblings(
    drafts: Drafts, probs: torch.Tensor, candidate_ids: torch.Tensor, is_unsure: torch.Tensor, most: int,
    n_siblings: torch.Tensor,
) -> None:  # fmt: skip
    """Keep, for the ``is_unsure`` rows, ``n_siblings[b]`` (at most ``most - 1``) of the small model's most likely
    tokens other than the candidate written there (greedy: its 1st; sampling: the one drawn)."""
    if drafts.siblings is None:
        drafts.siblings = torch.zeros(len(probs), most - 1, dtype=torch.long, device=probs.device)
        drafts.n_siblings = torch.zeros(len(probs), dtype=torch.long, device=probs.device)
    top = probs.topk(most, dim=-1)  # [B, K]
    is_candidate = top.indices == candidate_ids[:, None]
    order = is_candidate.long().argsort(dim=1, stable=True)[:, : most - 1]  # the candidate, if among them, last
    others, other_probs = top.indices.gather(1, order), top.values.gather(1, order)  # [B, K - 1]
    n_possible = torch.minimum((other_probs > 0).sum(dim=-1), n_siblings)  # never a token ruled out
    drafts.siblings[is_unsure] = others[is_unsure]
    drafts.n_siblings[is_unsure] = n_possible[is_unsure]


def probs_placeholder(start: torch.Tensor, rules: TokenRules) -> torch.Tensor:
    """`(batch_size, 0, vocab_size)`: the draft distributions of a round in which no row drafted."""
    return torch.zeros(len(start), 0, rules.vocab_size, device=start.device)


def verify(
    large: Decoder, state: BatchState, rules: TokenRules, start: torch.Tensor, drafts: Drafts
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2: one large-model forward over every unseen token, drafts (and the unsure candidate) included.

    Returns `(batch_size, K + 1, vocab_size)` processed scores, and the raw logits they came from (over the
    large model's whole vocabulary when ``large.keep_logits``); column ``i`` is the large model's distribution
    for sequence index ``start + i`` (column ``n_drafted`` follows the last draft).
    """
    n_columns = drafts.n_columns
    n_real = drafts.n_drafted + drafts.has_candidate  # [B] tokens to check per row
    is_verifying = ~state.finished
    tree = dict(siblings=drafts.siblings, n_siblings=drafts.n_siblings) if drafts.has_siblings else {}
    logits = large.forward(state, is_verifying, first_target=start, n_targets=n_columns, **tree)  # [B, K+1, V]
    state.stats.large_forwards += is_verifying
    columns = torch.arange(n_columns, device=start.device)
    target_index = start[:, None] + columns  # [B, K+1]
    is_real = is_verifying[:, None] & (columns <= n_real[:, None])
    raw_logits = large.last_logits if getattr(large, "keep_logits", False) else logits
    if tree:
        process_siblings(large, state, rules, drafts, is_verifying)
    return apply_processors(rules, state, logits, target_index, is_real), raw_logits


def process_siblings(large: Decoder, state: BatchState, rules: TokenRules, drafts: Drafts, is_verifying) -> None:
    """The large model's processed scores after each sibling, each seen with that sibling in its prefix."""
    raw = large.sibling_logits  # [B, S, V_large]
    last = state.lengths - 1  # [B] where the unsure token, and each sibling in its place, stands
    unsure_ids = state.tokens_at(last[:, None])[:, 0]
    scores = raw[..., : rules.vocab_size].clone()
    for j in range(drafts.siblings.shape[1]):
        is_real = is_verifying & (drafts.n_siblings > j)
        state.write(is_real, last, drafts.siblings[:, j])
        scores[:, j] = apply_processors(rules, state, scores[:, j : j + 1], state.lengths[:, None], is_real[:, None])[:, 0]
        state.write(is_real, last, unsure_ids)
    drafts.sibling_scores = scores
    drafts.sibling_logits = raw if large.keep_logits else scores


def find_rollback_point(
    state: BatchState, start: torch.Tensor, drafts: Drafts, target_scores: torch.Tensor, sampling: Sampling,
    settings: BildSettings,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Step 3: drafts kept per row, whether a draft was rolled back, and the large model's next token.

    The unsure candidate after a row's drafts is kept only when every draft is and it is exactly the
    large model's own next token; the large model's token after it then comes free.
    Returns three `(batch_size,)` tensors: ``n_accepted``, ``is_rollback``, ``next_ids``.
    """
    n_drafted = drafts.n_drafted
    k = int(n_drafted.max())  # most drafts in a row; a candidate may add one more column
    columns = torch.arange(target_scores.shape[1], device=start.device)  # [C]
    token_ids = state.tokens_at(start[:, None] + columns)  # [B, C] drafts, then the candidate or garbage
    if sampling.do_sample:
        target_probs = target_scores.softmax(dim=-1)  # [B, C, V]
        n_accepted, is_rollback, next_ids = find_rollback_sampled(
            token_ids[:, :k], n_drafted, drafts.probs, target_probs[:, : k + 1], settings.rollback_threshold,
            sampling.generator, settings.rollback_rule,
        )  # fmt: skip
    else:
        target_ids = target_scores.argmax(dim=-1)  # [B, C]
        n_accepted, is_rollback = find_rollback(
            token_ids[:, :k], n_drafted, target_scores[:, : k + 1].log_softmax(dim=-1), target_ids[:, : k + 1],
            settings.rollback_threshold, settings.rollback_rule,
        )  # fmt: skip
        next_ids = target_ids.gather(1, n_accepted[:, None]).squeeze(1)
    candidate_ids = token_ids.gather(1, n_drafted[:, None]).squeeze(1)  # [B]
    is_kept = drafts.has_candidate & ~is_rollback & (candidate_ids == next_ids)
    if bool(is_kept.any()):
        after = (n_drafted + 1).clamp(max=target_scores.shape[1] - 1)[:, None]  # [B, 1]
        if sampling.do_sample:
            after_ids = sample(target_probs.gather(1, after[..., None].expand(-1, -1, target_probs.shape[-1]))[:, 0],
                               sampling.generator)  # fmt: skip
        else:
            after_ids = target_ids.gather(1, after).squeeze(1)
        n_accepted = n_accepted + is_kept.long()
        next_ids = torch.where(is_kept, after_ids, next_ids)
    if drafts.has_siblings:
        n_accepted, next_ids = choose_sibling(drafts, n_accepted, is_rollback, is_kept, next_ids, sampling)
    return n_accepted, is_rollback, next_ids


def choose_sibling(
    drafts: Drafts, n_accepted, is_rollback, is_kept, next_ids, sampling: Sampling
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Where every draft stood and the unsure token did not, keep the sibling that is the large model's own
    token there (if any); the large model's token after that sibling then comes free.

    Exact under sampling too: ``next_ids`` was drawn from the large model's distribution whatever the
    siblings were, and the token after a kept sibling is drawn from its distribution after that sibling.
    """
    n_tree = drafts.siblings.shape[1]
    is_real = torch.arange(n_tree, device=next_ids.device) < drafts.n_siblings[:, None]  # [B, S]
    is_match = is_real & (drafts.siblings == next_ids[:, None])  # at most one: siblings are distinct
    is_open = drafts.has_candidate & ~is_rollback & ~is_kept & (n_accepted == drafts.n_drafted)
    is_chosen = is_open & is_match.any(dim=1)  # [B]
    kept = torch.where(is_chosen, is_match.int().argmax(dim=1), -1)  # [B]
    drafts.kept_sibling = kept
    after_scores = drafts.sibling_scores[torch.arange(len(kept), device=kept.device), kept.clamp(min=0)]  # [B, V]
    if sampling.do_sample:
        after_ids = next_ids.clone()
        if bool(is_chosen.any()):
            after_ids[is_chosen] = sample(after_scores[is_chosen].softmax(dim=-1), sampling.generator)
    else:
        after_ids = after_scores.argmax(dim=-1)
    return n_accepted + is_chosen.long(), torch.where(is_chosen, after_ids, next_ids)


def use_chosen_siblings(
    state: BatchState, caches: BildCache, start: torch.Tensor, drafts: Drafts, scores: torch.Tensor, logits: torch.Tensor
) -> None:  # fmt: skip
    """Put each chosen sibling where the unsure token stood: in the tokens, the large model's cache, and the
    verification's columns (column ``n_drafted + 1`` now follows the sibling)."""
    kept = drafts.kept_sibling
    is_chosen = kept >= 0
    position = start + drafts.n_drafted  # [B]
    caches.large.keep_sibling(drafts.siblings.shape[1], kept, position)
    if not bool(is_chosen.any()):
        return
    rows = is_chosen.nonzero().squeeze(1)
    state.write(is_chosen, position, drafts.siblings.gather(1, kept.clamp(min=0)[:, None]).squeeze(1))
    after = drafts.n_drafted[rows] + 1
    scores[rows, after] = drafts.sibling_scores[rows, kept[rows]]
    logits[rows, after] = drafts.sibling_logits[rows, kept[rows]]


def accept(
    state: BatchState, caches: BildCache, rules: TokenRules, start: torch.Tensor, n_accepted: torch.Tensor,
    next_ids: torch.Tensor,
) -> None:  # fmt: skip
    """Step 4: keep the accepted drafts, append the large model's token, roll both caches back to match."""
    is_active = ~state.finished
    n_kept = torch.where(is_active, start + n_accepted, state.lengths)  # [B]
    has_room = is_active & (n_kept < rules.max_length)
    state.write(has_room, n_kept, next_ids)
    state.lengths = n_kept + has_room.long()
    caches.discard_from(n_kept)


def stop_rows(state: BatchState, rules: TokenRules, start: torch.Tensor, outputs: StepOutputs | None = None) -> None:
    """Step 5: run the stopping criteria after every new token; a row ends at the first token that stops it.

    Criteria only ever see final tokens: stock generate() shows them every row at one length, each row's
    tokens so far (padding after the end of a finished row), once per length, with ``scores`` the steps so
    far (None unless output_scores). Stateless criteria (EOS, max length, stop strings, max time) judge each
    row alone, so they run on every new token at once, like `apply_processors`, once per distinct length;
    rows not at that length are shown padded after their end and their answers are ignored. Any other
    criterion may remember rows (lm-eval's MultiTokenEOSCriteria keeps a done flag per row), so it runs in
    step, as in stock: at a length once every row has reached it or ended. A row ahead may then be ended
    by it at a token it has already passed (the tokens after it are dropped).
    """
    stateless, in_step = split_criteria(rules.stopping_criteria)
    is_checking = ~state.finished
    if stateless and bool(is_checking.any()):
        for length in range(int(start[is_checking].min()) + 1, int(state.lengths[is_checking].max()) + 1):
            is_at = is_checking & (start < length) & (length <= state.lengths)  # rows with a new token at length-1
            if not bool(is_at.any()):
                continue
            is_stopped = is_at & stateless(final_tokens(state, rules, length), None)
            state.lengths = torch.where(is_stopped, length, state.lengths)
            state.finished |= is_stopped
            is_checking &= ~is_stopped
    state.finished |= state.lengths >= rules.max_length
    if in_step:
        stop_rows_in_step(state, rules, in_step, outputs)


def split_criteria(criteria: StoppingCriteriaList) -> tuple[StoppingCriteriaList, StoppingCriteriaList]:
    """``(stateless, in_step)``: the criteria that judge each row alone (`STATELESS_CRITERIA`), and the rest."""
    stateless = StoppingCriteriaList(c for c in criteria if isinstance(c, STATELESS_CRITERIA))
    return stateless, StoppingCriteriaList(c for c in criteria if not isinstance(c, STATELESS_CRITERIA))


def stop_rows_in_step(
    state: BatchState, rules: TokenRules, criteria: StoppingCriteriaList, outputs: StepOutputs | None
) -> None:
    """Show ``criteria`` the whole batch at every length every row has reached (or ended before) and not yet shown."""
    is_unfinished = ~state.finished
    ready = int(state.lengths[is_unfinished].min() if bool(is_unfinished.any()) else state.lengths.max())
    for length in range(state.checked_length + 1, ready + 1):
        scores = outputs.scores_until(length) if outputs is not None else None
        is_stopped = (state.lengths >= length) & criteria(final_tokens(state, rules, length), scores)
        state.lengths = torch.where(is_stopped, length, state.lengths)
        state.finished |= is_stopped
    state.checked_length = max(state.checked_length, ready)


def final_tokens(state: BatchState, rules: TokenRules, length: int) -> torch.Tensor:
    """`(batch_size, length)` each row's tokens up to ``length``, padding after its end (a copy)."""
    is_after_end = torch.arange(length, device=state.lengths.device) >= state.lengths[:, None]
    return state.token_ids[:, :length].masked_fill(is_after_end, rules.pad_token_id)


def count_round(state: BatchState, is_active, drafts: Drafts, n_accepted, is_rollback) -> None:
    """Step 6: count this round in the per-row stats (forwards are counted where they happen).

    A checked unsure token (or sibling) counts as a draft (the large model saw it), and as accepted when kept.
    """
    stats = state.stats
    n_siblings = 0 if drafts.n_siblings is None else drafts.n_siblings
    stats.drafted += (drafts.n_drafted + drafts.has_candidate + n_siblings) * is_active
    stats.siblings += n_siblings * is_active
    if drafts.kept_sibling is not None:  # a kept sibling stands at offset n_drafted, if the row got that far
        stats.siblings_kept += (drafts.kept_sibling >= 0) & (n_accepted > drafts.n_drafted) & is_active
    stats.accepted += n_accepted * is_active
    stats.fallbacks += drafts.fell_back & is_active
    stats.rollbacks += is_rollback & is_active
    stats.undrafted += (drafts.n_steps == 0) & is_active
    n_context = drafts.n_context if drafts.n_context is not None else torch.zeros_like(n_accepted)
    stats.context_drafted += n_context * is_active
    stats.context_accepted += torch.minimum(n_accepted, n_context) * is_active  # context drafts come first


def bild_loop(
    large: Decoder, small: Decoder, caches: BildCache, state: BatchState, rules: TokenRules, sampling: Sampling,
    settings: BildSettings, schedule: DraftSchedule, streamer=None, outputs: StepOutputs | None = None,
) -> None:  # fmt: skip
    """Decode until every row stops, one draft -> verify -> rollback -> accept -> stop round at a time.

    ``outputs``, when given, keeps the large model's scores and logits at every final token.
    """
    while not bool(state.finished.all()):
        bild_round(large, small, caches, state, rules, sampling, settings, schedule, streamer, outputs)


def bild_round(
    large: Decoder, small: Decoder, caches: BildCache, state: BatchState, rules: TokenRules, sampling: Sampling,
    settings: BildSettings, schedule: DraftSchedule, streamer=None, outputs: StepOutputs | None = None,
) -> None:  # fmt: skip
    """One round of every unfinished row: draft, verify, roll back, accept, stop, count."""
    is_active = ~state.finished
    start = state.lengths.clone()  # [B] index of this round's first new token
    state.round_start = start
    # 1. The small model drafts until it is unsure (fallback), or N drafts, EOS, the length limit
    context_caps = schedule.context_caps(settings.prompt_lookup_num_tokens, sampling.do_sample)
    drafts = draft(small, state, rules, sampling, settings, schedule.next_cap(is_active), schedule.candidates,
                   context_caps)  # fmt: skip
    # 2. The large model reads everything it has not seen, drafts included, in one forward
    target_scores, target_logits = verify(large, state, rules, start, drafts)  # [B, K+1, V]
    # 3. Roll back at the first draft the large model rejects; its own token follows the kept drafts
    n_accepted, is_rollback, next_ids = find_rollback_point(state, start, drafts, target_scores, sampling, settings)
    if drafts.has_siblings:  # a sibling of the unsure token the large model chose takes its place
        use_chosen_siblings(state, caches, start, drafts, target_scores, target_logits)
    # 4. Keep the accepted tokens; both caches forget the rest
    accept(state, caches, rules, start, n_accepted, next_ids)
    if outputs is not None:
        outputs.record(state, start, is_active, target_scores, target_logits)
    # 5. Stopping criteria (EOS, max length, stop strings, ...) on every new token
    stop_rows(state, rules, start, outputs)
    # 6. Count the round; the schedule learns how far this row's drafts go
    n_accepted = torch.minimum(n_accepted, torch.where(is_active, state.lengths - start, 0).clamp(min=0))
    count_round(state, is_active, drafts, n_accepted, is_rollback)
    # the schedule learns from the small model's own drafts: context drafts come on top of its cap
    n_small = drafts.n_drafted - drafts.n_context
    schedule.update(is_active, drafts.n_steps, n_small, (n_accepted - drafts.n_context).clamp(min=0))
    if settings.prompt_lookup_num_tokens:
        schedule.update_context(is_active, drafts.n_proposed, torch.minimum(n_accepted, drafts.n_context))
    if streamer is not None and int(state.lengths[0] - start[0]) > 0:
        streamer.put(state.token_ids[:1, int(start[0]) : int(state.lengths[0])].cpu())


class StepOutputs:
    """The large model's view at every final token, one `(batch_size, V)` tensor per step: stock generate()'s
    ``scores`` (processed) and ``logits`` (raw).

    Every final token was kept or chosen by a verification forward of the large model, which computed its
    distribution there; step ``t`` holds it for each row's ``t``-th new token. ``V`` is the large model's
    whole vocabulary: raw logits over all its rows, processed scores over the vocabulary both models share
    and -inf beyond it (BiLD never picks those ids). Steps after a row's end hold a distribution certain
    of padding: 0 at ``pad_token_id``, -inf elsewhere (stock holds the model's output over padding there).
    """

    def __init__(self, prompt_length: int, pad_token_id: int, keep_scores: bool, keep_logits: bool):
        self.prompt_length = prompt_length
        self.pad_token_id = pad_token_id
        self.scores: list[torch.Tensor] | None = [] if keep_scores else None
        self.logits: list[torch.Tensor] | None = [] if keep_logits else None

    def record(
        self, state: BatchState, start: torch.Tensor, is_active: torch.Tensor, scores: torch.Tensor,
        logits: torch.Tensor,
    ) -> None:  # fmt: skip
        """Keep this round's columns for the rows' new tokens: column ``i`` of `(B, C, V)` predicts ``start + i``."""
        if not bool(is_active.any()):
            return
        batch = torch.arange(len(start), device=start.device)
        width = logits.shape[-1]
        for index in range(int(start[is_active].min()), int(state.lengths[is_active].max())):
            is_new = is_active & (start <= index) & (index < state.lengths)  # rows whose token at index is new
            if not bool(is_new.any()):
                continue
            column = (index - start).clamp(0, scores.shape[1] - 1)
            for steps, values in ((self.scores, scores), (self.logits, logits)):
                if steps is not None:
                    step = self._step(steps, index - self.prompt_length, len(start), width, values)
                    step[is_new, : values.shape[-1]] = values[batch, column][is_new]
                    step[is_new, values.shape[-1] :] = -torch.inf

    def _step(self, steps: list, t: int, n_rows: int, width: int, like: torch.Tensor) -> torch.Tensor:
        while len(steps) <= t:
            steps.append(ended_rows(n_rows, width, self.pad_token_id, like))
        return steps[t]

    def scores_until(self, length: int) -> tuple[torch.Tensor, ...] | None:
        """The scores of the steps up to sequence length ``length``, as stock passes stopping criteria."""
        return None if self.scores is None else tuple(self.scores[: length - self.prompt_length])

    def finish(self, lengths: torch.Tensor) -> tuple[tuple | None, tuple | None]:
        """``(scores, logits)``: one tensor per step up to the longest row; rows that ended hold padding's."""
        n_steps = int(lengths.max()) - self.prompt_length
        results = []
        for steps in (self.scores, self.logits):
            if steps is None:
                results.append(None)
                continue
            for t, step in enumerate(steps[:n_steps]):
                is_ended = lengths - self.prompt_length <= t
                step[is_ended] = ended_rows(1, step.shape[1], self.pad_token_id, step)
            results.append(tuple(steps[:n_steps]))
        return results[0], results[1]


def ended_rows(n_rows: int, width: int, pad_token_id: int, like: torch.Tensor) -> torch.Tensor:
    """`(n_rows, width)` the step of a row that has ended: 0 at ``pad_token_id``, -inf elsewhere."""
    rows = torch.full((n_rows, width), -torch.inf, dtype=like.dtype, device=like.device)
    if 0 <= pad_token_id < width:
        rows[:, pad_token_id] = 0
    return rows


def concat_steps(parts: list[tuple | None], pad_token_id: int) -> tuple | None:
    """Stack the per-step tensors of rows decoded alone; a row that ended early holds padding's steps."""
    if parts[0] is None:
        return None
    n_steps = max(len(p) for p in parts)
    if n_steps == 0:
        return ()
    like = next(p[0] for p in parts if len(p))
    return tuple(
        torch.cat([p[t] if t < len(p) else ended_rows(1, like.shape[1], pad_token_id, like) for p in parts])
        for t in range(n_steps)
    )


@dataclass
class DecodeResult:
    sequences: torch.Tensor  # [B, T] prompt (or decoder start) + new tokens, padded after each row's end
    stats: BildStats
    caches: BildCache | None  # None when rows were decoded one at a time (or a drafter's own caches)
    scores: tuple[torch.Tensor, ...] | None = None  # [B, V] per step: the large model's processed scores
    logits: tuple[torch.Tensor, ...] | None = None  # [B, V] per step: the large model's raw logits


def decode(
    large_model: PreTrainedModel,
    small_model: PreTrainedModel,
    inputs: DecoderInputs,
    rules: TokenRules,
    settings: BildSettings,
    sampling: Sampling | None = None,
    streamer=None,
    output_scores: bool = False,
    output_logits: bool = False,
) -> DecodeResult:
    """BiLD-decode a batch: all rows together where both models allow it, else each row as a batch of one.

    ``output_scores`` / ``output_logits``: also return the large model's scores / logits at every step.
    """
    sampling = sampling or Sampling()
    settings = settings.for_decoding(sampling.do_sample)
    for model in (large_model, small_model):
        if obstacle := recurrent_rollback_obstacle(model):
            raise NotImplementedError(obstacle)
    check_candidates(settings, large_model, small_model, rules.vocab_size)
    outputs = dict(output_scores=output_scores, output_logits=output_logits)
    if inputs.input_ids.shape[0] == 1 or (can_batch_rows(large_model) and can_batch_rows(small_model)):
        run = start_run(large_model, small_model, inputs, rules, settings, **outputs)
        bild_loop(run.large, run.small, run.caches, run.state, rules, sampling, settings, run.schedule, streamer,
                  run.outputs)  # fmt: skip
        return finish_run(run, rules)
    results = decode_rows(large_model, small_model, inputs, rules, settings, sampling, **outputs)
    width = max(r.sequences.shape[1] for r in results)
    sequences = inputs.input_ids.new_full((len(results), width), rules.pad_token_id)
    for b, result in enumerate(results):
        sequences[b, : result.sequences.shape[1]] = result.sequences[0]
    return DecodeResult(
        sequences, BildStats.concat(r.stats for r in results), caches=None,
        scores=concat_steps([r.scores for r in results], rules.pad_token_id),
        logits=concat_steps([r.logits for r in results], rules.pad_token_id),
    )  # fmt: skip


@dataclass
class Run:
    """One batch decoded together: the two models as the loop sees them, their caches, and where each row stands."""

    large: Decoder
    small: Decoder
    caches: BildCache
    state: BatchState
    schedule: DraftSchedule
    outputs: StepOutputs | None  # the large model's scores and logits at each final token, when asked for
    prompt_length: int


def start_run(
    large_model: PreTrainedModel, small_model: PreTrainedModel, inputs: DecoderInputs, rules: TokenRules,
    settings: BildSettings, output_scores: bool = False, output_logits: bool = False,
) -> Run:  # fmt: skip
    batch_size, prompt_length = inputs.input_ids.shape
    device = inputs.input_ids.device
    state = BatchState.from_prompts(inputs.input_ids, inputs.attention_mask, rules.max_length, rules.pad_token_id)
    large, small, caches = build_decoders(large_model, small_model, inputs, rules.vocab_size, batch_size)
    fixed, costs = draft_caps(settings, large_model, small_model)
    # candidates and context drafts are priced under either cap; a fixed cap measures the pair when first needed
    schedule = DraftSchedule(batch_size, device, fixed, costs or (lambda: pair_costs(settings, large_model, small_model)))
    schedule.candidates = candidate_rule(settings, large_model, small_model, schedule.pair_costs)
    outputs = None
    if output_scores or output_logits:
        outputs = StepOutputs(prompt_length, rules.pad_token_id, output_scores, output_logits)
        if output_logits and isinstance(large, Decoder):
            large.keep_logits = True
    return Run(large, small, caches, state, schedule, outputs, prompt_length)


def finish_run(run: Run, rules: TokenRules) -> DecodeResult:
    state = run.state
    sequences = state.token_ids[:, : int(state.lengths.max())]
    is_after_end = torch.arange(sequences.shape[1], device=sequences.device) >= state.lengths[:, None]
    sequences = sequences.masked_fill(is_after_end, rules.pad_token_id)
    state.stats.generated = state.lengths - run.prompt_length
    # a stateful stopping criterion may end a row behind tokens already accepted (see stop_rows)
    state.stats.accepted = torch.minimum(state.stats.accepted, state.stats.generated)
    state.stats.context_accepted = torch.minimum(state.stats.context_accepted, state.stats.accepted)
    scores, logits = run.outputs.finish(state.lengths) if run.outputs is not None else (None, None)
    return DecodeResult(sequences, state.stats.tolist(), run.caches, scores=scores, logits=logits)


def decode_rows(
    large_model: PreTrainedModel, small_model: PreTrainedModel, inputs: DecoderInputs, rules: TokenRules,
    settings: BildSettings, sampling: Sampling, output_scores: bool = False, output_logits: bool = False,
) -> list[DecodeResult]:  # fmt: skip
    """Each row of ``inputs`` as a batch of one. Stopping criteria that judge rows alone run inside each row's
    loop; any other (lm-eval's stop sequences) may remember rows, so the rows take turns, a round each, and such
    criteria see the whole batch in step after every turn, as in `stop_rows_in_step`."""
    outputs = dict(output_scores=output_scores, output_logits=output_logits)
    stateless, in_step = split_criteria(rules.stopping_criteria)
    row_rules = replace(rules, stopping_criteria=stateless)
    runs = [start_run(large_model, small_model, inputs.row(b), row_rules, settings, **outputs)
            for b in range(inputs.input_ids.shape[0])]  # fmt: skip
    if not in_step:  # each row to its end, one after another
        for run in runs:
            bild_loop(run.large, run.small, run.caches, run.state, row_rules, sampling, settings, run.schedule,
                      outputs=run.outputs)  # fmt: skip
        return [finish_run(run, rules) for run in runs]
    checked_length = inputs.input_ids.shape[1]
    while not all(bool(run.state.finished.all()) for run in runs):
        for run in runs:
            if not bool(run.state.finished.all()):
                bild_round(run.large, run.small, run.caches, run.state, row_rules, sampling, settings, run.schedule,
                           outputs=run.outputs)  # fmt: skip
        view = rows_view([run.state for run in runs], rules, checked_length)
        scores = RowsScores(runs, rules.pad_token_id) if output_scores else None
        stop_rows_in_step(view, rules, in_step, scores)
        checked_length = view.checked_length
        for b, run in enumerate(runs):
            run.state.lengths, run.state.finished = view.lengths[b : b + 1], view.finished[b : b + 1]
    return [finish_run(run, rules) for run in runs]


def rows_view(states: list[BatchState], rules: TokenRules, checked_length: int) -> BatchState:
    """The rows of one-row states as one batch, for the stopping criteria (no stats)."""
    width = max(s.token_ids.shape[1] for s in states)
    token_ids = torch.cat([
        torch.nn.functional.pad(s.token_ids, (0, width - s.token_ids.shape[1]), value=rules.pad_token_id)
        for s in states
    ])  # fmt: skip
    return BatchState(
        token_ids, torch.cat([s.lengths for s in states]), torch.cat([s.n_pads for s in states]),
        torch.cat([s.finished for s in states]), stats=None, max_length=rules.max_length, checked_length=checked_length,
    )  # fmt: skip


class RowsScores:
    """`StepOutputs.scores_until` over rows decoded as batches of one."""

    def __init__(self, runs: list[Run], pad_token_id: int):
        self.runs, self.pad_token_id = runs, pad_token_id

    def scores_until(self, length: int) -> tuple[torch.Tensor, ...] | None:
        return concat_steps([run.outputs.scores_until(length) for run in self.runs], self.pad_token_id)


def candidate_rule(settings: BildSettings, large_model, small_model, costs) -> CandidateRule:
    """The candidates of an unsure position: a fixed number, or ("auto") those that pay under ``costs()`` (the
    pair's costs, measured when first needed), the unsure token alone where siblings cannot be checked."""
    if settings.fallback_candidates != AUTO:
        return CandidateRule(settings.n_candidates)
    most = 1 if sibling_obstacle(large_model, small_model) else settings.n_candidates
    return CandidateRule(most, costs)


def sibling_obstacle(large_model, small_model) -> str | None:
    """Why siblings of an unsure token cannot be checked for this pair, or None: they need a large model that
    takes explicit positions (decoder-only with position_ids, T5-family, BART-like), a drafter apart from it, and
    no recurrent layers in either model."""
    recurrent = next((m for m in (large_model, small_model) if has_recurrent_state(m)), None)
    if recurrent is not None:
        return (
            f"fallback_candidates > 1 checks siblings side by side in one forward, which {type(recurrent).__name__}'s "
            f"recurrent (linear-attention / state-space) layers cannot: they read every token fed in order"
        )
    if not (
        has_relative_positions(large_model)
        or embeds_decoder_positions(large_model)
        or (
            not large_model.config.is_encoder_decoder
            and takes_forward_arg(large_model, "position_ids")
            and takes_custom_4d_mask(large_model)
        )
    ):
        return (
            f"fallback_candidates > 1 checks siblings at one position through explicit positions, which "
            f"{type(large_model).__name__} does not take with a custom attention mask (decoder-only models with "
            f"position_ids on transformers' attention interface, T5-family and BART-like encoder-decoders do)"
        )
    if hasattr(small_model, "bild_decoders"):
        return "fallback_candidates > 1 does not work with a drafter inside the large model (early exit)"
    if attention_window(large_model) is not None:
        return (
            f"fallback_candidates > 1 feeds siblings through a custom attention mask, which would let "
            f"{type(large_model).__name__}'s sliding-window layers see past their window"
        )
    return None


def check_candidates(settings: BildSettings, large_model, small_model, vocab_size: int) -> None:
    """A fixed ``fallback_candidates`` > 1 must fit the vocabulary and a call that can check siblings."""
    k = settings.fallback_candidates
    if k == AUTO or k <= 1:
        return
    if k > vocab_size:
        raise ValueError(f"fallback_candidates={k} exceeds the vocabulary ({vocab_size} tokens): use at most {vocab_size}.")
    obstacle = sibling_obstacle(large_model, small_model)
    if obstacle:
        raise ValueError(f"bild: {obstacle}: use fallback_candidates=1 (the unsure token alone), or 0.")


def build_decoders(large_model, small_model, inputs: DecoderInputs, vocab_size: int, batch_size: int):
    """``(large, small, caches)``: the two models as the loop sees them and the caches to roll back.

    A drafter may build its own pair of decoders (e.g. one that shares layers and KV cache with the large
    model) by defining ``bild_decoders(large_model, inputs, vocab_size, batch_size)`` with the same result:
    decoders with `Decoder.forward`'s contract and caches with ``discard_from(keep_len)``.
    """
    if hasattr(small_model, "bild_decoders"):
        return small_model.bild_decoders(large_model, inputs, vocab_size, batch_size)
    device = inputs.input_ids.device
    caches = BildCache(TrackedCache(large_model, batch_size, device), TrackedCache(small_model, batch_size, device))
    large = Decoder(large_model, caches.large, vocab_size, inputs.large_encoder_kwargs, lean_forward(large_model))
    small = Decoder(small_model, caches.small, vocab_size, inputs.small_encoder_kwargs, lean_forward(small_model))
    return large, small, caches


def draft_caps(settings: BildSettings, large_model, small_model) -> tuple[int | None, DraftCosts | None]:
    """``(fixed cap, None)``, or ``(None, costs)`` for ``max_draft_tokens="auto"`` (measured once when not given)."""
    if settings.max_draft_tokens != AUTO:
        return settings.max_draft_tokens, None
    return None, pair_costs(settings, large_model, small_model)


def pair_costs(settings: BildSettings, large_model, small_model) -> DraftCosts:
    """The ``draft_costs`` given (loaded when the settings were), else the pair's, measured once and stored."""
    return settings.draft_costs or DraftCosts.for_pair(large_model, small_model)


def can_batch_rows(model: PreTrainedModel) -> bool:
    """Rows of a batch advance unevenly: a decoder must take explicit position ids, or place tokens relative
    to each other (T5); encoder-decoders with absolute positions from the cache length (BART) cannot, nor can
    models with recurrent layers (their state takes in every token fed, so a row cannot sit a token out)."""
    if has_recurrent_state(model):
        return False
    if model.config.is_encoder_decoder:
        return has_relative_positions(model)
    return takes_forward_arg(model, "position_ids")

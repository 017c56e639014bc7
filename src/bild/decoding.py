"""The BiLD loop: the small model drafts, the large model verifies in one forward, bad drafts roll back."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessorList, PreTrainedModel, StoppingCriteriaList

from .cache import BildCache, TrackedCache
from .config import BildSettings
from .policies import find_rollback, find_rollback_sampled, sample, should_fall_back
from .stats import BildStats

# B: batch rows, T: sequence length, L: chunk fed in one forward, K: most drafts in a round, V: vocabulary.


@dataclass
class Rules:
    """What constrains every token, shared by both models."""

    logits_processor: LogitsProcessorList
    stopping_criteria: StoppingCriteriaList
    max_length: int  # prompt (with its padding) + new tokens
    pad_token_id: int
    eos_token_ids: torch.Tensor | None  # [n_eos]
    vocab_size: int  # shared by both models; logits beyond it are ignored
    do_sample: bool = False  # draw tokens from the processed distributions instead of taking the argmax
    generator: torch.Generator | None = None  # randomness for sampling (None: torch's global generator)
    streamer: object | None = None


@dataclass
class Rows:
    """The token sequences of a batch: left-padded prompt, then accepted tokens and this round's drafts."""

    seq: torch.Tensor  # [B, max_length]
    lengths: torch.Tensor  # [B] tokens in use per row (prompt padding included)
    n_pads: torch.Tensor  # [B] left-padding tokens of each prompt
    finished: torch.Tensor  # [B] bool
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # BildStats fields as [B] counters

    def count(self, name: str, increment: torch.Tensor) -> None:
        self.stats[name] = self.stats.get(name, torch.zeros_like(self.lengths)) + increment.long()

    def write(self, rows: torch.Tensor, index: torch.Tensor, token_ids: torch.Tensor) -> None:
        """seq[b, index[b]] = token_ids[b] for the rows where ``rows[b]``."""
        b = rows.nonzero().squeeze(-1)
        self.seq[b, index[b]] = token_ids[b]

    def tokens_at(self, index: torch.Tensor) -> torch.Tensor:
        """seq[b, index[b, i]], `(batch_size, n)`; indices past the end are clamped."""
        return self.seq.gather(1, index.clamp(max=self.seq.shape[1] - 1))


class Decoder:
    """One model as the loop sees it: its cache, its encoder output, and a forward over unseen tokens."""

    def __init__(
        self, model: PreTrainedModel, cache: TrackedCache, vocab_size: int, encoder_kwargs: dict | None = None
    ):
        self.model = model
        self.cache = cache
        self.vocab_size = vocab_size
        self.encoder_kwargs = encoder_kwargs or {}
        params = inspect.signature(model.forward).parameters
        self.is_encoder_decoder = model.config.is_encoder_decoder
        self.takes_position_ids = _takes_position_ids(model)
        self.takes_logits_to_keep = "logits_to_keep" in params

    def forward(
        self, rows: Rows, feed: torch.Tensor, first_target: torch.Tensor, n_targets: int
    ) -> torch.Tensor:
        """Read every token of the ``feed`` rows the model has not seen yet; return next-token logits.

        Args:
            feed: `(batch_size,)` bool, rows to advance; the others sit this forward out.
            first_target: `(batch_size,)` the first sequence index to predict.
            n_targets: number of consecutive indices to predict from ``first_target``.
        Returns:
            `(batch_size, n_targets, vocab_size)` float32 logits; column ``i`` predicts index
            ``first_target + i``. Columns past a row's last fed token hold garbage.
        """
        cache = self.cache
        start = cache.n_seen  # [B]
        n_feed = torch.where(feed, rows.lengths - start, 0)  # [B]
        chunk_len = int(n_feed.max())
        offsets = torch.arange(chunk_len, device=start.device)  # [L]
        index = start[:, None] + offsets  # [B, L] sequence index of each chunk position
        is_fed = offsets < n_feed[:, None]  # [B, L]
        input_ids = rows.tokens_at(index).masked_fill(~is_fed, 0)  # [B, L]
        slot_index = torch.where(is_fed & (index >= rows.n_pads[:, None]), index, -1)  # [B, L]

        # offsets (in the chunk) of the tokens whose outputs predict first_target, first_target + 1, ...
        target_offsets = (first_target - 1 - start)[:, None] + torch.arange(n_targets, device=start.device)
        n_keep = chunk_len - int(target_offsets[feed, 0].min())  # logits needed from the end of the chunk

        kwargs = {cache.kwarg: cache.kv, "use_cache": True, **self.encoder_kwargs}
        mask = cache.attention_mask(slot_index)
        if self.is_encoder_decoder:
            assert mask is None, "encoder-decoder rows are decoded one at a time, so they never have gaps"
            kwargs["decoder_input_ids"] = input_ids
        else:
            kwargs.update(input_ids=input_ids, attention_mask=mask)
            if self.takes_position_ids:  # those that don't are only ever given batches of one, without gaps
                kwargs["position_ids"] = (index - rows.n_pads[:, None]).clamp(min=0)
        if self.takes_logits_to_keep:
            kwargs["logits_to_keep"] = n_keep
        logits = self.model(**kwargs).logits  # [B, L or n_keep, V_model]
        cache.append(slot_index, torch.where(feed, rows.lengths, start))

        local = (target_offsets - (chunk_len - logits.shape[1])).clamp(
            0, logits.shape[1] - 1
        )  # [B, n_targets]
        batch = torch.arange(logits.shape[0], device=logits.device)[:, None]
        return logits[batch, local, : self.vocab_size].float()


def process(
    rules: Rules, rows: Rows, logits: torch.Tensor, target_index: torch.Tensor, is_real: torch.Tensor
):
    """Apply the logits processors to each real column of `(batch_size, n, vocab_size)` logits.

    Column ``i`` of row ``b`` predicts index ``target_index[b, i]`` and is processed with prefix
    ``seq[b, :target_index[b, i]]``, exactly as stock generate() would at that step. Processors may keep
    per-row state (e.g. each prompt's padding), so they always see the whole batch: one call per distinct
    prefix length, whose outputs are kept for the rows at that length.
    """
    if not rules.logits_processor:
        return logits
    scores = logits.clone()
    batch = torch.arange(logits.shape[0], device=logits.device)
    for length in torch.unique(target_index[is_real]).tolist():
        is_at = is_real & (target_index == length)  # [B, n], at most one column per row
        has_column = is_at.any(dim=1)
        column = is_at.int().argmax(dim=1)  # [B]
        processed = rules.logits_processor(rows.seq[:, :length], logits[batch, column].clone())  # [B, V]
        scores[batch[has_column], column[has_column]] = processed[has_column]
    return scores


def is_eos(rules: Rules, token_ids: torch.Tensor) -> torch.Tensor:
    if rules.eos_token_ids is None:
        return torch.zeros_like(token_ids, dtype=torch.bool)
    return torch.isin(token_ids, rules.eos_token_ids)


def draft(
    small: Decoder, rows: Rows, rules: Rules, settings: BildSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Step 1: the small model drafts until it is unsure, drafts N tokens, or reaches EOS or the length limit.

    Drafts are written into ``rows.seq`` (tentatively) and ``rows.lengths`` grows with them.
    Returns `(batch_size,)` counts of drafts, `(batch_size,)` bool, whether the row fell back, and, when
    sampling, `(batch_size, K, vocab_size)` the distributions draft ``i`` was drawn from (else None).
    """
    start = rows.lengths.clone()
    is_drafting = ~rows.finished & (rows.lengths < rules.max_length)
    fell_back = torch.zeros_like(is_drafting)
    draft_probs = []
    for _ in range(settings.max_draft_tokens):
        if not bool(is_drafting.any()):
            break
        logits = small.forward(rows, is_drafting, first_target=rows.lengths, n_targets=1)  # [B, 1, V]
        rows.count("small_forwards", is_drafting)
        scores = process(rules, rows, logits, rows.lengths[:, None], is_drafting[:, None])[:, 0]  # [B, V]
        probs = scores.softmax(dim=-1)
        is_unsure = is_drafting & should_fall_back(probs, settings.fallback_threshold)
        fell_back |= is_unsure
        is_taken = is_drafting & ~is_unsure
        if rules.do_sample:
            draft_probs.append(probs)
            token_ids = torch.zeros_like(rows.lengths)
            token_ids[is_taken] = sample(probs[is_taken], rules.generator)
        else:
            token_ids = probs.argmax(dim=-1)  # [B]
        rows.write(is_taken, rows.lengths, token_ids)
        rows.lengths += is_taken
        is_drafting = is_taken & ~is_eos(rules, token_ids) & (rows.lengths < rules.max_length)
    n_drafted = rows.lengths - start
    if not rules.do_sample:
        return n_drafted, fell_back, None
    # row b's draft i was drawn at step i: drafting only ever stops, so step i never skips a drafting row
    draft_probs = draft_probs[: int(n_drafted.max())]
    if not draft_probs:
        return n_drafted, fell_back, torch.zeros(len(start), 0, rules.vocab_size, device=start.device)
    return n_drafted, fell_back, torch.stack(draft_probs, dim=1)


def verify(
    large: Decoder, rows: Rows, rules: Rules, start: torch.Tensor, n_drafted: torch.Tensor
) -> torch.Tensor:
    """Step 2: one large-model forward over every unseen token, drafts included.

    Returns `(batch_size, K + 1, vocab_size)` processed scores; column ``i`` is the large model's
    distribution for sequence index ``start + i`` (column ``n_drafted`` follows the last draft).
    """
    n_columns = int(n_drafted.max()) + 1
    is_verifying = ~rows.finished
    logits = large.forward(rows, is_verifying, first_target=start, n_targets=n_columns)  # [B, K+1, V]
    rows.count("large_forwards", is_verifying)
    columns = torch.arange(n_columns, device=start.device)
    target_index = start[:, None] + columns  # [B, K+1]
    is_real = is_verifying[:, None] & (columns <= n_drafted[:, None])
    return process(rules, rows, logits, target_index, is_real)


def accept(
    rows: Rows,
    caches: BildCache,
    rules: Rules,
    start: torch.Tensor,
    n_accepted: torch.Tensor,
    next_ids: torch.Tensor,
) -> None:
    """Step 4: keep the accepted drafts, append the large model's token, roll both caches back to match."""
    is_active = ~rows.finished
    n_kept = torch.where(is_active, start + n_accepted, rows.lengths)  # [B]
    has_room = is_active & (n_kept < rules.max_length)
    rows.write(has_room, n_kept, next_ids)
    rows.lengths = n_kept + has_room.long()
    caches.discard_from(n_kept)


def stop_rows(rows: Rows, rules: Rules, start: torch.Tensor, scores: torch.Tensor) -> None:
    """Step 5: run the stopping criteria after every new token; a row ends at the first token that stops it.

    Like `process`, criteria see the whole batch, once per distinct sequence length.
    """
    is_checking = ~rows.finished
    batch = torch.arange(len(start), device=start.device)
    for length in range(int(start[is_checking].min()) + 1, int(rows.lengths[is_checking].max()) + 1):
        is_at = is_checking & (start < length) & (length <= rows.lengths)  # rows with a new token at length-1
        if not bool(is_at.any()):
            continue
        column = (length - 1 - start).clamp(0, scores.shape[1] - 1)
        is_stopped = is_at & rules.stopping_criteria(rows.seq[:, :length], scores[batch, column])
        rows.lengths = torch.where(is_stopped, length, rows.lengths)
        rows.finished |= is_stopped
        is_checking &= ~is_stopped
    rows.finished |= rows.lengths >= rules.max_length


def bild_loop(
    large: Decoder, small: Decoder, caches: BildCache, rows: Rows, rules: Rules, settings: BildSettings
) -> None:
    """Decode until every row stops, one draft -> verify -> rollback -> accept -> stop round at a time."""
    while not bool(rows.finished.all()):
        is_active = ~rows.finished
        start = rows.lengths.clone()  # [B] index of this round's first new token
        # 1. The small model drafts until it is unsure (fallback), or N drafts, EOS, the length limit
        n_drafted, fell_back, draft_probs = draft(small, rows, rules, settings)
        # 2. The large model reads everything it has not seen, drafts included, in one forward
        target_scores = verify(large, rows, rules, start, n_drafted)  # [B, K+1, V]
        # 3. Roll back at the first draft the large model rejects; its own token follows the kept drafts
        draft_ids = rows.tokens_at(
            start[:, None] + torch.arange(target_scores.shape[1] - 1, device=start.device)
        )  # [B, K]
        if rules.do_sample:
            n_accepted, is_rollback, next_ids = find_rollback_sampled(
                draft_ids,
                n_drafted,
                draft_probs,
                target_scores.softmax(dim=-1),
                settings.rollback_threshold,
                rules.generator,
            )
        else:
            target_ids = target_scores.argmax(dim=-1)  # [B, K+1]
            n_accepted, is_rollback = find_rollback(
                draft_ids, n_drafted, target_scores.log_softmax(dim=-1), target_ids, settings.rollback_threshold
            )
            next_ids = target_ids.gather(1, n_accepted[:, None]).squeeze(1)  # [B]
        # 4. Keep the accepted tokens; both caches forget the rest
        accept(rows, caches, rules, start, n_accepted, next_ids)
        # 5. Stopping criteria (EOS, max length, stop strings, ...) on every new token
        stop_rows(rows, rules, start, target_scores)
        n_new = torch.where(is_active, rows.lengths - start, 0)
        record(rows, is_active, n_drafted, torch.minimum(n_accepted, n_new), fell_back, is_rollback)
        if rules.streamer is not None and int(n_new[0]) > 0:
            rules.streamer.put(rows.seq[:1, int(start[0]) : int(rows.lengths[0])].cpu())


def record(rows: Rows, is_active, n_drafted, n_accepted, fell_back, is_rollback) -> None:
    """Step 6: count this round in the per-row stats (``small_forwards``/``large_forwards`` count themselves)."""
    rows.count("drafted", n_drafted * is_active)
    rows.count("accepted", n_accepted * is_active)
    rows.count("fallbacks", fell_back & is_active)
    rows.count("rollbacks", is_rollback & is_active)


@dataclass
class DecodeResult:
    sequences: torch.Tensor  # [B, T] prompt (or decoder start) + new tokens, padded after each row's end
    stats: BildStats
    caches: BildCache | None  # None when rows were decoded one at a time


def decode(
    large_model: PreTrainedModel,
    small_model: PreTrainedModel,
    input_ids: torch.Tensor,
    rules: Rules,
    settings: BildSettings,
    attention_mask: torch.Tensor | None = None,
    large_encoder_kwargs: dict | None = None,
    small_encoder_kwargs: dict | None = None,
) -> DecodeResult:
    """BiLD-decode a batch.

    Args:
        input_ids: `(batch_size, prompt_length)` left-padded prompts (decoder-only) or decoder start ids.
        attention_mask: `(batch_size, prompt_length)` mask of ``input_ids`` (None: no padding).
        large_encoder_kwargs / small_encoder_kwargs: ``encoder_outputs`` and encoder ``attention_mask`` of
            each model, for encoder-decoder models.
    """
    batch_size, prompt_length = input_ids.shape
    if batch_size > 1 and not (_can_batch_rows(large_model) and _can_batch_rows(small_model)):
        return _decode_rows_alone(
            large_model,
            small_model,
            input_ids,
            rules,
            settings,
            attention_mask,
            large_encoder_kwargs,
            small_encoder_kwargs,
        )
    device = input_ids.device
    seq = torch.full((batch_size, rules.max_length), rules.pad_token_id, dtype=torch.long, device=device)
    seq[:, :prompt_length] = input_ids
    n_pads = torch.zeros(batch_size, dtype=torch.long, device=device)
    if attention_mask is not None:
        n_pads = (attention_mask == 0).sum(dim=1)
    rows = Rows(
        seq=seq,
        lengths=torch.full((batch_size,), prompt_length, dtype=torch.long, device=device),
        n_pads=n_pads,
        finished=torch.zeros(batch_size, dtype=torch.bool, device=device),
    )
    caches = BildCache(
        TrackedCache(large_model, batch_size, device), TrackedCache(small_model, batch_size, device)
    )
    large = Decoder(large_model, caches.large, rules.vocab_size, large_encoder_kwargs)
    small = Decoder(small_model, caches.small, rules.vocab_size, small_encoder_kwargs)
    bild_loop(large, small, caches, rows, rules, settings)

    sequences = rows.seq[:, : int(rows.lengths.max())]
    is_after_end = torch.arange(sequences.shape[1], device=device) >= rows.lengths[:, None]
    sequences = sequences.masked_fill(is_after_end, rules.pad_token_id)
    rows.stats["generated"] = rows.lengths - prompt_length
    stats = BildStats(
        **{name: rows.stats.get(name, torch.zeros_like(n_pads)).tolist() for name in BildStats.fields()}
    )
    return DecodeResult(sequences, stats, caches)


def _takes_position_ids(model: PreTrainedModel) -> bool:
    return "position_ids" in inspect.signature(model.forward).parameters


def _can_batch_rows(model: PreTrainedModel) -> bool:
    """Rows with gaps need explicit position ids; encoder-decoder decoders take positions from cache slots."""
    return not model.config.is_encoder_decoder and _takes_position_ids(model)


def _decode_rows_alone(
    large_model, small_model, input_ids, rules, settings, attention_mask, large_enc, small_enc
):
    """Decode each row as a batch of one and stack the results, padded like stock generate()."""
    results = [
        decode(
            large_model,
            small_model,
            input_ids[b : b + 1],
            rules,
            settings,
            None if attention_mask is None else attention_mask[b : b + 1],
            _select_row(large_enc, b),
            _select_row(small_enc, b),
        )
        for b in range(input_ids.shape[0])
    ]
    width = max(r.sequences.shape[1] for r in results)
    sequences = torch.full(
        (len(results), width), rules.pad_token_id, dtype=torch.long, device=input_ids.device
    )
    for b, result in enumerate(results):
        sequences[b, : result.sequences.shape[1]] = result.sequences[0]
    return DecodeResult(sequences, BildStats.concat([r.stats for r in results]), caches=None)


def _select_row(kwargs: dict | None, b: int) -> dict | None:
    """Row ``b`` of every tensor in encoder kwargs (tensors and ModelOutputs such as ``encoder_outputs``)."""
    if kwargs is None:
        return None
    selected = {}
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            value = value[b : b + 1]
        elif hasattr(value, "items"):  # a ModelOutput
            value = type(value)(
                **{k: v[b : b + 1] if isinstance(v, torch.Tensor) else v for k, v in value.items()}
            )
        selected[name] = value
    return selected

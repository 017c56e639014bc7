"""Oracles and invariants of BiLD decoding on tiny real models."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import CHAIN, EOS, PAD, left_pad, prompts, qwen, sample_chain

import bild

INF = math.inf


def strip(row: torch.Tensor) -> list[int]:
    """A generated row without its trailing padding."""
    ids = row.tolist()
    while ids and ids[-1] == PAD:
        ids.pop()
    return ids


def bild_generate(large, ids, mask=None, **kwargs):
    kwargs.setdefault("max_new_tokens", 20)
    kwargs.setdefault("pad_token_id", PAD)
    return large.generate(
        ids, attention_mask=mask, generation_mode="bild", return_dict_in_generate=True, **kwargs
    )


class ForwardCounter:
    """Counts real forward calls of a model: calls of its output layer where it has one, which its own forward and
    bild's lean forward (`bild.lean`, which skips the model's forward) both make once per call."""

    def __init__(self, model):
        self.calls = 0
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.handle = (head or model).register_forward_hook(self.hook)

    def hook(self, *_):
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.handle.remove()


# --- oracles --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("fallback_threshold", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("max_draft_tokens", [1, 4, 16])
def test_rollback_zero_is_large_greedy_decoder_only(pair, batch_size, fallback_threshold, max_draft_tokens):
    large, _ = pair
    ids, mask = left_pad(prompts(batch_size))
    expected = large.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=PAD)
    out = bild_generate(
        large,
        ids,
        mask,
        fallback_threshold=fallback_threshold,
        rollback_threshold=0.0,
        max_draft_tokens=max_draft_tokens,
    )
    assert out.sequences.tolist() == expected.tolist()


@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("fallback_threshold,max_draft_tokens", [(0.0, 3), (0.5, 8), (0.9, 2)])
def test_rollback_zero_is_large_greedy_encoder_decoder(s2s, batch_size, fallback_threshold, max_draft_tokens):
    large, _ = s2s
    src = sample_chain(CHAIN, batch_size, 10, torch.Generator().manual_seed(3))
    src[1:, 7:] = PAD  # unequal source lengths
    mask = (src != PAD).long()
    expected = large.generate(src, attention_mask=mask, max_new_tokens=12)
    out = bild_generate(
        large, src, mask, fallback_threshold=fallback_threshold, rollback_threshold=0.0, max_draft_tokens=max_draft_tokens,
        max_new_tokens=12,
    )  # fmt: skip
    assert [strip(r) for r in out.sequences] == [strip(r) for r in expected]


def test_rollback_zero_is_large_greedy_other_families(bart_pair):
    large, small = bart_pair
    bild.attach(large, small)
    src = torch.tensor([[5, 9, 12, 30, 7, EOS], [8, 8, 21, 4, EOS, PAD]])
    mask = (src != PAD).long()
    expected = large.generate(src, attention_mask=mask, max_new_tokens=10, do_sample=False, num_beams=1)
    out = bild_generate(large, src, mask, rollback_threshold=0.0, max_new_tokens=10, num_beams=1)
    assert [strip(r) for r in out.sequences] == [strip(r) for r in expected]


def test_no_fallback_no_rollback_is_small_greedy(pair, s2s):
    for large, small in (pair, s2s):
        if large.config.is_encoder_decoder:
            ids, mask = sample_chain(CHAIN, 2, 10, torch.Generator().manual_seed(4)), None
        else:
            ids, mask = left_pad(prompts(3))
        expected = small.generate(
            ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=PAD
        )
        out = bild_generate(
            large,
            ids,
            mask,
            fallback_threshold=0.0,
            rollback_threshold=INF,
            max_draft_tokens=16,
            max_new_tokens=16,
        )
        assert [strip(r) for r in out.sequences] == [strip(r) for r in expected]
        assert out.bild_stats.rollbacks == [0] * ids.shape[0]


@pytest.mark.parametrize("settings", [dict(fallback_threshold=0.5, rollback_threshold=2.0, max_draft_tokens=6),
                                      dict(fallback_threshold=0.8, rollback_threshold=0.5, max_draft_tokens=3),
                                      dict(fallback_threshold=0.3, rollback_threshold=INF, max_draft_tokens=10)])  # fmt: skip
def test_batch_equals_rows_alone(pair, settings):
    large, _ = pair
    rows = prompts(4)
    ids, mask = left_pad(rows)
    batch = bild_generate(large, ids, mask, **settings)
    for b, row in enumerate(rows):
        alone = bild_generate(large, row[None], **settings)
        assert strip(batch.sequences[b, ids.shape[1] :]) == strip(alone.sequences[0, len(row) :])
        assert {k: v[b] for k, v in batch.bild_stats.to_dict().items()} == {
            k: v[0] for k, v in alone.bild_stats.to_dict().items()
        }
    if settings["rollback_threshold"] < INF:
        assert sum(batch.bild_stats.rollbacks) > 0, "the setting must exercise rollbacks"


def test_encoder_decoder_batch_equals_rows_alone(s2s):
    """T5 rows run together (one forward per step for the batch) and give each row's tokens and counts alone."""
    large, _ = s2s
    src = sample_chain(CHAIN, 8, 10, torch.Generator().manual_seed(6))
    src[::3, 6:] = PAD  # unequal source lengths
    mask = (src != PAD).long()
    settings = dict(fallback_threshold=0.4, rollback_threshold=1.0, max_draft_tokens=5, max_new_tokens=12)
    with ForwardCounter(large.get_decoder()) as n_batched:
        batch = bild_generate(large, src, mask, **settings)
    assert batch.cache is not None  # decoded together, not row by row
    n_alone = 0
    for b in range(8):
        row = src[b : b + 1, mask[b].bool()]
        with ForwardCounter(large.get_decoder()) as counter:
            alone = bild_generate(large, row, **settings)
        n_alone += counter.calls
        assert strip(batch.sequences[b]) == strip(alone.sequences[0])
        assert batch.bild_stats.row(b).to_dict() == alone.bild_stats.to_dict()
    rollbacks = batch.bild_stats.rollbacks
    assert 0 < sum(r > 0 for r in rollbacks) < 8, "some rows, not all, must roll back"
    assert n_batched.calls <= n_alone / 4  # the target: a quarter of the large forwards at batch 8


def test_absolute_position_encoder_decoders_decode_rows_alone(bart_pair):
    large, small = bart_pair
    bild.attach(large, small)
    try:
        src = torch.tensor([[5, 9, 12, 30, 7, EOS], [8, 8, 21, 4, EOS, PAD]])
        out = bild_generate(large, src, (src != PAD).long(), rollback_threshold=0.0, max_new_tokens=6, num_beams=1)
        assert out.cache is None  # BART takes positions from the cache length: rows one after another
    finally:
        bild.detach(large)


# --- stopping -------------------------------------------------------------------------------------------


def test_eos_inside_a_draft_ends_the_row_there(pair):
    large, small = pair
    rows = prompts(2)
    ids, mask = left_pad(rows)
    small_greedy = small.generate(
        ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=PAD
    )
    eos = int(small_greedy[0, ids.shape[1] + 3])  # the 4th token row 0 drafts
    settings = dict(
        fallback_threshold=0.0,
        rollback_threshold=INF,
        max_draft_tokens=12,
        max_new_tokens=12,
        eos_token_id=eos,
    )
    out = bild_generate(large, ids, mask, **settings)
    new = out.sequences[:, ids.shape[1] :]
    first = new[0].tolist().index(eos)
    assert first <= 3
    assert new[0, first + 1 :].tolist() == [PAD] * (new.shape[1] - first - 1)
    assert out.bild_stats.drafted[0] == first + 1, "drafting stops at EOS"
    assert out.bild_stats.large_forwards[0] == 1


def test_max_new_tokens_is_exact(pair):
    large, _ = pair
    ids, mask = left_pad(prompts(3))
    for max_new_tokens in (1, 2, 7, 13):
        out = bild_generate(
            large, ids, mask, max_new_tokens=max_new_tokens, max_draft_tokens=5, fallback_threshold=0.3
        )
        assert out.sequences.shape[1] == ids.shape[1] + max_new_tokens
        assert all(len(strip(r)) == ids.shape[1] + max_new_tokens for r in out.sequences)


def test_logits_processors_and_stop_strings_apply_at_every_position(pair, tokenizer):
    large, _ = pair
    ids, mask = left_pad(prompts(2))
    stock = dict(
        repetition_penalty=1.3, min_new_tokens=5, no_repeat_ngram_size=2, max_new_tokens=16, pad_token_id=PAD
    )
    expected = large.generate(ids, attention_mask=mask, do_sample=False, **stock)
    out = bild_generate(large, ids, mask, rollback_threshold=0.0, fallback_threshold=0.4, **stock)
    assert out.sequences.tolist() == expected.tolist()

    words = tokenizer.decode(expected[0, ids.shape[1] + 4 : ids.shape[1] + 5])  # a word generated 5th
    stop = dict(stop_strings=[words], tokenizer=tokenizer, max_new_tokens=16, pad_token_id=PAD)
    expected = large.generate(ids[:1], do_sample=False, **stop)
    out = bild_generate(large, ids[:1], rollback_threshold=0.0, max_draft_tokens=8, **stop)
    assert out.sequences.tolist() == expected.tolist()
    assert tokenizer.decode(out.sequences[0]).endswith(words)


# --- stats and model calls ------------------------------------------------------------------------------


def test_stats_add_up_against_real_forward_calls(pair):
    large, small = pair
    ids, mask = left_pad(prompts(4))
    bild_generate(large, ids, mask, max_new_tokens=2)  # the pair's costs, measured on first use, are stored now
    with ForwardCounter(large) as n_large, ForwardCounter(small) as n_small:
        out = bild_generate(
            large, ids, mask, fallback_threshold=0.6, rollback_threshold=1.0, max_draft_tokens=6
        )
    stats = out.bild_stats
    assert n_large.calls == max(stats.large_forwards)  # every round verifies all unfinished rows at once
    assert max(stats.small_forwards) <= n_small.calls <= sum(stats.small_forwards)
    for b, row in enumerate(out.sequences):
        n_generated = len(strip(row)) - ids.shape[1]
        assert stats.generated[b] == n_generated
        n_large_tokens = n_generated - stats.accepted[b]
        assert 0 <= n_large_tokens <= stats.large_forwards[b]  # each large forward yields at most one token
        assert stats.accepted[b] <= stats.drafted[b] <= stats.small_forwards[b] + stats.context_drafted[b]
        assert stats.rollbacks[b] + stats.fallbacks[b] <= stats.large_forwards[b]

    with ForwardCounter(large) as n_large, ForwardCounter(small) as n_small:
        alone = bild_generate(
            large, ids[:1, mask[0].bool()], fallback_threshold=0.6, rollback_threshold=1.0, max_draft_tokens=6
        )
    assert n_large.calls == alone.bild_stats.large_forwards[0]
    assert n_small.calls == alone.bild_stats.small_forwards[0]


def test_large_forward_count_is_pinned(pair):
    """A rollback costs no second large forward: the count for a fixed prompt and setting is deterministic."""
    large, _ = pair
    prompt = prompts(1)[0][None]
    with ForwardCounter(large) as n_large:
        out = bild_generate(
            large,
            prompt,
            fallback_threshold=0.5,
            rollback_threshold=0.0,
            max_draft_tokens=8,
            max_new_tokens=20,
        )
    stats = out.bild_stats
    assert n_large.calls == stats.large_forwards[0] == PINNED_LARGE_FORWARDS
    assert stats.small_forwards[0] == PINNED_SMALL_FORWARDS
    assert (stats.generated[0], stats.accepted[0], stats.rollbacks[0]) == (20, 15, PINNED_ROLLBACKS)
    # each round yields its accepted drafts plus one large-model token
    assert stats.generated[0] == stats.accepted[0] + stats.large_forwards[0] - 1  # the last token hit max length


# 20 tokens = 15 accepted drafts + 5 large-model tokens, 4 of the 6 rounds rolled back (stock greedy: 20 forwards).
PINNED_LARGE_FORWARDS = 6
PINNED_SMALL_FORWARDS = 33
PINNED_ROLLBACKS = 4


# --- vocabularies ---------------------------------------------------------------------------------------


def test_padded_vocabularies_work(causal_pair):
    large, small = causal_pair
    padded = qwen(64, 2, seed=0, vocab=large.config.vocab_size + 16)
    n_rows = large.config.vocab_size
    with torch.no_grad():
        for name, param in padded.named_parameters():
            source = large.get_parameter(name)
            if param.shape == source.shape:
                param.copy_(source)
            else:  # embeddings and output layer: the first rows copied, the padding rows never chosen
                param.zero_()
                param[:n_rows] = source
    padded.eval()
    bild.attach(padded, small)
    ids, mask = left_pad(prompts(2))
    expected = padded.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=PAD)
    out = bild_generate(padded, ids, mask, rollback_threshold=0.0, max_new_tokens=12)
    assert out.sequences.tolist() == expected.tolist()
    assert int(out.sequences.max()) < small.config.vocab_size

"""``fallback_candidates=K``: the small model's top-K tokens at an unsure position, checked as siblings by the
large model in its one verification forward (a tree: 4D attention mask, explicit positions)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import CHAIN, PAD, VOCAB, left_pad, prompts, sample_chain

import bild
from bild.schedule import DraftCosts


def strip(row: torch.Tensor) -> list[int]:
    ids = row.tolist()
    while ids and ids[-1] == PAD:
        ids.pop()
    return ids

# a verification forward costs the same whatever it reads: every candidate pays
FLAT = DraftCosts(small=((1, 0.1),), large=((1, 1.0), (64, 1.0)))
# each token fed costs a whole forward: no sibling ever pays (the unsure token is always checked)
STEEP = DraftCosts(small=((1, 0.1),), large=((1, 1.0), (64, 64.0)))


def generate(large, ids, mask=None, **kwargs):
    settings = dict(fallback_threshold=0.9, rollback_threshold=0.0, max_new_tokens=20, max_draft_tokens=4)
    settings.update(kwargs)
    return large.generate(ids, attention_mask=mask, generation_mode="bild", do_sample=False, pad_token_id=PAD,
                          return_dict_in_generate=True, **settings)  # fmt: skip


def stock_greedy(large, ids, mask=None, max_new_tokens=20, **kwargs):
    return large.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=PAD, max_new_tokens=max_new_tokens,
                          **kwargs)  # fmt: skip


@pytest.mark.parametrize("k", [2, 3, 6])
@pytest.mark.parametrize("batch", [1, 8])
def test_lossless_for_every_k_and_batch_rows_equal_rows_alone(pair, k, batch):
    large, _ = pair
    ids, mask = left_pad(prompts(batch, seed=3))
    out = generate(large, ids, mask, fallback_candidates=k)
    assert torch.equal(out.sequences, stock_greedy(large, ids, mask))
    assert sum(out.bild_stats.siblings) > 0  # siblings were really checked
    if batch > 1:
        for b in range(batch):
            alone = generate(large, ids[b : b + 1, mask[b].bool()], fallback_candidates=k)
            assert torch.equal(alone.sequences[0], out.sequences[b, -alone.sequences.shape[1] :])
            assert alone.bild_stats.to_dict() == out.bild_stats.row(b).to_dict()


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_the_tree_mask_in_each_attention_implementation(causal_pair, attention):
    large, small = (copy.deepcopy(m) for m in causal_pair)
    large.set_attn_implementation(attention)
    bild.attach(large, small)
    ids, mask = left_pad(prompts(4, seed=5))
    out = generate(large, ids, mask, fallback_candidates=4)
    assert torch.equal(out.sequences, stock_greedy(large, ids, mask))


def noisy_copy(model, scale: float = 3.0, seed: int = 0):
    """A drafter whose first choice is often wrong while the right token stays near the top: the large model
    with seeded noise on its output layer."""
    drafter = copy.deepcopy(model)
    weight = drafter.lm_head.weight
    with torch.no_grad():
        weight += scale * weight.std() * torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed))
    return drafter


def test_a_fallback_round_makes_one_large_forward_and_siblings_save_rounds(causal_pair):
    """A small model that is always unsure: every round is one large forward over the candidates; the more of
    its top tokens the large model checks, the more rounds yield two tokens."""
    large = copy.deepcopy(causal_pair[0])
    bild.attach(large, noisy_copy(large))
    ids = prompts(1, seed=2)[0][None]
    calls = []
    hook = large.lm_head.register_forward_hook(lambda *args: calls.append(1))  # each forward, lean or own
    try:
        runs = {k: generate(large, ids, fallback_threshold=1.0, fallback_candidates=k, max_new_tokens=24,
                            prompt_lookup_num_tokens=0) for k in (1, 4)}  # fmt: skip
    finally:
        hook.remove()
    one, four = runs[1].bild_stats, runs[4].bild_stats
    assert torch.equal(runs[1].sequences, runs[4].sequences)
    assert torch.equal(runs[4].sequences, stock_greedy(large, ids, max_new_tokens=24))
    assert len(calls) == one.large_forwards[0] + four.large_forwards[0]  # one large forward per round
    assert four.fallbacks == four.large_forwards  # every round fell back, and made exactly one large forward
    assert four.siblings[0] == 3 * four.fallbacks[0] and one.siblings == [0]
    assert 0 < four.siblings_kept[0] <= four.accepted[0] and one.siblings_kept == [0]
    assert four.accepted[0] > one.accepted[0] and four.large_forwards[0] < one.large_forwards[0]


def test_processors_see_the_chosen_sibling_in_the_prefix(causal_pair):
    large = copy.deepcopy(causal_pair[0])
    bild.attach(large, noisy_copy(large))
    ids, mask = left_pad(prompts(4, seed=0))
    penalties = dict(repetition_penalty=1.3, no_repeat_ngram_size=2, max_new_tokens=40)
    out = generate(large, ids, mask, fallback_candidates=5, **penalties)
    assert torch.equal(out.sequences, stock_greedy(large, ids, mask, **penalties))


def test_scores_follow_the_chosen_sibling(causal_pair):
    large = copy.deepcopy(causal_pair[0])
    bild.attach(large, noisy_copy(large))
    ids, mask = left_pad(prompts(3, seed=7))
    out = generate(large, ids, mask, fallback_threshold=1.0, fallback_candidates=4, output_scores=True)
    stock = large.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=PAD, max_new_tokens=20,
                           output_scores=True, return_dict_in_generate=True)  # fmt: skip
    assert torch.equal(out.sequences, stock.sequences) and sum(out.bild_stats.siblings) > 0
    assert_same_steps(out.scores, stock.scores)


def test_encoder_decoder_logits_after_a_sibling_are_the_large_models_own(seq2seq_pair):
    """The large model's logits after a chosen sibling come from the tree forward: they match stock's only if the
    sibling stood at the right relative position."""
    large = copy.deepcopy(seq2seq_pair[0])
    bild.attach(large, noisy_copy(large, scale=1.5))
    src = sample_chain(CHAIN, 4, 10, torch.Generator().manual_seed(9))
    out = generate(large, src, fallback_threshold=1.0, fallback_candidates=4, output_logits=True)
    stock = large.generate(src, do_sample=False, max_new_tokens=20, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, stock.sequences) and sum(out.bild_stats.siblings) > 0
    assert_same_steps(out.logits, stock.logits)


def assert_same_steps(ours, theirs):
    """Every step's scores or logits match stock's for the rows still running (ended rows hold padding's)."""
    for mine, stock in zip(ours, theirs, strict=True):
        running = torch.isfinite(mine).sum(dim=-1) > 1  # [B]
        finite = torch.isfinite(stock) & running[:, None]
        torch.testing.assert_close(mine[finite], stock[finite], rtol=1e-4, atol=1e-4)


def test_lossy_candidates_still_decode(pair):
    large, _ = pair
    ids, mask = left_pad(prompts(4))
    out = generate(large, ids, mask, rollback_threshold=2.0, fallback_candidates=3)
    assert out.sequences.shape[0] == 4 and all(n > 0 for n in out.bild_stats.generated)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fallback_candidates": -1}, "`fallback_candidates` must be an integer >= 0 or 'auto'"),
        ({"fallback_candidates": 1.5}, "`fallback_candidates` must be an integer >= 0 or 'auto'"),
        ({"fallback_candidates": "many"}, "`fallback_candidates` must be an integer >= 0 or 'auto'"),
        ({"fallback_candidates": VOCAB + 1}, "exceeds the vocabulary"),
    ],
)
def test_bad_values_say_what_to_change(pair, kwargs, message):
    large, _ = pair
    ids = prompts(1)[0][None]
    settings = {"do_sample": False, **kwargs}
    with pytest.raises(ValueError, match=message):
        large.generate(ids, generation_mode="bild", pad_token_id=PAD, max_new_tokens=4, **settings)


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("batch", [1, 8])
def test_encoder_decoder_lossless_for_every_k_and_batch_rows_equal_rows_alone(seq2seq_pair, k, batch):
    """T5: siblings stand at the unsure token's relative position (explicit positions, not cache slots)."""
    large = copy.deepcopy(seq2seq_pair[0])
    bild.attach(large, noisy_copy(large, scale=1.5))
    src = sample_chain(CHAIN, batch, 10, torch.Generator().manual_seed(8))
    src[1::2, 6:] = PAD  # unequal source lengths
    mask = (src != PAD).long()
    expected = large.generate(src, attention_mask=mask, max_new_tokens=16, do_sample=False)
    runs = {n: generate(large, src, mask, fallback_threshold=1.0, fallback_candidates=n, max_new_tokens=16) for n in (1, k)}
    assert [strip(r) for r in runs[k].sequences] == [strip(r) for r in expected]
    one, tree = runs[1].bild_stats, runs[k].bild_stats
    assert sum(tree.siblings) > 0 and sum(tree.large_forwards) < sum(one.large_forwards)  # siblings were kept
    if batch > 1:
        for b in range(batch):
            alone = generate(large, src[b : b + 1, mask[b].bool()], fallback_threshold=1.0, fallback_candidates=k,
                             max_new_tokens=16)  # fmt: skip
            assert strip(alone.sequences[0]) == strip(runs[k].sequences[b])
            assert alone.bild_stats.to_dict() == tree.row(b).to_dict()


@pytest.mark.parametrize(("k", "fallback_threshold"), [(3, 1.0), ("auto", 1.0), (3, 0.7)])
def test_absolute_position_encoder_decoders_lossless_and_logits_after_a_sibling(trained_bart, k, fallback_threshold):
    """BART (rows decoded alone): siblings get the unsure token's position embedding; after a kept one the
    cache closes the gap it left, so the next tokens get theirs too."""
    large = copy.deepcopy(trained_bart)
    bild.attach(large, noisy_copy(large, scale=2.0))
    src = sample_chain(CHAIN, 2, 10, torch.Generator().manual_seed(8))
    src[1, 6:] = PAD
    mask = (src != PAD).long()
    settings = dict(max_new_tokens=16, num_beams=1, output_logits=True)
    stock = large.generate(src, attention_mask=mask, do_sample=False, return_dict_in_generate=True, **settings)
    out = generate(large, src, mask, fallback_threshold=fallback_threshold, fallback_candidates=k, draft_costs=FLAT,
                   max_draft_tokens=2, **settings)  # fmt: skip
    assert torch.equal(out.sequences, stock.sequences)
    assert sum(out.bild_stats.siblings_kept) > 0
    if fallback_threshold < 1:  # rounds without siblings come after kept ones
        assert sum(out.bild_stats.fallbacks) < sum(out.bild_stats.large_forwards)
    assert_same_steps(out.logits, stock.logits)


@pytest.mark.parametrize("batch", [1, 6])
def test_auto_checks_candidates_only_where_they_pay(pair, batch):
    large, _ = pair
    ids, mask = left_pad(prompts(batch, seed=4))
    expected = stock_greedy(large, ids, mask)
    flat = generate(large, ids, mask, fallback_candidates="auto", draft_costs=FLAT)
    steep = generate(large, ids, mask, fallback_candidates="auto", draft_costs=STEEP)
    alone = generate(large, ids, mask, fallback_candidates=1, draft_costs=STEEP)
    assert torch.equal(flat.sequences, expected) and torch.equal(steep.sequences, expected)
    assert sum(flat.bild_stats.siblings) > 0 and max(flat.bild_stats.siblings) <= 3 * max(flat.bild_stats.fallbacks)
    assert steep.bild_stats == alone.bild_stats  # where verifying a token costs a forward, only the unsure one is
    if batch > 1:
        for b in range(batch):
            alone = generate(large, ids[b : b + 1, mask[b].bool()], fallback_candidates="auto", draft_costs=FLAT)
            assert torch.equal(alone.sequences[0], flat.sequences[b, -alone.sequences.shape[1] :])


def test_top_k_one_sampling_with_candidates_is_large_greedy(pair):
    """top_k=1 leaves the small model one possible token: no sibling is checked, and the output is greedy."""
    causal, _ = pair
    for k in (3, "auto"):
        out = causal.generate(prompts(1)[0][None], generation_mode="bild", fallback_candidates=k, do_sample=True,
                              top_k=1, draft_costs=FLAT, rollback_threshold=0.0, max_new_tokens=8, pad_token_id=PAD,
                              return_dict_in_generate=True)  # fmt: skip
        assert torch.equal(out.sequences, stock_greedy(causal, prompts(1)[0][None], max_new_tokens=8))
        assert sum(out.bild_stats.siblings) == 0

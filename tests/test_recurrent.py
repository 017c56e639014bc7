"""Models with recurrent layers: hybrid (Qwen3.5: gated delta-net linear attention beside full attention) and
state-space (Mamba: no attention at all), as large and as small model.

Their state takes in every token fed, so a rollback restores the state recorded before the dropped tokens
(`compat.crop_cache`), and rows of a batch are decoded one at a time. The oracles: lossless settings equal the
large model's greedy output, with drafts rejected mid-round and context drafts cut by the small model's check;
batch rows equal rows alone; exact sampling keeps the large model's distribution.
"""

from __future__ import annotations

import pytest
import tiny_models
import torch
from conftest import BOS, CHAIN, EOS, PAD, SMALL_CHAIN, VOCAB, causal_batches, left_pad, prompts
from test_sampling import SAMPLING, bild_joint_counts, chi_square_p_value, large_joint_distribution
from tiny_models import train

import bild
from bild.compat import (
    crop_cache,
    has_recurrent_state,
    keep_recurrent_states,
    new_cache,
    records_recurrent_states,
)

pytestmark = pytest.mark.skipif(
    not records_recurrent_states(), reason="this transformers keeps no per-token record of recurrent states"
)


def tiny(kind: str, hidden: int, layers: int, seed: int, chain: torch.Tensor, steps: int):
    model = getattr(tiny_models, kind)(VOCAB, hidden, layers, seed, pad=PAD, eos=EOS, bos=BOS)
    return train(model, causal_batches(chain), steps=steps, seed=seed)


@pytest.fixture(scope="module")
def models(one_thread):
    """Trained on slightly different chains, so drafts are mostly right and sometimes wrong."""
    return {
        "qwen3_5": tiny("qwen3_5", 64, 3, 0, CHAIN, 120),
        "qwen3_5-small": tiny("qwen3_5", 32, 2, 1, SMALL_CHAIN, 120),
        "mamba": tiny("mamba", 48, 2, 0, CHAIN, 60),
        "mamba-small": tiny("mamba", 32, 1, 1, SMALL_CHAIN, 60),
    }


PAIRS = [("qwen3_5", "qwen3_5-small"), ("mamba", "mamba-small"), ("qwen3_5", "mamba-small")]
LOSSLESS = [
    dict(fallback_threshold=0.0, max_draft_tokens=4),  # long drafts, rejected mid-round
    dict(fallback_threshold=0.6, max_draft_tokens=3),  # fallbacks, the unsure token checked (candidates auto)
    dict(fallback_threshold=0.0, max_draft_tokens=3, prompt_lookup_num_tokens=4),  # context drafts, checked
    dict(fallback_threshold=0.6, fallback_candidates=1, max_draft_tokens="auto"),  # measured costs
]


@pytest.fixture()
def attached(models, request):
    large_name, small_name = request.param
    large, small = models[large_name], models[small_name]
    bild.attach(large, small)
    yield large, small
    bild.detach(large)


def greedy(model, ids, mask=None, n_new=16):
    return model.generate(ids, attention_mask=mask, max_new_tokens=n_new, do_sample=False, pad_token_id=PAD)


@pytest.mark.parametrize("attached", PAIRS, indirect=True, ids=["+".join(p) for p in PAIRS])
@pytest.mark.parametrize("settings", LOSSLESS)
def test_rollback_zero_is_the_large_models_greedy_output(attached, settings):
    large, _ = attached
    rollbacks = 0
    for prompt in prompts(3, seed=5):
        ids = prompt[None]
        out = large.generate(ids, generation_mode="bild", rollback_threshold=0.0, max_new_tokens=16,
                             pad_token_id=PAD, return_dict_in_generate=True, **settings)  # fmt: skip
        assert out.sequences.tolist() == greedy(large, ids).tolist()
        rollbacks += out.bild_stats.rollbacks[0]
    if settings["fallback_threshold"] == 0.0:
        assert rollbacks > 0  # the state really went back before a rejected draft


@pytest.mark.parametrize("attached", PAIRS[:2], indirect=True, ids=["+".join(p) for p in PAIRS[:2]])
def test_batch_rows_equal_rows_alone(attached):
    """Left-padded rows of unequal lengths, each equal to the large model's greedy output for that row alone."""
    large, _ = attached
    rows = prompts(3, seed=7)
    ids, mask = left_pad(rows)
    out = large.generate(ids, attention_mask=mask, generation_mode="bild", rollback_threshold=0.0,
                         fallback_threshold=0.0, max_draft_tokens=4, max_new_tokens=12, pad_token_id=PAD)  # fmt: skip
    for b, row in enumerate(rows):
        alone = greedy(large, row[None], n_new=12)[0, len(row) :]
        assert out[b, ids.shape[1] :].tolist() == alone.tolist()


@pytest.mark.parametrize("attached", PAIRS[:1], indirect=True, ids=["qwen3_5"])
def test_sampling_at_rollback_zero_keeps_the_large_models_distribution(attached):
    large, _ = attached
    prompt = prompts(1, seed=3, lengths=(4,))[0]
    expected = large_joint_distribution(large, prompt, **SAMPLING)
    # rows of a recurrent model are decoded one at a time: fewer of them (the check is calibrated either way)
    counts = bild_joint_counts(large, prompt, seed=0, n_rows=1000, rollback_threshold=0.0, fallback_threshold=0.0,
                               max_draft_tokens=3)  # fmt: skip
    assert chi_square_p_value(counts, expected) > 1e-3


@pytest.mark.parametrize("attached", PAIRS[:2], indirect=True, ids=["+".join(p) for p in PAIRS[:2]])
def test_siblings_need_attention_auto_skips_them_and_a_fixed_number_says_what_to_do(attached):
    large, _ = attached
    ids = prompts(1, seed=5)[0][None]
    out = large.generate(ids, generation_mode="bild", rollback_threshold=0.0, fallback_threshold=0.9,
                         max_new_tokens=8, pad_token_id=PAD, return_dict_in_generate=True)  # fmt: skip
    assert out.bild_stats.siblings == [0] and out.sequences.tolist() == greedy(large, ids, n_new=8).tolist()
    with pytest.raises(ValueError, match="recurrent.*fallback_candidates=1"):
        large.generate(ids, generation_mode="bild", fallback_candidates=3, max_new_tokens=4, pad_token_id=PAD)


def test_without_a_record_of_past_states_bild_says_to_upgrade(models, monkeypatch):
    monkeypatch.setattr("bild.compat.records_recurrent_states", lambda: False)
    large = models["mamba"]
    bild.attach(large, models["mamba-small"])
    try:
        with pytest.raises(NotImplementedError, match="bild rolls MambaForCausalLM.*transformers>=5.25"):
            large.generate(prompts(1)[0][None], generation_mode="bild", max_new_tokens=4, pad_token_id=PAD)
    finally:
        bild.detach(large)


def test_early_exit_refuses_a_recurrent_model_clearly(models):
    with pytest.raises(ValueError, match="bild.early_exit supports"):
        bild.early_exit(models["qwen3_5"], exit_layer=1)


@pytest.mark.parametrize("name", ["qwen3_5", "mamba"])
def test_crop_restores_the_state_before_the_dropped_tokens(models, name):
    """compat.crop_cache on a recurrent cache: dropping tokens within a round (settle=False) and at its end, even past
    the first drop, leaves the model where feeding only the kept tokens would. (Lossless oracles cannot see a wrong
    small-model state: it only changes the drafts.)"""
    model = models[name]
    assert has_recurrent_state(model)
    ids = torch.tensor([[5, 9, 23, 14, 17, 8, 30, 11, 40]])

    def next_logits(cache, new_ids):
        return model(new_ids, cache=cache, use_cache=True).logits[:, -1]

    def fed_alone(kept):
        return next_logits(new_cache(model), torch.cat([ids[:, :kept], torch.tensor([[21]])], dim=1))

    with torch.inference_mode():
        cache = new_cache(model)
        next_logits(cache, ids[:, :3])
        keep_recurrent_states(cache, 4)  # the round starts at index 3
        next_logits(cache, ids[:, 3:6])
        next_logits(cache, ids[:, 6:7])
        crop_cache(cache, 1, settle=False)  # drop index 6 within the round
        torch.testing.assert_close(next_logits(cache, torch.tensor([[21]])), fed_alone(6))
        next_logits(cache, ids[:, 7:9])
        crop_cache(cache, 4)  # the round ends at index 5: past the first drop
        torch.testing.assert_close(next_logits(cache, torch.tensor([[21]])), fed_alone(5))

"""What bild relies on in transformers beyond its public API (src/bild/compat.py), checked on the installed version."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import EOS, PAD, VOCAB, prompts
from transformers import (
    PegasusXConfig,
    PegasusXForConditionalGeneration,
    UMT5Config,
    UMT5ForConditionalGeneration,
)

from bild.compat import (
    absolute_positions,
    cache_kwarg,
    crop_cache,
    gather_cache_slots,
    has_relative_positions,
    new_cache,
    prepared_special_tokens,
    relative_positions,
    takes_forward_arg,
    tree_attention_mask,
)


def test_forward_takes_the_cache_position_ids_and_logits_to_keep(causal_pair, seq2seq_pair):
    large, _ = causal_pair
    t5, _ = seq2seq_pair
    assert takes_forward_arg(large, cache_kwarg(large)) and takes_forward_arg(t5, cache_kwarg(t5))
    assert takes_forward_arg(large, "position_ids") and takes_forward_arg(large, "logits_to_keep")
    assert not takes_forward_arg(t5, "position_ids")
    assert has_relative_positions(t5) and not has_relative_positions(large)


def test_crop_drops_slots_from_the_end_of_every_layer(causal_pair):
    large, _ = causal_pair
    ids = prompts(1, lengths=(9,))[0][None]
    cache = new_cache(large)
    large(input_ids=ids, **{cache_kwarg(large): cache}, use_cache=True)
    crop_cache(cache, 3)
    assert cache.get_seq_length() == 6
    full = large(input_ids=ids[:, 6:], **{cache_kwarg(large): cache}, use_cache=True).logits
    assert torch.allclose(full, large(input_ids=ids).logits[:, 6:], atol=1e-5)  # the cropped cache is exact


def test_gathered_slots_reorder_every_self_attention_layer(seq2seq_pair):
    t5, _ = seq2seq_pair
    src = prompts(2, lengths=(6,))
    src = torch.stack(src)
    cache = new_cache(t5)
    t5(input_ids=src, decoder_input_ids=torch.full((2, 4), PAD), **{cache_kwarg(t5): cache}, use_cache=True)
    before = [layer.keys.clone() for layer in cache.self_attention_cache.layers]
    order = torch.tensor([[3, 1], [0, 2]])
    gather_cache_slots(cache, order)
    for layer, keys in zip(cache.self_attention_cache.layers, before, strict=True):
        assert layer.keys.shape[2] == 2
        assert torch.equal(layer.keys[0, :, 0], keys[0, :, 3]) and torch.equal(layer.keys[1, :, 1], keys[1, :, 2])


def test_generate_hands_a_custom_loop_the_prepared_special_tokens(causal_pair):
    large, _ = causal_pair
    seen = {}

    def loop(model, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs):
        seen["eos"], seen["pad"] = prepared_special_tokens(generation_config)
        return input_ids

    large.generate(prompts(1)[0][None], custom_generate=loop, eos_token_id=[1, 5], pad_token_id=PAD)
    assert seen["eos"].tolist() == [1, 5] and int(seen["pad"]) == PAD


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_a_4d_mask_is_taken_as_given_in_the_format_of_the_attention(causal_pair, attention):
    """tree_attention_mask: the causal pattern as a custom 4D mask gives the model's own outputs, and hiding a
    key changes them (the mask is really used)."""
    large = copy.deepcopy(causal_pair[0])
    large.set_attn_implementation(attention)
    ids = prompts(1, lengths=(7,))[0][None]
    causal = torch.ones(7, 7, dtype=torch.bool).tril()[None]  # [1, Q, K]
    with torch.inference_mode():
        plain = large(ids).logits
        masked = large(ids, attention_mask=tree_attention_mask(large, causal)).logits
        hidden = causal.clone()
        hidden[0, 6, 5] = False
        changed = large(ids, attention_mask=tree_attention_mask(large, hidden)).logits
    torch.testing.assert_close(masked, plain)
    assert not torch.allclose(changed[0, 6], plain[0, 6]) and torch.allclose(changed[0, :6], plain[0, :6])


def assert_siblings_see_their_own_path(large, src, placing) -> None:
    """Siblings 30 and 11 of token 21, fed after the decoder path ``EOS 9 14 21`` and masked from each other,
    get the logits each gets as that token inside ``placing`` (which positions them at 21's place), and not
    without it; the path's own logits are unchanged."""
    path = torch.tensor([[EOS, 9, 14, 21]])  # decoder start, then tokens; 21 is replaced by each sibling
    siblings = [30, 11]
    ids = torch.cat([path, torch.tensor([siblings])], dim=1)  # [1, 6]
    allowed = torch.ones(6, 6, dtype=torch.bool).tril()
    allowed[4:, 3:] = torch.eye(6, dtype=torch.bool)[4:, 3:]  # each sibling sees the path before 21, and itself
    mask = tree_attention_mask(large, allowed[None])
    with torch.inference_mode():
        with placing:
            tree = large(src, decoder_input_ids=ids, decoder_attention_mask=mask).logits
        by_slot = large(src, decoder_input_ids=ids, decoder_attention_mask=mask).logits
        for j, sibling in enumerate(siblings):
            alone = large(src, decoder_input_ids=torch.cat([path[:, :3], torch.tensor([[sibling]])], dim=1)).logits
            torch.testing.assert_close(tree[0, 4 + j], alone[0, 3], rtol=1e-5, atol=1e-5)
            assert not torch.allclose(by_slot[0, 4 + j], alone[0, 3], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tree[0, :4], large(src, decoder_input_ids=path).logits[0])


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_t5_siblings_placed_by_explicit_positions_see_what_their_own_path_sees(seq2seq_pair, attention):
    """relative_positions: T5's relative attention bias from explicit positions instead of cache slots."""
    large = copy.deepcopy(seq2seq_pair[0])
    large.set_attn_implementation(attention)
    positions = torch.tensor([[0, 1, 2, 3, 3, 3]])
    assert_siblings_see_their_own_path(large, prompts(1, lengths=(6,))[0][None],
                                       relative_positions(large, positions, positions))  # fmt: skip


def test_umt5_siblings_placed_by_explicit_positions_see_what_their_own_path_sees():
    """UMT5: a relative bias in every layer, and a bucket function that reads its options from the layer."""
    torch.manual_seed(0)
    large = UMT5ForConditionalGeneration(UMT5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=PAD,
        pad_token_id=PAD, eos_token_id=EOS, attn_implementation="eager",
    )).eval()  # fmt: skip
    positions = torch.tensor([[0, 1, 2, 3, 3, 3]])
    assert_siblings_see_their_own_path(large, prompts(1, lengths=(6,))[0][None],
                                       relative_positions(large, positions, positions))  # fmt: skip


def test_pegasus_x_siblings_placed_by_explicit_positions_see_what_their_own_path_sees():
    """Pegasus-X: sinusoidal positions, passed to its embedding by position as a (query, 1) column."""
    torch.manual_seed(0)
    large = PegasusXForConditionalGeneration(PegasusXConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_global_tokens=4, block_size=4,
        pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=EOS, attn_implementation="eager",
    )).eval()  # fmt: skip
    src = torch.tensor([[5, 9, 12, 30, 7, EOS, 8, 4]])
    assert_siblings_see_their_own_path(large, src, absolute_positions(large, torch.tensor([0, 1, 2, 3, 3, 3])))


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_bart_siblings_placed_by_explicit_positions_see_what_their_own_path_sees(bart_pair, attention):
    """absolute_positions: a BART decoder's position embeddings, which follow the cache length otherwise."""
    large = copy.deepcopy(bart_pair[0])
    large.set_attn_implementation(attention)
    src = torch.tensor([[5, 9, 12, 30, 7, EOS]])
    assert_siblings_see_their_own_path(large, src, absolute_positions(large, torch.tensor([0, 1, 2, 3, 3, 3])))


def test_the_ensemble_weight_probe_says_whether_stock_assisted_generation_takes_it(causal_pair):
    from transformers import GenerationConfig

    from bild.compat import supports_assistant_ensemble_weight

    large, small = causal_pair
    ids = prompts(1)[0][None]
    if not supports_assistant_ensemble_weight():
        assert not hasattr(GenerationConfig(), "assistant_ensemble_weight")
        return
    out = large.generate(ids, assistant_model=small, assistant_ensemble_weight=0.5, max_new_tokens=3,
                         do_sample=False, pad_token_id=PAD)  # fmt: skip
    assert out.shape == (1, ids.shape[1] + 3)
    with pytest.raises(ValueError, match="assistant_ensemble_weight"):
        GenerationConfig(assistant_ensemble_weight=1.5).validate()

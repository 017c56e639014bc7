"""Decoders with sliding-window attention (Mistral, Gemma 2/3, ...): transformers builds the window from cache
slots, so rows of a batch, whose rejected drafts leave masked slots behind, keep their slots contiguous
(right-aligned) before every forward; siblings at an unsure token are skipped by "auto" and refused when fixed."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import EOS, PAD, left_pad, prompts
from transformers import MistralConfig, MistralForCausalLM

import bild

WINDOW = 4  # far shorter than the text, so it matters


def mistral(hidden: int, layers: int, seed: int) -> MistralForCausalLM:
    torch.manual_seed(seed)
    config = MistralConfig(
        vocab_size=48, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=WINDOW, pad_token_id=PAD,
        eos_token_id=EOS, attn_implementation="eager",
    )  # fmt: skip
    return MistralForCausalLM(config).eval()


@pytest.fixture(scope="module")
def windowed():
    """A random large model (its output depends on the window) and a noisy copy of it as the small one: drafts are
    often kept and sometimes not, so rows advance unevenly."""
    large = mistral(64, 2, 0)
    small = copy.deepcopy(large)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for weight in small.parameters():
            weight.add_(0.3 * weight.std() * torch.randn(weight.shape, generator=generator))
    bild.attach(large, small)
    yield large, small
    bild.detach(large)


def test_batch_rows_equal_rows_alone_under_a_window(windowed):
    large, _ = windowed
    rows = prompts(4, seed=11)
    ids, mask = left_pad(rows)
    out = large.generate(ids, attention_mask=mask, generation_mode="bild", rollback_threshold=0.0,
                         fallback_threshold=0.0, max_draft_tokens=3, max_new_tokens=12, pad_token_id=PAD,
                         return_dict_in_generate=True)  # fmt: skip
    assert len(set(out.bild_stats.large_forwards)) > 1  # rows advanced unevenly: rejected drafts left gaps
    for b, row in enumerate(rows):
        alone = large.generate(row[None], max_new_tokens=12, do_sample=False, pad_token_id=PAD)[0, len(row) :]
        assert out.sequences[b, ids.shape[1] :].tolist() == alone.tolist()


def test_siblings_are_skipped_under_a_window_and_a_fixed_number_says_what_to_do(windowed):
    large, _ = windowed
    ids = prompts(1, seed=5)[0][None]
    out = large.generate(ids, generation_mode="bild", rollback_threshold=0.0, fallback_threshold=0.9,
                         max_new_tokens=8, pad_token_id=PAD, return_dict_in_generate=True,
                         draft_costs=bild.DraftCosts(small=((1, 0.1),), large=((1, 1.0), (64, 1.0))))  # fmt: skip
    greedy = large.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=PAD)
    assert out.bild_stats.siblings == [0] and out.sequences.tolist() == greedy.tolist()
    with pytest.raises(ValueError, match="bild: .*sliding-window.*fallback_candidates=1"):
        large.generate(ids, generation_mode="bild", fallback_candidates=3, max_new_tokens=4, pad_token_id=PAD)

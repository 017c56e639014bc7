"""How BiLD plugs into generate(): the ways to turn it on, configs, attach(), and clear errors."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import PAD, left_pad, prompts, qwen, t5
from transformers import GenerationConfig

import bild
from bild.integration import BildGenerationMixin

SETTINGS = dict(fallback_threshold=0.5, rollback_threshold=1.0, max_draft_tokens=4)


@pytest.fixture()
def ids():
    return prompts(1)[0][None]


def run(large, ids, **kwargs):
    return large.generate(ids, max_new_tokens=12, pad_token_id=PAD, return_dict_in_generate=True, **kwargs)


def test_all_ways_to_turn_bild_on_agree(pair, ids, tmp_path):
    large, small = pair
    by_kwargs = run(large, ids, generation_mode="bild", **SETTINGS)
    by_config = run(large, ids, generation_config=bild.BildGenerationConfig(**SETTINGS))
    saved = bild.BildGenerationConfig(**SETTINGS, max_new_tokens=12, pad_token_id=PAD)
    saved.save_pretrained(tmp_path)
    by_loaded = large.generate(
        ids, generation_config=GenerationConfig.from_pretrained(tmp_path), return_dict_in_generate=True
    )
    by_assistant = run(
        bild.detach(large) and bild.attach(large),
        ids,
        generation_mode="bild",
        assistant_model=small,
        **SETTINGS,
    )
    bild.attach(large, small)
    original = large.generation_config
    large.generation_config = bild.BildGenerationConfig(**SETTINGS)
    try:
        by_model_config = run(large, ids)
    finally:
        large.generation_config = original
    for out in (by_config, by_loaded, by_assistant, by_model_config):
        assert out.sequences.tolist() == by_kwargs.sequences.tolist()
        assert out.bild_stats == by_kwargs.bild_stats
    assert isinstance(by_kwargs.bild_stats, bild.BildStats)
    assert isinstance(by_kwargs.cache, bild.BildCache)
    assert by_kwargs.bild_stats.large_forwards[0] < 12, "BiLD must have skipped large-model steps"


def test_kwargs_override_the_config_and_the_config_is_not_changed(pair, ids):
    large, _ = pair
    config = bild.BildGenerationConfig(fallback_threshold=1.0, rollback_threshold=5.0)
    out = run(large, ids, generation_config=config, fallback_threshold=0.0)
    assert out.bild_stats.fallbacks == [0]
    assert config.fallback_threshold == 1.0
    assert large.generation_config.to_dict().get("generation_mode") is None


def test_zero_thresholds_stay_zero(pair, ids):
    """A threshold of 0.0 is a real value, never replaced by a default."""
    large, _ = pair
    out = run(
        large,
        ids,
        generation_mode="bild",
        fallback_threshold=0.0,
        rollback_threshold=math.inf,
        max_draft_tokens=12,
    )
    assert out.bild_stats.fallbacks == [0]
    assert out.bild_stats.large_forwards == [1]


def test_config_round_trip(tmp_path):
    config = bild.BildGenerationConfig(
        fallback_threshold=0.0, rollback_threshold=math.inf, max_draft_tokens=3, max_new_tokens=7
    )
    config.save_pretrained(tmp_path)
    loaded = bild.BildGenerationConfig.from_pretrained(tmp_path)
    assert (loaded.fallback_threshold, loaded.rollback_threshold, loaded.max_draft_tokens) == (
        0.0,
        math.inf,
        3,
    )
    assert loaded.max_new_tokens == 7 and loaded.generation_mode == "bild"
    assert (
        json.loads((tmp_path / "generation_config.json").read_text().replace("Infinity", "1e999"))[
            "max_draft_tokens"
        ]
        == 3
    )


def test_stock_generation_is_unchanged(causal_pair, ids, tmp_path):
    large, small = causal_pair
    before = large.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=PAD)
    bild.attach(large, small)
    try:
        assert (
            large.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=PAD).tolist()
            == before.tolist()
        )
        assert all(m is not small for m in large.modules()), "the small model must not be a submodule"
        assert not any(k.startswith("_bild") for k in large.state_dict())
        large.save_pretrained(tmp_path)
        saved = json.loads((tmp_path / "config.json").read_text())
        assert saved["architectures"] == ["Qwen2ForCausalLM"]
        assert type(large).__name__ == "Qwen2ForCausalLM" and isinstance(large, BildGenerationMixin)
    finally:
        bild.detach(large)
    assert not isinstance(large, BildGenerationMixin)


def test_streamer_gets_final_tokens_only(pair, ids):
    large, _ = pair

    class Collect:
        def __init__(self):
            self.chunks = []
            self.ended = False

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    streamer = Collect()
    out = large.generate(ids, max_new_tokens=16, pad_token_id=PAD, generation_mode="bild", streamer=streamer,
                         fallback_threshold=0.5, rollback_threshold=0.0)  # fmt: skip
    assert streamer.ended and streamer.chunks[0] == ids[0].tolist()
    assert sum(streamer.chunks[1:], []) == out[0, ids.shape[1] :].tolist()


# --- errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(fallback_threshold=1.5), "fallback_threshold"),
        (dict(fallback_threshold=-0.1), "fallback_threshold"),
        (dict(rollback_threshold=-1.0), "rollback_threshold"),
        (dict(rollback_threshold=float("nan")), "rollback_threshold"),
        (dict(max_draft_tokens=0), "max_draft_tokens"),
        (dict(max_draft_tokens=2.5), "max_draft_tokens"),
        (dict(num_beams=2), "num_beams"),
        (dict(penalty_alpha=0.6, top_k=4), "contrastive search"),
        (dict(generator="seed"), "torch.Generator"),
        (dict(output_attentions=True, return_dict_in_generate=True), "output_attentions"),
        (dict(output_hidden_states=True, return_dict_in_generate=True), "output_hidden_states"),
        (dict(generation_mode="turbo"), "generation_mode"),
        (dict(cache=None, past_key_values="x"), "past_key_values"),
    ],
)
def test_bad_settings_raise_clear_errors(pair, ids, kwargs, message):
    large, _ = pair
    kwargs.setdefault("generation_mode", "bild")
    with pytest.raises(ValueError, match=message):
        large.generate(ids, max_new_tokens=4, pad_token_id=PAD, **kwargs)


def test_config_validation_errors():
    with pytest.raises(ValueError, match=r"fallback_threshold.*\[0, 1\]"):
        bild.BildGenerationConfig(fallback_threshold=2.0)
    with pytest.raises(ValueError, match="rollback_threshold"):
        bild.BildGenerationConfig(rollback_threshold=-1)


def test_bild_settings_without_bild_mode_are_refused(pair, ids):
    large, _ = pair
    with pytest.raises(ValueError, match="generation_mode='bild'"):
        large.generate(ids, max_new_tokens=4, fallback_threshold=0.5)


def test_missing_small_model(causal_pair, ids):
    large, _ = causal_pair
    bild.attach(large)
    try:
        with pytest.raises(ValueError, match="needs a small model"):
            large.generate(ids, generation_mode="bild", max_new_tokens=4)
    finally:
        bild.detach(large)


def test_pair_errors(causal_pair, seq2seq_pair, tokenizer):
    large, small = causal_pair
    with pytest.raises(ValueError, match="encoder-decoder"):
        bild.attach(large, seq2seq_pair[1])
    with pytest.raises(ValueError, match=r"48 vocabulary rows.*300|300 vocabulary rows.*48"):
        bild.attach(large, qwen(16, 1, seed=2, vocab=300))
    with pytest.raises(ValueError, match="device"):
        bild.attach(large, qwen(16, 1, seed=2).to("meta"))
    with pytest.raises(ValueError, match="transformers model"):
        bild.attach(large, torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="bild.attach needs"):
        bild.attach(torch.nn.Linear(2, 2), small)
    bild.attach(large, small)
    try:
        other_tokenizer = copy.deepcopy(tokenizer)
        other_tokenizer.add_tokens(["extra"])  # one more token: another vocabulary
        with pytest.raises(ValueError, match="tokenizers differ"):
            large.generate(prompts(1)[0][None], generation_mode="bild", max_new_tokens=4, pad_token_id=PAD,
                           tokenizer=tokenizer, assistant_tokenizer=other_tokenizer)  # fmt: skip
    finally:
        bild.detach(large)


def test_right_padding_is_refused(pair):
    large, _ = pair
    ids, mask = left_pad(prompts(2))
    right_ids, right_mask = ids.flip(1), mask.flip(1)
    with pytest.raises(ValueError, match="padding_side = 'left'"):
        large.generate(
            right_ids, attention_mask=right_mask, generation_mode="bild", max_new_tokens=4, pad_token_id=PAD
        )


def test_seq2seq_needs_token_ids():
    large, small = t5(32, 1, seed=0), t5(32, 1, seed=1)
    bild.attach(large, small)
    embeds = large.get_input_embeddings()(torch.tensor([[5, 6, 7]]))
    with pytest.raises(ValueError, match="input_ids"):
        large.generate(inputs_embeds=embeds, generation_mode="bild", max_new_tokens=4)

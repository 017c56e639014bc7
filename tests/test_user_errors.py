"""Issue 12, one test per case: what a new user tries either works as in transformers or raises a clear ValueError."""

from __future__ import annotations

import copy
import io
import json
import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import PAD, char_tokenizer, left_pad, prompts
from transformers import GenerationConfig, StoppingCriteria

import bild
import bild.decoding
from bild.bench import cli
from bild.integration import BildGenerationMixin

SETTINGS = dict(fallback_threshold=0.5, rollback_threshold=1.0, max_draft_tokens=4)


@pytest.fixture()
def ids():
    return prompts(1)[0][None]  # [1, T]


def run_cli(*args: str, home) -> subprocess.CompletedProcess:
    """The ``bild`` command line in a fresh process, offline, with ``BILD_HOME`` at ``home``."""
    env = {**os.environ, "BILD_HOME": str(home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "bild.bench.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_1_cli_accepts_a_small_model_saved_without_tokenizer(causal_pair, tmp_path):
    large, small = causal_pair
    large.save_pretrained(tmp_path / "large")
    char_tokenizer().save_pretrained(tmp_path / "large")
    small.save_pretrained(tmp_path / "small")  # a fine-tuned drafter: model files only
    result = run_cli(
        "generate", "--large", str(tmp_path / "large"), "--small", str(tmp_path / "small"), "--prompt", "abc",
        "--max-new-tokens", "3", "--device", "cpu", "--dtype", "float32", "--threads", "1", home=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "different tokenizers" not in result.stderr and "small_forwards" in result.stdout


def test_2_bild_config_on_a_model_never_attached_raises(causal_pair, ids):
    large, small = causal_pair
    config = bild.BildGenerationConfig(**SETTINGS, max_new_tokens=4, pad_token_id=PAD)
    with pytest.raises(ValueError, match=r"call bild\.attach\(model, small_model\) first"):
        large.generate(ids, generation_config=config)
    original = large.generation_config
    large.generation_config = config  # what Seq2SeqTrainer(args=...(generation_config=config)) does
    try:
        with pytest.raises(ValueError, match=r"bild\.attach"):
            large.generate(ids)
        bild.attach(large, small)
        assert large.generate(ids, return_dict_in_generate=True).bild_stats.generated == [4]
        bild.detach(large)
        with pytest.raises(ValueError, match=r"bild\.attach"):
            large.generate(ids)
    finally:
        bild.detach(large)
        large.generation_config = original
    with pytest.raises(ValueError, match="generation_mode"):  # stock's own error: transformers has no hook here
        large.generate(ids, generation_mode="bild", max_new_tokens=4, pad_token_id=PAD)


def test_3_attached_model_pickles_without_its_small_model(pair, ids):
    large, small = pair
    expected = large.generate(ids, generation_mode="bild", max_new_tokens=8, pad_token_id=PAD, **SETTINGS)
    buffer = io.BytesIO()
    torch.save(large, buffer)
    for loaded in (pickle.loads(pickle.dumps(large)), torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)):
        assert isinstance(loaded, BildGenerationMixin) and type(loaded).__name__ == "Qwen2ForCausalLM"
        assert loaded._bild_assistant_model is None, "the small model does not travel with the pickle"
        with pytest.raises(ValueError, match=r"bild\.attach\(large, small\)"):
            loaded.generate(ids, generation_mode="bild", max_new_tokens=8, pad_token_id=PAD)
        bild.attach(loaded, small)
        out = loaded.generate(ids, generation_mode="bild", max_new_tokens=8, pad_token_id=PAD, **SETTINGS)
        assert out.tolist() == expected.tolist()
        assert not isinstance(bild.detach(loaded), BildGenerationMixin)


class StopAfter(StoppingCriteria):
    def __init__(self, length: int):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


def test_4_a_huge_budget_that_stops_early_allocates_little(pair, ids, monkeypatch):
    """10**11 new tokens would be 800 GB of token ids if the buffer were allocated for the whole budget."""
    large, _ = pair
    states = []
    loop = bild.decoding.bild_loop

    def recording_loop(*args, **kwargs):
        states.extend(a for a in args if isinstance(a, bild.state.BatchState))
        return loop(*args, **kwargs)

    monkeypatch.setattr(bild.decoding, "bild_loop", recording_loop)
    stop = StopAfter(ids.shape[1] + 5)
    out = large.generate(ids, generation_mode="bild", max_new_tokens=10**11, pad_token_id=PAD,
                         stopping_criteria=[stop], **SETTINGS)  # fmt: skip
    assert out.shape[1] == ids.shape[1] + 5
    assert len(states) == 1 and states[0].token_ids.shape[1] <= ids.shape[1] + bild.state.MIN_CAPACITY


def test_5_settings_are_merged_or_refused_never_dropped(pair, ids):
    large, _ = pair
    original = large.generation_config
    large.generation_config = copy.deepcopy(original)
    large.generation_config.fallback_threshold = 0.0
    passed = bild.BildGenerationConfig(
        rollback_threshold=math.inf, max_draft_tokens=12, max_new_tokens=12, pad_token_id=PAD
    )  # no fallback_threshold: the model's 0.0 applies, as stock generate() merges the two configs
    try:
        out = large.generate(ids, generation_config=passed, return_dict_in_generate=True)
        assert out.bild_stats.fallbacks == [0] and out.bild_stats.large_forwards == [1]
        large.generation_config.generation_mode = "bild"
        opted_out = large.generate(ids, generation_mode=None, max_new_tokens=6, pad_token_id=PAD,
                                   return_dict_in_generate=True)  # fmt: skip
        assert not hasattr(opted_out, "bild_stats"), "generation_mode=None must run stock generate()"
    finally:
        large.generation_config = original
    for kwargs, message in [
        (dict(cache_implementation="static"), "cache_implementation='static'"),
        (dict(cache_implementation="paged"), "cache_implementation='paged'"),
        (dict(prompt_lookup_num_tokens=-1), "prompt_lookup_num_tokens` must be an integer >= 0"),  # 3: context drafts
        (dict(dola_layers="low"), "dola_layers"),
        (dict(custom_generate=lambda *args, **kwargs: None), "custom_generate"),
        (dict(position_ids=torch.arange(ids.shape[1])[None]), "position_ids"),
    ]:
        with pytest.raises(ValueError, match=message):
            large.generate(ids, generation_mode="bild", max_new_tokens=4, pad_token_id=PAD, **kwargs)


def test_6_inputs_without_a_hint_now_get_one(pair, s2s, ids):
    large, _ = pair
    embeds = large.get_input_embeddings()(ids)
    with pytest.raises(ValueError, match="input_ids"):
        large.generate(inputs_embeds=embeds, generation_mode="bild", max_new_tokens=4, pad_token_id=PAD)
    for model in (large, s2s[0]):
        with pytest.raises(ValueError, match="at least one token"):
            model.generate(ids[:, :0], generation_mode="bild", max_new_tokens=4, pad_token_id=PAD)


def test_6_cli_errors_say_what_to_change(tmp_path, capsys):
    """Models not prepared (an empty model folder), a missing path, broken YAML, an unknown device: exit 2."""
    (tmp_path / "models" / "qwen-large").mkdir(parents=True)
    result = run_cli("generate", "--large", "qwen-large", "--small", "qwen-small", "--prompt", "x", "--device", "cpu",
                     home=tmp_path)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "scripts/prepare_models.py" in result.stderr and str(tmp_path / "models") in result.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("task: translation\nsmall: [unclosed\n")
    for argv, message in [
        (["generate", "--large", str(tmp_path / "nowhere"), "--small", "s", "--prompt", "x", "--device", "cpu"],
         "does not exist"),
        (["bench", "--config", str(broken)], "not valid YAML"),
        (["generate", "--large", "l", "--small", "s", "--prompt", "x", "--device", "tpu"], "device must be one of"),
    ]:  # fmt: skip
        assert cli.main(argv) == 2
        assert message in capsys.readouterr().err


def test_7_smaller_cases(pair, ids, tmp_path):
    large, small = pair
    # rollback_threshold=inf saves as standard JSON and loads back, also as a plain GenerationConfig
    config = bild.BildGenerationConfig(rollback_threshold=math.inf, max_new_tokens=6, pad_token_id=PAD)
    config.save_pretrained(tmp_path)
    text = (tmp_path / "generation_config.json").read_text()
    strict = json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))  # no Infinity/NaN
    assert strict["rollback_threshold"] == "inf"
    assert bild.BildGenerationConfig.from_pretrained(tmp_path).rollback_threshold == math.inf
    plain = GenerationConfig.from_pretrained(tmp_path)
    assert large.generate(ids, generation_config=plain, return_dict_in_generate=True).bild_stats.rollbacks == [0]
    # numpy scalars are numbers; a bad one is named with its range
    config = bild.BildGenerationConfig(fallback_threshold=np.float32(0.5), max_draft_tokens=np.int64(5))
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "generation_config.json").read_text())["max_draft_tokens"] == 5
    large.generate(ids, generation_mode="bild", fallback_threshold=np.float64(0.5), max_draft_tokens=np.int32(3),
                   max_new_tokens=4, pad_token_id=PAD)  # fmt: skip
    with pytest.raises(ValueError, match=r"fallback_threshold.*\[0, 1\]"):
        large.generate(ids, generation_mode="bild", fallback_threshold=np.float32(1.5), max_new_tokens=4)
    # deepcopy copies the large model and shares the small one
    copied = copy.deepcopy(large)
    assert copied._bild_assistant_model is small and copied.lm_head.weight is not large.lm_head.weight
    assert copy.copy(large)._bild_assistant_model is small
    # a prompt of only padding has nothing to continue: refused (stock continues from pad embeddings)
    rows, mask = left_pad([prompts(1)[0], torch.tensor([], dtype=torch.long)])
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] has no tokens"):
        large.generate(rows, attention_mask=mask, generation_mode="bild", max_new_tokens=4, pad_token_id=PAD)

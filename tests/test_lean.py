"""`bild.lean`: the drafter's forward written out for the Llama family, and its compiled one-token step.

The lean forward must give the model's own logits and cache (float32, every model type it takes, padded batches,
chunks after a cache, slots a row skips); in bild's loop it must change nothing but the time; the compiled step
must compile once per batch shape (one for a batch of one, one for larger ones) whatever the cache length.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from conftest import EOS, PAD, left_pad, prompts
from torch import nn
from transformers import (
    DynamicCache,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import bild
from bild.bench.bench_config import parse_method
from bild.bench.methods import verifier_forward
from bild.compat import cache_kwarg
from bild.lean import LeanForward, keep_own_forward, lean_forward, lean_obstacle, loop_forward, own_forward
from bild.schedule import DraftCosts
from bild.timing import forward_ms

VOCAB = 48
SIZES = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, pad_token_id=PAD, eos_token_id=EOS,
)  # fmt: skip
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 8}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
}


def family(name: str, seed: int = 0, attn: str = "sdpa", **overrides):
    config_class, model_class, extra = FAMILIES[name]
    torch.manual_seed(seed)
    config = config_class(**SIZES, **{**extra, **overrides}, attn_implementation=attn)
    return model_class(config).eval()


def model_forward(model, ids, visible, positions, cache, keep=None):
    return model(input_ids=ids, attention_mask=visible, position_ids=positions, use_cache=True,
                 logits_to_keep=keep or 0, **{cache_kwarg(model): cache}).logits  # fmt: skip


@pytest.mark.parametrize("name", FAMILIES)
def test_lean_logits_and_cache_equal_the_models_own(name):
    """A padded prefill, a chunk after it, one-token steps, and a slot one row skips: logits of every real token and
    the cache equal the model's own forward's (float32)."""
    model = family(name)
    lean = LeanForward(len(model.model.layers))
    ids, mask = left_pad(prompts(3))  # [3, T], left padding
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    ours, theirs = DynamicCache(), DynamicCache()
    with torch.no_grad():
        chunks = [(ids, mask.bool(), positions)]
        step_mask = torch.cat([mask, torch.ones(3, 2, dtype=torch.long)], dim=1)
        chunks.append((torch.tensor([[5, 6], [7, 8], [9, 10]]), step_mask.bool(), positions[:, -1:] + torch.tensor([1, 2])))
        skip = torch.cat([step_mask, torch.tensor([[1], [0], [1]])], dim=1)  # row 1 sits this token out
        chunks.append((torch.tensor([[11], [0], [12]]), skip.bool(), positions[:, -1:] + 3))
        for ids_, visible, pos in chunks:
            got = lean(model, ids_, visible, pos, ours)
            want = model_forward(model, ids_, visible.long(), pos, theirs)
            real = visible[:, -ids_.shape[1]:]  # the tokens fed (padding and skipped slots give unused outputs)
            torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
        used = skip.bool()  # [B, S] slots holding a token (a padding's or skipped slot holds garbage)
        for a, b in zip(ours.layers, theirs.layers, strict=True):
            torch.testing.assert_close(a.keys.transpose(1, 2)[used], b.keys.transpose(1, 2)[used])
            torch.testing.assert_close(a.values.transpose(1, 2)[used], b.values.transpose(1, 2)[used])
        got = lean(model, torch.tensor([[13], [14], [15]]), None, positions[:, -1:] + 4, ours, logits_to_keep=1)
        assert got.shape == (3, 1, VOCAB)


@pytest.mark.parametrize("name", ["qwen2", "qwen3"])
@pytest.mark.parametrize("quantization", ["int4", "int8", "int8-dynamic"])
def test_compressed_drafter_steps_through_fused_projections(name, quantization):
    """A compressed drafter's one-token steps run q, k and v as one packed layer, an int8-dynamic one's gate and up
    as another (and rotate queries and keys together where no per-head norm sits between): logits and cache as the
    model's own forward's; a chunk as long as the dense prefill threshold takes the parts' own path; replacing a
    projection makes the fusion again."""
    model = bild.compress_drafter(family(name), quantization, vocab_size=None)
    lean = LeanForward(len(model.model.layers))
    ids = torch.randint(3, VOCAB, (1, 20), generator=torch.Generator().manual_seed(0))  # past the dense threshold
    ours, theirs = DynamicCache(), DynamicCache()
    with torch.no_grad():
        steps = [(ids, torch.arange(20)[None])] + [(torch.tensor([[t]]), torch.tensor([[20 + t]])) for t in range(4)]
        for step_ids, pos in steps:
            got = lean(model, step_ids, None, pos, ours)
            want = model_forward(model, step_ids, None, pos, theirs)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for a, b in zip(ours.layers, theirs.layers, strict=True):
            torch.testing.assert_close(a.keys, b.keys)
            torch.testing.assert_close(a.values, b.values)
    fused = lean.fused(model.model)
    mlp = model.model.layers[0].mlp
    assert all(f.qkv is not None and f.qkv.features == (32, 16, 16) for f in fused)
    if quantization == "int8-dynamic":  # the only kind whose gate and up are fused (each call quantizes its input)
        assert all(f.gate_up is not None and f.gate_up.features == (mlp.gate_proj.out_features,) * 2 for f in fused)
        assert fused[0].gate_up.below_rows == min(p.dense_from_rows for p in (mlp.gate_proj, mlp.up_proj))
    else:
        assert all(f.gate_up is None for f in fused)
    attn = model.model.layers[0].self_attn  # each part's threshold is timed per shape: the fused layer takes the least
    assert fused[0].qkv.below_rows == min(p.dense_from_rows for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    model.model.layers[0].self_attn.q_proj = nn.Linear(32, 32)
    again = lean.fused(model.model)
    assert again[0].qkv is None and again[1].qkv is not None and (again[0].gate_up is None) == (fused[0].gate_up is None)
    assert all(f == (None, None) for f in LeanForward(2).fused(family(name).model))  # dense projections stay apart


def test_costs_time_the_drafter_as_the_loop_runs_it(causal_pair, tmp_path, monkeypatch):
    """The pair's measured costs time a drafter by the forward bild's loop gives it (lean, compiled or its own), and
    store that in their key, so costs measured one way are not read for another."""
    monkeypatch.setenv("BILD_HOME", str(tmp_path))
    large, small = causal_pair
    drafter, own = copy.deepcopy(small), keep_own_forward(copy.deepcopy(small))
    lean_runs, own_runs = [], []
    handle = lean_forward(drafter).register_hooks(lambda: lean_runs.append(1), lambda: None)
    hook = drafter.register_forward_hook(lambda *args: own_runs.append(1))
    try:
        forward_ms(drafter, context=8, n_new=2, repeats=2, in_loop=True)
        assert (len(lean_runs), len(own_runs)) == (4, 0)  # the context, a warm-up and 2 timed
        forward_ms(drafter, context=8, n_new=2, repeats=2)
        assert (len(lean_runs), len(own_runs)) == (4, 4)
    finally:
        handle.remove()
        hook.remove()
    assert (loop_forward(drafter), loop_forward(own)) == ("lean", "own")
    DraftCosts.for_pair(large, drafter)
    DraftCosts.for_pair(large, own)
    with own_forward(large):
        DraftCosts.for_pair(large, drafter)
    assert loop_forward(large) == "lean"  # own_forward only inside its block
    keys = [json.loads(path.read_text())["key"] for path in (tmp_path / "fit").glob("costs-*.json")]
    assert sorted((key["large_forward"], key["small_forward"]) for key in keys) == [
        ("lean", "lean"), ("lean", "own"), ("own", "lean")]


def test_obstacles():
    assert lean_obstacle(family("qwen2")) is None
    assert "sliding" in lean_obstacle(family("mistral", sliding_window=16))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4))
    assert "gpt2" in lean_obstacle(gpt2)
    assert lean_forward(gpt2) is None
    with pytest.raises(ValueError, match="cannot compile"):
        bild.compile_drafter(gpt2)


def test_compiling_without_a_compiler_says_what_to_install(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(ValueError, match="install g\\+\\+"):
        bild.compile_drafter(family("qwen2"))


def run_bild(pair, batch, **kwargs):
    large, small = pair
    ids, mask = left_pad(prompts(batch, seed=4))
    bild.attach(large, small)
    try:
        out = large.generate(ids, attention_mask=mask, generation_mode="bild", max_new_tokens=24, pad_token_id=PAD,
                             return_dict_in_generate=True, **kwargs)  # fmt: skip
    finally:
        bild.detach(large)
    return out.sequences, out.bild_stats


@pytest.mark.parametrize("batch", [1, 3])
def test_the_loop_with_and_without_the_lean_forward(causal_pair, batch):
    """A lossy run (drafts decide the output) is the same token for token, with the same counts, whether the drafter
    runs lean or through its own forward: the lean forward changes nothing but the time."""
    large, small = causal_pair
    own = keep_own_forward(copy.deepcopy(small))
    assert lean_forward(own) is None and lean_forward(small) is not None
    # the same costs for both: measured ones time each drafter by its own forward kind, so they differ by noise
    costs = dataclasses.asdict(DraftCosts.estimate(large, small))
    settings = dict(fallback_threshold=0.5, rollback_threshold=1.0, max_draft_tokens=6, fallback_candidates=0,
                    draft_costs=costs)  # fmt: skip
    lean_sequences, lean_stats = run_bild((large, small), batch, **settings)
    sequences, stats = run_bild((large, own), batch, **settings)
    torch.testing.assert_close(lean_sequences, sequences)
    assert lean_stats == stats
    assert sum(stats.small_forwards) > 10 and sum(stats.rollbacks) > 0  # the drafter really drafted, and erred


@pytest.mark.parametrize("quantization", [None, "int8-dynamic"])
def test_compiled_step_compiles_once_per_batch_shape(causal_pair, quantization):
    """With a counting backend: one graph for batches of one through a whole run (cache growing, cropped after each
    rollback, several calls), one more for a batch of three (a graph break would make more); outputs equal the
    uncompiled drafter's (lossless: the large model's own). An int8-dynamic drafter's fbgemm calls are opaque
    operators inside the one graph."""
    large, small = causal_pair
    drafter = copy.deepcopy(small)
    if quantization:
        drafter = bild.compress_drafter(drafter, quantization, vocab_size=None)
    graphs = []

    def counting(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    bild.compile_drafter(drafter, backend=counting)
    for batch in (1, 1, 3, 3):
        compiled, compiled_stats = run_bild((large, drafter), batch, rollback_threshold=0.0)
        plain, _ = run_bild((large, small), batch, rollback_threshold=0.0)
        torch.testing.assert_close(compiled, plain)
        assert sum(compiled_stats.rollbacks) > 0
        assert len(graphs) == (1 if batch == 1 else 2)
    assert lean_forward(drafter).n_compiled_steps > 20
    with pytest.raises(ValueError, match="needs the lean forward"):
        keep_own_forward(drafter)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("lossless", [False, True])
def test_the_large_model_verifies_by_its_lean_forward(causal_pair, batch, lossless):
    """bild's loop runs the large model (the verifier, whose logits decide every token) by its lean forward too:
    the same output and counts as by its own forward, lossy or lossless (then the float32 oracle: large greedy),
    with every large forward through the lean one."""
    large, small = causal_pair
    settings = dict(rollback_threshold=0) if lossless else dict(fallback_threshold=0.5, rollback_threshold=1.0,
                                                                 max_draft_tokens=6)  # fmt: skip
    settings.update(fallback_candidates=0, draft_costs=dataclasses.asdict(DraftCosts.estimate(large, small)))
    lean_runs, own_runs = [], []
    handle = lean_forward(large).register_hooks(lambda: lean_runs.append(1), lambda: None)
    hook = large.register_forward_hook(lambda *args: own_runs.append(1))
    try:
        lean_sequences, lean_stats = run_bild((large, small), batch, **settings)
        n_lean = len(lean_runs)
        with own_forward(large):
            sequences, stats = run_bild((large, small), batch, **settings)
    finally:
        handle.remove()
        hook.remove()
    assert torch.equal(lean_sequences, sequences) and lean_stats == stats
    assert n_lean == len(lean_runs) == len(own_runs) == max(stats.large_forwards)
    if lossless:
        ids, mask = left_pad(prompts(batch, seed=4))
        expected = large.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=PAD)
        assert torch.equal(lean_sequences, expected)


def test_a_bench_method_can_verify_by_the_large_models_own_forward(causal_pair):
    """``large_lean: false`` in a bench config's bild method times the large model by its own forward, beside
    methods that run it lean (same model, same run); unset, the method's journal key is as before."""
    spec = parse_method({"name": "bild", "large_lean": False})
    assert spec.params["large_lean"] is False and spec.label.endswith("+own-large)")
    assert "large_lean" not in parse_method({"name": "bild", "large_lean": True}).params
    with pytest.raises(ValueError, match="`large_lean` must be true or false"):
        parse_method({"name": "bild", "large_lean": "no"})
    large = causal_pair[0]
    with verifier_forward(large, lean=False):
        assert loop_forward(large) == "own"
    assert loop_forward(large) == "lean"


"""`bild.early_exit`: the drafter's logits, the shared KV cache, BiLD's oracles, layer counts, errors, training."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import CHAIN, FIRST_WORD, PAD, VOCAB, left_pad, prompts, qwen, t5
from tiny_models import train
from transformers import GPT2Config, GPT2LMHeadModel

import bild
from bild.decoding import can_batch_rows
from bild.early_exit import EarlyExitDrafter, additive_mask, distillation_loss, early_exit, train_exit
from bild.integration import check_pair, vocab_size
from bild.schedule import forward_bytes
from bild.state import BatchState, DecoderInputs

EXIT_LAYER = 2
N_LAYERS = 4
ATOL = 1e-5  # float32: the cached, chunked computation and the full one differ by summation order only


def skip_chain(n: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """`(n, length)` ids where token t+1 is ``CHAIN[token t-1]`` 90% of the time, a random word otherwise.

    Unlike the plain chain (a bigram that the embedding and head alone can learn), this needs attention to an
    earlier token, which a tiny model learns in its middle layers: an exit after layer 2 agrees with it on
    about 70% of the tokens before training, so drafts are sometimes wrong (rollbacks) and training helps.
    """
    seq = torch.randint(FIRST_WORD, VOCAB, (n, length), generator=generator)
    for t in range(2, length):
        keep = torch.rand(n, generator=generator) < 0.9
        seq[:, t] = torch.where(keep, CHAIN[seq[:, t - 2]], seq[:, t])
    return seq


def skip_chain_batches(generator):
    ids = skip_chain(32, 24, generator)
    return {"input_ids": ids, "labels": ids}


def training_text(n: int = 40) -> list[torch.Tensor]:
    return list(skip_chain(n, 24, torch.Generator().manual_seed(5)))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: see conftest.one_thread


@pytest.fixture(scope="module")
def exit_model(one_thread):
    """``(large, drafter, training result)``: a 4-layer Qwen2 and an exit after layer 2, briefly trained."""
    large = train(qwen(64, N_LAYERS, seed=0), skip_chain_batches, steps=120, seed=0)
    drafter = early_exit(large, EXIT_LAYER)
    result = train_exit(large, drafter, training_text(), steps=5, lr=3e-4, batch_size=8, seq_len=24, progress=False)
    return large, drafter, result


def by_hand(large, layers, token_ids: torch.Tensor) -> torch.Tensor:
    """`(T, V)` logits of one unpadded row: ``layers`` over the full sequence, no cache, then norm and head."""
    token_ids = token_ids[None]  # [1, T]
    positions = torch.arange(token_ids.shape[1])[None]
    hidden = large.model.embed_tokens(token_ids)
    causal = additive_mask(positions, positions, hidden.dtype)  # [1, 1, T, T]
    rope = large.model.rotary_emb(hidden, positions)
    for layer in layers:
        hidden = layer(hidden, attention_mask=causal, position_ids=positions, position_embeddings=rope)
    return large.lm_head(large.model.norm(hidden))[0]


def exit_by_hand(drafter, token_ids):
    return by_hand(drafter.large, [*drafter.lower_layers, drafter.adapter], token_ids)


def strip(row: torch.Tensor) -> list[int]:
    ids = row.tolist()
    while ids and ids[-1] == PAD:
        ids.pop()
    return ids


def bild_generate(large, drafter, ids, mask=None, **kwargs):
    bild.attach(large, drafter)
    try:
        return large.generate(ids, attention_mask=mask, generation_mode="bild", return_dict_in_generate=True,
                              max_new_tokens=kwargs.pop("max_new_tokens", 20), pad_token_id=PAD, **kwargs)  # fmt: skip
    finally:
        bild.detach(large)


class TokenCounter:
    """Counts the token positions that pass through each given module (batch rows times chunk length)."""

    def __init__(self, **modules):
        self.counts = dict.fromkeys(modules, 0)
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name):
        def hook(module, args, output):
            self.counts[name] += args[0].shape[0] * args[0].shape[1]

        return hook

    def __enter__(self):
        return self.counts

    def __exit__(self, *_):
        for handle in self.handles:
            handle.remove()


class PlainExit(EarlyExitDrafter):
    """The same drafter without `bild_decoders`: BiLD runs it as a separate small model with its own cache."""

    @property
    def bild_decoders(self):
        raise AttributeError("a plain two-model run")


# --- the drafter is the large model's first layers plus the exit ------------------------------------------------


def test_drafter_shares_every_weight_but_the_adapter(exit_model):
    large, drafter, _ = exit_model
    assert {name.split(".")[0] for name, _ in drafter.named_parameters()} == {"adapter"}
    assert all(key.startswith("adapter.") for key in drafter.state_dict())
    assert drafter.get_output_embeddings() is large.lm_head and drafter.lower_layers[0] is large.model.layers[0]
    check_pair(large, drafter)  # a transformers model with generate(), same kind, device and vocabulary
    assert vocab_size(drafter) == VOCAB and can_batch_rows(drafter)
    copied = copy.deepcopy(drafter)
    assert copied.large is large and copied.adapter is not drafter.adapter


def test_drafter_logits_equal_the_layers_run_by_hand(exit_model):
    large, drafter, _ = exit_model
    rows = prompts(4)
    ids, mask = left_pad(rows)
    state = BatchState.from_prompts(ids, mask, max_length=ids.shape[1] + 6, pad_id=PAD)
    _, small, _ = drafter.bild_decoders(large, DecoderInputs(ids, mask), VOCAB, len(rows))
    is_drafting = torch.tensor([True, True, False, True])  # row 2 sits the first steps out, then catches up
    with torch.no_grad():
        for step in range(6):
            is_drafting = is_drafting | (step >= 3)
            logits = small.forward(state, is_drafting, first_target=state.lengths, n_targets=1)[:, 0]  # [B, V]
            for b in is_drafting.nonzero().flatten().tolist():
                row = state.token_ids[b, int(state.n_pads[b]) : int(state.lengths[b])]
                torch.testing.assert_close(logits[b], exit_by_hand(drafter, row)[-1], atol=ATOL, rtol=0)
            state.write(is_drafting, state.lengths, logits.argmax(dim=-1))
            state.lengths += is_drafting
        # the plain forward (stock generate(), profiling) computes the same over a whole row
        full = drafter(rows[0][None]).logits[0]
        torch.testing.assert_close(full, exit_by_hand(drafter, rows[0]), atol=ATOL, rtol=0)


def test_large_logits_with_shared_kv_equal_a_full_forward(exit_model):
    large, drafter, _ = exit_model
    ids, mask = left_pad(prompts(4))
    state = BatchState.from_prompts(ids, mask, max_length=ids.shape[1] + 20, pad_id=PAD)
    verifier, small, caches = drafter.bild_decoders(large, DecoderInputs(ids, mask), VOCAB, 4)
    is_active = torch.ones(4, dtype=torch.bool)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n_drafts in (3, 1, 4):
            start = state.lengths.clone()
            for _ in range(n_drafts):  # the drafter fills the shared lower layers and layer k's inputs
                logits = small.forward(state, is_active, first_target=state.lengths, n_targets=1)
                state.write(is_active, state.lengths, logits[:, 0].argmax(dim=-1))
                state.lengths += 1
            target_logits = verifier.forward(state, is_active, first_target=start, n_targets=n_drafts + 1)
            expected = full_forward(large, state)  # [B, T, V]
            for b in range(4):
                columns = torch.arange(int(start[b]) - 1, int(state.lengths[b]))
                torch.testing.assert_close(target_logits[b], expected[b, columns], atol=ATOL, rtol=0)
            keep = start + torch.randint(0, n_drafts + 1, (4,), generator=generator)  # roll back, as a round does
            caches.discard_from(keep)
            state.write(is_active, keep, torch.randint(3, VOCAB, (4,), generator=generator))
            state.lengths = keep + 1


def full_forward(large, state: BatchState) -> torch.Tensor:
    """`(B, T, V)` the large model's logits over each row's tokens, computed from scratch."""
    length = int(state.lengths.max())
    index = torch.arange(length)
    mask = ((index >= state.n_pads[:, None]) & (index < state.lengths[:, None])).long()
    positions = (index - state.n_pads[:, None]).clamp(min=0)
    return large(input_ids=state.token_ids[:, :length], attention_mask=mask, position_ids=positions).logits


# --- BiLD's oracles -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("fallback_threshold", [0.0, 0.5, 0.9])
def test_rollback_zero_is_large_greedy(exit_model, batch_size, fallback_threshold):
    large, drafter, _ = exit_model
    ids, mask = left_pad(prompts(batch_size))
    expected = large.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=PAD)
    out = bild_generate(large, drafter, ids, mask, fallback_threshold=fallback_threshold, rollback_threshold=0.0,
                        max_draft_tokens=6)  # fmt: skip
    assert [strip(r) for r in out.sequences] == [strip(r) for r in expected]
    if fallback_threshold < 0.9:
        assert sum(out.bild_stats.accepted) > 0, "the exit must contribute tokens"


def test_batch_equals_rows_alone(exit_model):
    large, drafter, _ = exit_model
    rows = prompts(4, seed=3)
    settings = dict(fallback_threshold=0.0, rollback_threshold=1.0, max_draft_tokens=5)
    batched = bild_generate(large, drafter, *left_pad(rows), **settings)
    for b, row in enumerate(rows):
        alone = bild_generate(large, drafter, row[None], **settings)
        assert strip(batched.sequences[b])[-20:] == strip(alone.sequences[0])[-20:]
    assert sum(batched.bild_stats.rollbacks) > 0 and sum(batched.bild_stats.accepted) > 0


def test_compressed_exit_head_drafts_while_the_large_model_verifies_with_its_own(exit_model):
    """bild.compress_drafter on an exit: an int8 copy of the head drafts; the large model and its head are untouched,
    so rollback 0 still equals large greedy."""
    large, drafter, _ = exit_model
    head_weight = large.lm_head.weight.detach().clone()
    compressed = bild.compress_drafter(copy.deepcopy(drafter), quantization="int8", dense_prefill=False)
    assert compressed.large is large and large.get_output_embeddings() is large.lm_head
    assert compressed.get_output_embeddings() is compressed.draft_head is not large.lm_head
    assert torch.equal(large.lm_head.weight, head_weight)
    assert forward_bytes(compressed) < forward_bytes(drafter)
    token_ids = prompts(1, seed=5)[0]
    with torch.inference_mode():
        ours, theirs = compressed(token_ids[None]).logits[0], drafter(token_ids[None]).logits[0]
    assert (ours - theirs).abs().max() < 0.05 * theirs.abs().max()  # int8 weights, per-row scales

    ids, mask = left_pad(prompts(4))
    expected = large.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=PAD)
    out = bild_generate(large, compressed, ids, mask, fallback_threshold=0.5, rollback_threshold=0.0,
                        max_draft_tokens=6)  # fmt: skip
    assert [strip(r) for r in out.sequences] == [strip(r) for r in expected]
    assert sum(out.bild_stats.accepted) > 0


def test_drafted_tokens_do_not_pass_the_shared_layers_twice(exit_model):
    """Shared: every token crosses layer 0 once, exactly as often as layer k; a plain run pays the drafter's on top."""
    large, drafter, _ = exit_model
    ids = prompts(2)[1][None]  # a prompt whose drafts are both accepted and rolled back
    settings = dict(fallback_threshold=0.0, rollback_threshold=0.0, max_draft_tokens=6, max_new_tokens=30,
                    prompt_lookup_num_tokens=0)  # every draft a drafter step  # fmt: skip
    # a layer's first norm: the lean forward (a plain run's large model) calls a layer's parts, not the layer
    first, upper = (large.model.layers[i].input_layernorm for i in (0, EXIT_LAYER))
    with TokenCounter(first=first, upper=upper, adapter=drafter.adapter) as shared:
        out = bild_generate(large, drafter, ids, **settings)
    with TokenCounter(first=first, upper=upper, adapter=drafter.adapter) as plain:
        plain_out = bild_generate(large, PlainExit(large, EXIT_LAYER, drafter.adapter), ids, **settings)
    stats = out.bild_stats
    assert torch.equal(out.sequences, plain_out.sequences)
    assert stats.rollbacks[0] > 0 and stats.accepted[0] > 0
    assert shared["first"] == shared["upper"]  # drafts crossed layers < k once, while drafting
    # every position once but the last (the large model's own token, not fed yet), plus each rejected draft
    rejected = stats.drafted[0] - stats.accepted[0]
    assert shared["first"] == out.sequences.shape[1] - 1 + rejected
    assert plain["upper"] == shared["upper"]
    assert plain["first"] == plain["upper"] + plain["adapter"]  # the separate drafter ran layer 0 again


# --- errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("exit_layer", [0, N_LAYERS, -1, 2.5, True])
def test_exit_layer_out_of_range(exit_model, exit_layer):
    large, _, _ = exit_model
    with pytest.raises(ValueError, match=r"exit_layer=.* must be an integer in 1\.\.3"):
        early_exit(large, exit_layer)


def test_unsupported_architectures():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64))
    for model in (gpt2, t5(32, 2, seed=0)):
        with pytest.raises(ValueError, match="supports decoder-only llama/qwen2/qwen3 models"):
            early_exit(model, 1)


def test_drafter_of_another_model_is_refused(exit_model):
    large, drafter, _ = exit_model
    other = qwen(64, N_LAYERS, seed=7)
    with pytest.raises(ValueError, match="build it from the model you call generate"):
        bild_generate(other, drafter, prompts(1)[0][None])


# --- training the exit ----------------------------------------------------------------------------------------


def test_training_raises_agreement(exit_model):
    _, _, result = exit_model
    assert result["after"] >= result["before"] + 0.1, result
    assert result["last_loss"] < result["first_loss"]


def test_zero_learning_rate_changes_nothing(exit_model):
    """The check above is not vacuous: without learning, agreement stays where it was."""
    large, _, _ = exit_model
    drafter = early_exit(large, EXIT_LAYER)
    result = train_exit(large, drafter, training_text(), steps=3, lr=0.0, batch_size=8, seq_len=24, progress=False)
    assert result["after"] == result["before"]


def test_large_model_runs_once_per_training_window(exit_model):
    """30 steps of 4 windows draw each of the 5 windows many times; the large model reads each one once, and the
    held-out window once for agreement before and after."""
    large, _, _ = exit_model
    texts = training_text(6)  # 5 training windows of 24 tokens, 1 held out
    with TokenCounter(large=large.model.embed_tokens) as counts:
        train_exit(large, early_exit(large, EXIT_LAYER), texts, steps=30, batch_size=4, seq_len=24, progress=False)
    assert counts["large"] == (5 + 1) * 24


def test_distillation_loss_is_kl_over_the_top_k():
    target = torch.tensor([[[2.0, 1.0, 0.0, -9.0]]])  # [1, 1, V]
    student = torch.tensor([[[0.0, 1.0, 0.5, 3.0]]])
    top_logp, top_ids = target.log_softmax(-1).topk(3, dim=-1)
    kept = top_logp.log_softmax(-1)[0, 0]  # the target renormalized over its top 3
    expected = (kept.exp() * (kept - student.log_softmax(-1)[0, 0, top_ids[0, 0]])).sum()
    mask = torch.ones(1, 1)
    assert distillation_loss(student, top_logp, top_ids, mask, "kl") == pytest.approx(float(expected))
    assert distillation_loss(student, top_logp, top_ids, mask, "ce") == pytest.approx(
        float(-student.log_softmax(-1)[0, 0, 0]))
    assert distillation_loss(target, top_logp, top_ids, mask, "kl") < 1e-3  # the student is the target


def test_saved_adapter_reloads(exit_model, tmp_path):
    large, drafter, _ = exit_model
    drafter.save_adapter(tmp_path / "exit")
    reloaded = early_exit(large, EXIT_LAYER, adapter=tmp_path / "exit")
    row = prompts(1)[0]
    torch.testing.assert_close(exit_by_hand(reloaded, row), exit_by_hand(drafter, row), atol=0, rtol=0)
    with pytest.raises(ValueError, match="trained for"):
        early_exit(large, EXIT_LAYER + 1, adapter=tmp_path / "exit")


def test_drafter_generate_is_its_own_greedy(exit_model):
    large, drafter, _ = exit_model
    row = prompts(1)[0]
    out = drafter.generate(row[None], max_new_tokens=8, do_sample=False, pad_token_id=PAD)[0]
    expected = row
    for _ in range(8):
        expected = torch.cat([expected, exit_by_hand(drafter, expected)[-1].argmax()[None]])
    assert out.tolist() == expected.tolist()


def test_drafter_serves_stock_assisted_generation(exit_model):
    large, drafter, _ = exit_model
    ids = prompts(1)[0][None]
    expected = large.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=PAD)
    assisted = large.generate(ids, assistant_model=drafter, max_new_tokens=12, do_sample=False, pad_token_id=PAD)
    assert assisted.tolist() == expected.tolist()

"""`bild.compress_drafter`: quantized linear layers, the draft vocabulary, and BiLD's oracles with them."""

from __future__ import annotations

import copy
import math
import pickle
import platform

import pytest
import torch
from conftest import BOS, CHAIN, EOS, FIRST_WORD, PAD, VOCAB, left_pad, prompts, sample_chain
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import bild
from bild.drafters import (
    DensePrefill,
    DynamicInt8Linear,
    Int4Linear,
    Int8Linear,
    PrunedHead,
    auto_quantization,
    concatenated,
    draft_vocabulary,
    reading_text,
)
from bild.integration import vocab_size
from bild.schedule import forward_bytes
from bild.timing import forward_ms

INF = math.inf
# (quantization, vocab_size); int4 needs rows % 16 == 0
SETTINGS = [("int8", None), ("int4", 32), ("int8-dynamic", 24), (None, 24)]


def compressed(model, quantization="int8", vocab_size=None, token_counts=None, dense_prefill=False):
    """A compressed deep copy: the session fixtures' models stay untouched. Without dense prefill by default, so
    that every input goes through the quantized kernels these tests examine."""
    return bild.compress_drafter(copy.deepcopy(model), quantization, vocab_size, token_counts, dense_prefill)


def strip(row: torch.Tensor) -> list[int]:
    ids = row.tolist()
    while ids and ids[-1] == PAD:
        ids.pop()
    return ids


def inputs(kind: str, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(B, T)` prompt ids and attention mask: left-padded chain prompts, or unequal T5 sources."""
    if kind == "causal":
        return left_pad(prompts(batch_size))
    src = sample_chain(CHAIN, batch_size, 10, torch.Generator().manual_seed(3))
    src[1:, 7:] = PAD
    return src, (src != PAD).long()


def bild_generate(large, small, ids, mask, **kwargs):
    """BiLD with ``small`` attached for this call only."""
    bild.attach(large, small)
    try:
        return large.generate(
            ids, attention_mask=mask, generation_mode="bild", return_dict_in_generate=True,
            max_new_tokens=kwargs.pop("max_new_tokens", 20), pad_token_id=PAD, **kwargs,
        )  # fmt: skip
    finally:
        bild.detach(large)


@torch.no_grad()
def greedy_reading_text(model, ids, mask, n_new):
    """Greedy decoding without a cache, each step's head reading its row's decoder tokens (`reading_text`);
    `(B, T + n_new)` for a decoder-only model, `(B, 1 + n_new)` decoder tokens for an encoder-decoder one."""
    is_seq2seq = model.config.is_encoder_decoder
    seq = torch.full((len(ids), 1), model.config.decoder_start_token_id) if is_seq2seq else ids
    is_done = torch.zeros(len(ids), dtype=torch.bool)
    for _ in range(n_new):
        with reading_text(model, seq, torch.full((len(seq),), seq.shape[1])):
            if is_seq2seq:
                logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=seq).logits[:, -1]
            else:
                seq_mask = torch.cat([mask, mask.new_ones(len(seq), seq.shape[1] - mask.shape[1])], dim=1)
                positions = (seq_mask.cumsum(-1) - 1).clamp(min=0)
                logits = model(seq, attention_mask=seq_mask, position_ids=positions).logits[:, -1]
        next_ids = logits.argmax(-1).masked_fill(is_done, PAD)  # [B]
        is_done |= next_ids == EOS
        seq = torch.cat([seq, next_ids[:, None]], dim=1)
    return seq


@pytest.fixture(params=["causal", "t5"])
def kind_pair(request, causal_pair, seq2seq_pair):
    return request.param, causal_pair if request.param == "causal" else seq2seq_pair


# --- BiLD's oracles with a compressed drafter --------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("quantization,n_vocab", SETTINGS)
def test_rollback_zero_is_large_greedy(kind_pair, batch_size, quantization, n_vocab):
    kind, (large, small) = kind_pair
    drafter = compressed(small, quantization, n_vocab)
    ids, mask = inputs(kind, batch_size)
    expected = large.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=PAD)
    settings = dict(fallback_threshold=0.5, rollback_threshold=0.0, do_sample=False)
    out = bild_generate(large, drafter, ids, mask, **settings)
    assert [strip(r) for r in out.sequences] == [strip(r) for r in expected]
    assert sum(out.bild_stats.accepted) > 0, "the drafter must contribute tokens"


@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("quantization,n_vocab", SETTINGS)
def test_no_fallback_no_rollback_is_compressed_greedy(kind_pair, batch_size, quantization, n_vocab):
    kind, (large, small) = kind_pair
    drafter = compressed(small, quantization, n_vocab)
    ids, mask = inputs(kind, batch_size)
    expected = drafter.generate(ids, attention_mask=mask, max_new_tokens=16, pad_token_id=PAD, do_sample=False)
    out = bild_generate(
        large, drafter, ids, mask, fallback_threshold=0.0, rollback_threshold=INF, max_draft_tokens=16,
        max_new_tokens=16, do_sample=False,
    )  # fmt: skip
    assert [strip(r) for r in out.sequences] == [strip(r) for r in expected]
    assert out.bild_stats.rollbacks == [0] * batch_size


def test_pruned_drafter_alone_reads_the_text_it_was_fed(kind_pair):
    """Outside bild's loop (its own generate(), stock assisted generation) a pruned head hears every token fed
    since its cache was empty: cached greedy decoding equals uncached decoding that reads each row's text."""
    kind, (_, small) = kind_pair
    drafter = compressed(small, None, 24)
    ids, mask = inputs(kind, 4)
    out = drafter.generate(ids, attention_mask=mask, max_new_tokens=16, pad_token_id=PAD, do_sample=False)
    expected = greedy_reading_text(drafter, ids, mask, 16)
    assert [strip(r) for r in out] == [strip(r) for r in expected]
    head, kept = drafter.get_output_embeddings(), drafter.get_output_embeddings().kept_ids
    kwargs = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": out} if kind == "t5" else {"input_ids": out}
    with torch.no_grad():
        logits, plain = drafter(**kwargs).logits, small(**kwargs).logits  # no cache: a new text, [B, T, V]
    for b in range(4):
        assert torch.equal(head.heard[b].nonzero().squeeze(1), out[b].unique())
        source = ids.flatten() if kind == "t5" else out[b]  # an encoder-decoder's text holds its source (all rows')
        allowed = torch.zeros(VOCAB, dtype=torch.bool).index_fill_(0, torch.cat([kept, out[b], source]), True)
        assert not allowed.all()
        assert torch.allclose(logits[b][:, allowed], plain[b][:, allowed], atol=1e-5)
        assert (logits[b][:, ~allowed] == torch.finfo(logits.dtype).min).all()


# --- the draft vocabulary ----------------------------------------------------------------------------------

KEPT_WORDS = list(range(FIRST_WORD, FIRST_WORD + 12))  # the chain also uses the other 33 words


def word_counts() -> torch.Tensor:
    """`(VOCAB,)` counts that rank ``KEPT_WORDS`` first, highest id first (ties would go to the lower id)."""
    counts = torch.zeros(VOCAB)
    counts[KEPT_WORDS] = torch.arange(1.0, len(KEPT_WORDS) + 1)
    return counts


def test_greedy_drafter_never_drafts_outside_its_vocabulary(causal_pair):
    _, small = causal_pair
    ids, mask = left_pad(prompts(4))
    kept = {PAD, EOS, BOS, *KEPT_WORDS}
    drafter = compressed(small, "int8", len(kept), word_counts())
    plain = small.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=PAD)
    out = drafter.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=PAD)
    assert not set(plain[:, ids.shape[1] :].flatten().tolist()) <= kept, "the chain must leave the kept words"
    assert set(out[:, ids.shape[1] :].flatten().tolist()) <= kept


def test_sampled_drafts_stay_in_the_vocabulary_or_the_text(causal_pair):
    large, small = causal_pair
    ids, mask = left_pad(prompts(4))
    kept = {PAD, EOS, BOS, *KEPT_WORDS}
    settings = dict(fallback_threshold=0.0, rollback_threshold=INF, max_draft_tokens=20, do_sample=True)
    for drafter, is_pruned in ((small, False), (compressed(small, "int8", len(kept), word_counts()), True)):
        torch.manual_seed(0)
        out = bild_generate(large, drafter, ids, mask, **settings)
        start = ids.shape[1]
        assert sum(out.bild_stats.accepted) >= 40
        outside, from_text = 0, 0  # drafts outside the kept ids; of those, ids the row's text held before them
        for b, n in enumerate(out.bild_stats.accepted):
            row = out.sequences[b].tolist()
            for i in range(start, start + n):
                if row[i] not in kept:
                    outside += 1
                    from_text += row[i] in row[:i]
        if is_pruned:  # only the kept ids and the row's own text can be drafted, and the text is
            assert 0 < outside == from_text
        else:
            assert outside > from_text, "the plain drafter must draft ids neither kept nor in its text"


def test_pruned_logits_are_full_size_with_no_mass_outside(causal_pair):
    _, small = causal_pair
    drafter = compressed(small, None, 15, word_counts())
    ids, _ = left_pad(prompts(2))
    with torch.no_grad(), reading_text(drafter, ids, torch.zeros(2, dtype=torch.long)):  # no text: kept ids only
        logits, plain = drafter(ids).logits, small(ids).logits  # [B, T, V]
    kept = draft_vocabulary(small, 15, word_counts())
    outside = torch.ones(VOCAB, dtype=torch.bool)
    outside[kept] = False
    assert logits.shape == plain.shape
    assert torch.equal(logits[..., kept], plain[..., kept])
    probs, plain_probs = logits.softmax(-1), plain.softmax(-1)  # [B, T, V]
    assert (probs[..., outside] == 0).all()
    renormalized = plain_probs[..., kept] / plain_probs[..., kept].sum(-1, keepdim=True)  # [B, T, V']
    assert torch.allclose(probs[..., kept], renormalized, atol=1e-6)
    is_top_kept = torch.isin(plain.argmax(-1), kept)  # [B, T]
    assert is_top_kept.any() and not is_top_kept.all(), "both cases of the fallback rule must occur"
    assert (probs.amax(-1) >= plain_probs.amax(-1))[is_top_kept].all()  # a kept top is at least as confident


def test_pruned_head_reads_each_rows_own_text(causal_pair):
    _, small = causal_pair
    drafter = compressed(small, None, 15, word_counts())
    kept = draft_vocabulary(small, 15, word_counts())
    ids, _ = left_pad(prompts(2))  # [2, T]: two rows of different words
    lengths = torch.tensor([ids.shape[1], ids.shape[1] - 3])  # row 1 has read less of its buffer
    with torch.no_grad(), reading_text(drafter, ids, lengths):
        logits = drafter(ids).logits  # [B, T, V]
    plain = small(ids).logits.detach()
    for b in range(2):
        allowed = torch.zeros(VOCAB, dtype=torch.bool)
        allowed[kept] = True
        allowed[ids[b, : lengths[b]]] = True
        assert not torch.isin(ids[b, : lengths[b]], kept).all(), "the text must hold ids outside the kept ones"
        assert torch.allclose(logits[b][:, allowed], plain[b][:, allowed], atol=1e-5)
        assert (logits[b][:, ~allowed] == torch.finfo(logits.dtype).min).all()
    assert drafter.get_output_embeddings().text is None, "the text is read only within the context"


def test_encoder_decoder_drafter_reads_its_source(seq2seq_pair):
    """A summary copies names from its article: a pruned encoder-decoder drafter also scores the ids its encoder
    read (every row's), inside bild's loop (`reading`) as outside it, until the encoder reads a new source."""
    _, small = seq2seq_pair
    drafter = compressed(small, None, 15, word_counts())
    kept = draft_vocabulary(small, 15, word_counts())
    ids, mask = inputs("t5", 2)  # [2, 10] sources
    start = torch.full((2, 1), small.config.decoder_start_token_id)
    assert not torch.isin(ids[mask.bool()], kept).all(), "the sources must hold ids outside the kept ones"
    kwargs = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": start}
    with torch.no_grad(), reading_text(drafter, start, torch.ones(2, dtype=torch.long)):
        logits = drafter(**kwargs).logits[:, -1]  # [B, V]
    plain = small(**kwargs).logits[:, -1].detach()
    allowed = torch.zeros(VOCAB, dtype=torch.bool).index_fill_(0, torch.cat([kept, start.flatten(), ids.flatten()]), True)
    assert not allowed.all()
    assert torch.allclose(logits[:, allowed], plain[:, allowed], atol=1e-5)
    assert (logits[:, ~allowed] == torch.finfo(logits.dtype).min).all()
    other = ids[:1, :4].flip(1)  # a new source forgets the old one
    with torch.no_grad():
        drafter.get_encoder()(input_ids=other)
    head = drafter.get_output_embeddings()
    assert torch.equal(head.source.nonzero().squeeze(1), other.unique())
    with torch.no_grad():
        drafter.get_encoder()(inputs_embeds=drafter.get_input_embeddings()(other))
    assert head.source is None, "embeddings fed instead of ids: no source to read"
    copied = copy.deepcopy(drafter)  # a copy's encoder tells the copy's head, not the original's
    with torch.no_grad():
        copied.get_encoder()(input_ids=other)
    assert head.source is None and torch.equal(copied.get_output_embeddings().source, torch.isin(torch.arange(VOCAB), other))


def test_draft_vocabulary_ranking(causal_pair):
    _, small = causal_pair
    specials = [PAD, EOS, BOS]
    assert draft_vocabulary(small, 8).tolist() == list(range(8))  # no data: the lowest ids
    assert draft_vocabulary(small, 5, word_counts()).tolist() == specials + KEPT_WORDS[-2:]  # most frequent
    sequences = [[40, 41, 41], torch.tensor([41, 9, 40, 41, 7])]
    assert draft_vocabulary(small, 6, sequences).tolist() == [*specials, 7, 40, 41]  # counted; 7 ties 9
    assert draft_vocabulary(small, 5, torch.tensor([[9, 9], [9, 5]])).tolist() == specials + [5, 9]


# --- quantized layers --------------------------------------------------------------------------------------


BF16_ROUNDING = 2.0**-8  # relative rounding error of bfloat16, the packed kernels' dtype for bf16 and fp32 layers


def rounding_bound(x, dequantized, out, half_steps) -> torch.Tensor:
    """`(..., N)` bound on |layer(x) - x @ w.T - b| in float32 arithmetic.

    Each weight moves by at most ``half_steps`` [N, K]; the kernel rounds its input and output to bfloat16
    (and a bf16 layer rounds again when it adds the bias).
    """
    x = x.float().abs()  # [..., K]
    return x @ half_steps.T + BF16_ROUNDING * (x @ dequantized.abs().T + 2 * out.float().abs()) + 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_error_bound(dtype):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40).to(dtype)
    x = torch.randn(2, 3, 96, dtype=dtype)  # 3-D input, as the models feed it
    layer = Int8Linear.from_linear(linear)
    out = layer(x)  # [2, 3, 40]
    assert out.dtype == dtype and out.shape == (2, 3, 40)
    w = layer.dequantized()  # [N, K]
    half_steps = (linear.weight.float().abs().amax(1, keepdim=True) / 254).expand_as(w)  # max |w_n| / 127 / 2
    assert ((w - linear.weight.float()).abs() <= half_steps * 1.01).all()
    exact = x.float() @ linear.weight.float().T + linear.bias.float()  # [2, 3, N]
    assert ((out.float() - exact).abs() <= rounding_bound(x, w, out, half_steps * 1.01)).all()


def test_dynamic_int8_quantizes_each_token_alone():
    """Each input token gets its own 8-bit scale: its output is the same bit for bit alone, in a chunk or in a batch
    beside a token a hundred times louder (one scale per call, fbgemm's own, would round it 60% off), and it stays
    within its own rounding of the float layer's. Copies and pickles pack the weights again."""
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    layer = DynamicInt8Linear.from_linear(linear)
    x = torch.randn(3, 5, 96)
    x[1, 2] *= 100
    out = layer(x)  # [3, 5, 40]
    assert out.shape == (3, 5, 40) and out.dtype == torch.float32
    for b, t in [(0, 0), (0, 4), (1, 2), (2, 3)]:
        assert torch.equal(out[b, t], layer(x[b : b + 1, t : t + 1])[0, 0])
    assert torch.equal(out[2], layer(x[2:])[0])
    exact = x @ linear.weight.detach().T + linear.bias.detach()  # [3, 5, 40]
    error = (out - exact).abs().amax(-1) / exact.abs().amax(-1)  # [3, 5] relative to each token's largest output
    assert error.max() < 0.05, error
    for copied in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert torch.equal(copied(x), out)
    assert layer(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_linear_error_bound(dtype):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48).to(dtype)
    x = torch.randn(2, 3, 64, dtype=dtype)
    layer = Int4Linear.from_linear(linear)
    out = layer(x)  # [2, 3, 48]
    assert out.dtype == dtype and out.shape == (2, 3, 48)
    groups = linear.weight.float().reshape(48, 2, 32)
    half_steps = ((groups.amax(-1) - groups.amin(-1)) / 30).repeat_interleave(32, dim=1)  # [N, K]: range / 15 / 2
    exact = x.float() @ linear.weight.float().T + linear.bias.float()
    bound = rounding_bound(x, linear.weight.float(), out, half_steps * 1.05)  # scales and zeros are rounded too
    assert ((out.float() - exact).abs() <= bound).all()


@pytest.mark.parametrize("kind", [Int8Linear, Int4Linear, DynamicInt8Linear])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_concatenated_layers_give_the_parts_outputs_bit_for_bit(kind, dtype):
    """q, k and v projections stacked into one packed layer: the same numbers as the three layers' outputs side by
    side, for a step and for a chunk; layers quantized differently are not stacked."""
    torch.manual_seed(0)
    parts = [kind.from_linear(nn.Linear(64, n).to(dtype)) for n in (64, 32, 32)]
    fused = concatenated(parts)
    assert type(fused) is kind and fused.out_features == 128 and fused.dense is None
    for x in (torch.randn(1, 1, 64, dtype=dtype), torch.randn(2, 5, 64, dtype=dtype)):
        assert torch.equal(fused(x), torch.cat([part(x) for part in parts], dim=-1))
    no_bias = kind.from_linear(nn.Linear(64, 32, bias=False).to(dtype))
    assert concatenated([parts[0], no_bias]) is None
    other = Int8Linear if kind is Int4Linear else Int4Linear
    assert concatenated([parts[0], other.from_linear(nn.Linear(64, 32).to(dtype))]) is None
    assert concatenated([parts[0], nn.Linear(64, 32).to(dtype)]) is None
    if kind is Int4Linear:
        assert concatenated([parts[0], Int4Linear.from_linear(nn.Linear(64, 32).to(dtype), group_size=64)]) is None


@pytest.mark.parametrize("quantization,tolerance", [("int8", 0.03), ("int8-dynamic", 0.05), ("int4", 0.25)])
def test_quantized_logits_stay_close(kind_pair, quantization, tolerance):
    """Logits move by at most ``tolerance`` of their largest magnitude; int8 also keeps argmax and probabilities.

    Measured on these tiny models (hidden size 32, where rounding errors average out least): int8 1.1%
    (causal) / 0.9% (T5) of the largest logit and 0.006 in probability, int4 11% / 8%. The tolerances
    are 2-3 times that, and far below planted bugs: a dropped bias moves the logits by 39%, an int4
    zero off by one step by 61%.
    """
    kind, (_, small) = kind_pair
    drafter = compressed(small, quantization)
    ids, mask = inputs(kind, 4)
    kwargs = {"decoder_input_ids": ids[:, :6]} if kind == "t5" else {}
    with torch.no_grad():
        ref = small(input_ids=ids, attention_mask=mask, **kwargs).logits  # [B, T, V]
        out = drafter(input_ids=ids, attention_mask=mask, **kwargs).logits
    assert 0 < (out - ref).abs().amax() / ref.abs().amax() <= tolerance
    if quantization == "int8":
        assert (out.softmax(-1) - ref.softmax(-1)).abs().amax() <= 0.02
        assert torch.equal(out.argmax(-1), ref.argmax(-1))


def test_t5_keeps_tied_embeddings_and_head_scaling(seq2seq_pair):
    _, small = seq2seq_pair
    assert small.config.tie_word_embeddings, "the fixture must exercise T5's d_model**-0.5 head scaling"
    embeddings = small.get_input_embeddings().weight.clone()
    drafter = compressed(small, "int8")
    assert torch.equal(drafter.get_input_embeddings().weight, embeddings)
    assert isinstance(drafter.get_output_embeddings(), Int8Linear)


# --- what the model looks like afterwards ------------------------------------------------------------------


@pytest.mark.parametrize("quantization,n_vocab", SETTINGS)
def test_compression_is_recorded_and_config_untouched(causal_pair, quantization, n_vocab):
    _, small = causal_pair
    drafter = compressed(small, quantization, n_vocab)
    assert drafter.config.to_dict() == small.config.to_dict()
    assert vocab_size(drafter) == VOCAB == drafter.get_output_embeddings().out_features
    assert not any(isinstance(m, nn.Linear) for m in drafter.modules()) or quantization is None
    record = drafter.bild_compression
    assert (record.quantization, record.vocab_size) == (quantization, n_vocab or VOCAB)
    assert record.full_vocab_size == VOCAB
    assert isinstance(drafter.get_output_embeddings(), PrunedHead) == (n_vocab is not None)
    with pytest.raises(ValueError, match="already compressed"):
        bild.compress_drafter(drafter)


def test_auto_quantization_by_dtype_and_machine(causal_pair, monkeypatch):
    """int8 by int8 (fbgemm) for a float32 drafter on x86, int4 in bf16 and where torch lacks fbgemm, none off the
    CPU."""
    _, small = causal_pair
    assert small.dtype == torch.float32
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert DynamicInt8Linear.available()
        record = bild.compress_drafter(copy.deepcopy(small), dense_prefill=False).bild_compression
        assert (record.quantization, record.n_int4) == ("int8-dynamic", 0) and record.n_int8 > 0
    record = bild.compress_drafter(copy.deepcopy(small).to(torch.bfloat16), dense_prefill=False).bild_compression
    assert record.quantization == "int4" and record.n_int4 > 0
    assert auto_quantization(torch.empty(2, 2, device="meta")) is None
    monkeypatch.setattr(DynamicInt8Linear, "available", staticmethod(lambda: False))
    assert auto_quantization(torch.empty(2, 2)) == "int4"
    with pytest.raises(ValueError, match="has no fbgemm dynamic linear"):
        compressed(small, "int8-dynamic")


def test_int4_falls_back_to_int8_where_the_kernel_cannot(causal_pair):
    _, small = causal_pair
    drafter = compressed(small, "int4", 20)  # a 20-row head: the int4 kernel needs rows % 16 == 0
    assert isinstance(drafter.get_output_embeddings().kept_head, Int8Linear)
    assert (drafter.bild_compression.n_int8, drafter.bild_compression.n_int4) == (1, 7)


def test_group_size_is_per_layer_where_the_kernel_takes_it(causal_pair):
    _, small = causal_pair
    drafter = bild.compress_drafter(copy.deepcopy(small), "int4", group_size=64, dense_prefill=False)
    layers = [m for m in drafter.modules() if isinstance(m, (Int4Linear, Int8Linear))]
    assert {m.group_size for m in layers if isinstance(m, Int4Linear)} == {64}
    assert all(isinstance(m, Int4Linear) == (m.in_features % 64 == 0 and m.out_features % 16 == 0) for m in layers)
    assert 0 < drafter.bild_compression.n_int4 < len(layers), "the fixture must have layers of both kinds"
    assert drafter.bild_compression.group_size == 64
    assert bild.compress_drafter(copy.deepcopy(small), "int8").bild_compression.group_size is None


def test_compressed_step_is_timed_like_any_model(causal_pair, seq2seq_pair):
    for _, small in (causal_pair, seq2seq_pair):
        assert 0 < forward_ms(compressed(small), context=16, n_new=1, repeats=3) < 10_000


# --- errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(quantization="int3"), "Unknown quantization"),
        (dict(group_size=48), r"group_size=48 is not one the int4 CPU kernel takes: use one of \(32, 64, 128, 256\)"),
        (dict(vocab_size=VOCAB + 1), "vocab_size=49 must lie between the 3 special tokens"),
        (dict(vocab_size=2), "vocab_size=2 must lie between the 3 special tokens"),
        (dict(vocab_size=10, token_counts=torch.ones(VOCAB - 1)), r"token_counts has shape \(47,\)"),
        (dict(vocab_size=10, token_counts=[[3, 4, VOCAB]]), "token ids outside"),
    ],
)
def test_user_mistakes_are_value_errors(causal_pair, kwargs, match):
    _, small = causal_pair
    drafter = copy.deepcopy(small)
    with pytest.raises(ValueError, match=match):
        bild.compress_drafter(drafter, **kwargs)
    assert not hasattr(drafter, "bild_compression")


def test_models_without_linear_layers_or_off_cpu_are_refused(causal_pair):
    with pytest.raises(ValueError, match="no nn.Linear layers"):
        bild.compress_drafter(nn.Sequential(nn.Embedding(VOCAB, 8)))
    off_cpu = copy.deepcopy(causal_pair[1]).to("meta")
    with pytest.raises(ValueError, match="runs on CPU only"):
        bild.compress_drafter(off_cpu, "int8")


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_dense_prefill_runs_long_inputs_on_the_original_weights(causal_pair, quantization):
    """Layers keep their dense weights for inputs of at least the timed crossover rows: a prompt's prefill is then
    exactly the uncompressed model's, a single-token step the quantized one; lossless BiLD is unchanged."""
    large, small = causal_pair
    drafter = compressed(small, quantization, dense_prefill=True)
    layers = [m for m in drafter.modules() if isinstance(m, DensePrefill)]
    assert drafter.bild_compression.n_dense_prefill == sum(m.dense is not None for m in layers) > 0
    layer = next(m for m in layers if m.dense is not None)
    long = torch.randn(layer.dense_from_rows, layer.in_features)
    short = long[: layer.dense_from_rows - 1]
    with torch.inference_mode():
        assert torch.equal(layer(long), layer.dense(long))
        assert torch.equal(layer(short), layer._quantized(short)) and not torch.equal(layer(short), layer.dense(short))
    assert forward_bytes(drafter) < forward_bytes(small)  # the dense copies are not what a step reads
    without = compressed(small, quantization, dense_prefill=False)
    assert without.bild_compression.n_dense_prefill == 0
    ids, mask = left_pad(prompts(4))
    bild.attach(large, drafter)
    try:
        out = large.generate(ids, attention_mask=mask, generation_mode="bild", rollback_threshold=0.0,
                             max_new_tokens=12, do_sample=False, pad_token_id=PAD)  # fmt: skip
    finally:
        bild.detach(large)
    assert torch.equal(out, large.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=PAD))


def test_stock_assisted_generation_feeds_a_pruned_drafter_its_text(causal_pair):
    large, small = causal_pair
    drafter = compressed(small, None, 24)
    ids, mask = left_pad(prompts(1))
    expected = large.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=PAD)
    out = large.generate(
        ids, attention_mask=mask, assistant_model=drafter, max_new_tokens=12, do_sample=False, pad_token_id=PAD
    )  # fmt: skip
    assert torch.equal(out, expected)
    heard = drafter.get_output_embeddings().heard  # [1, V]: what the drafter was fed in its last round
    assert heard is not None and heard[0, ids[0]].all(), "stock's drafter must hear the prompt"


@pytest.mark.parametrize("n_vocab,kept", [(100_000, 32_768), (99_999, None)])
def test_auto_vocabulary_prunes_large_vocabularies_only(n_vocab, kept):
    config = LlamaConfig(vocab_size=n_vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    drafter = bild.compress_drafter(LlamaForCausalLM(config).eval(), None)
    assert drafter.bild_compression.vocab_size == (kept or n_vocab)
    assert isinstance(drafter.get_output_embeddings(), PrunedHead) == (kept is not None)
    with pytest.raises(ValueError, match="vocab_size='all': use a number of token ids, None"):
        bild.compress_drafter(LlamaForCausalLM(config), None, vocab_size="all")

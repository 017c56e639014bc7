"""Stock generate() outputs in BiLD mode: scores, logits, num_return_sequences, and what stopping criteria see."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import CHAIN, EOS, PAD, left_pad, prompts, qwen, sample_chain
from transformers import StoppingCriteria

import bild

LOSSLESS = dict(rollback_threshold=0.0, fallback_threshold=0.5, max_draft_tokens=4)
TOLERANCE = dict(atol=1e-4, rtol=1e-4)


def generate(large, ids, mask=None, bild_mode=True, **kwargs):
    kwargs.setdefault("max_new_tokens", 12)
    kwargs.setdefault("pad_token_id", PAD)
    mode = dict(generation_mode="bild") if bild_mode else {}
    return large.generate(ids, attention_mask=mask, return_dict_in_generate=True, **mode, **kwargs)


def assert_steps_match(out, expected, prompt_length: int, field: str, eos: int = EOS):
    """Same number of steps, same shape, equal values wherever the row had not ended (stock's own elsewhere)."""
    got, want = getattr(out, field), getattr(expected, field)
    assert out.sequences.tolist() == expected.sequences.tolist()
    assert len(got) == len(want) == out.sequences.shape[1] - prompt_length
    ended = ended_steps(out.sequences, prompt_length, eos)  # [B, n_steps]
    for t, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.shape == w.shape and g.dtype == w.dtype
        live = ~ended[:, t]
        torch.testing.assert_close(g[live], w[live], **TOLERANCE)
        assert bool((g[~ended[:, t]].isfinite().any(dim=-1)).all())


def ended_steps(sequences: torch.Tensor, prompt_length: int, eos: int = EOS) -> torch.Tensor:
    """`(B, n_steps)` True at the steps after a row's EOS (stock feeds padding there)."""
    new = sequences[:, prompt_length:]
    is_eos = (new == eos).long()
    return (is_eos.cumsum(dim=1) - is_eos) > 0


def strip(row: torch.Tensor) -> list[int]:
    ids = row.tolist()
    while ids and ids[-1] == PAD:
        ids.pop()
    return ids


def early_eos(large, ids, mask) -> int:
    """A token greedy decoding outputs 3rd in row 0: as EOS, it ends row 0 well before the others."""
    greedy = large.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=PAD)
    return int(greedy[0, -1])


# --- scores and logits ----------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 4])
def test_scores_and_logits_equal_stock_greedy_decoder_only(pair, batch_size):
    large, _ = pair
    ids, mask = left_pad(prompts(batch_size))
    eos = early_eos(large, ids, mask)
    flags = dict(output_scores=True, output_logits=True, repetition_penalty=1.2, max_new_tokens=14, eos_token_id=eos)
    expected = generate(large, ids, mask, bild_mode=False, do_sample=False, **flags)
    out = generate(large, ids, mask, **LOSSLESS, **flags)
    assert_steps_match(out, expected, ids.shape[1], "scores", eos)
    assert_steps_match(out, expected, ids.shape[1], "logits", eos)
    if batch_size > 1:
        assert bool(ended_steps(out.sequences, ids.shape[1], eos).any()), "a row ends before the others"
    # repetition_penalty changes scores: they are the processed ones, logits the raw ones
    assert not all(torch.equal(s, raw) for s, raw in zip(out.scores, out.logits, strict=True))


@pytest.mark.parametrize("batch_size", [1, 3])
def test_scores_and_logits_equal_stock_greedy_t5(s2s, batch_size):
    large, _ = s2s
    src = sample_chain(CHAIN, batch_size, 10, torch.Generator().manual_seed(3))
    src[1:, 7:] = PAD
    mask = (src != PAD).long()
    flags = dict(output_scores=True, output_logits=True, max_new_tokens=12)
    expected = generate(large, src, mask, bild_mode=False, do_sample=False, **flags)
    out = generate(large, src, mask, **LOSSLESS, **flags)
    assert_steps_match(out, expected, 1, "scores")
    assert_steps_match(out, expected, 1, "logits")


def test_rows_that_ended_hold_a_distribution_certain_of_padding(pair):
    large, _ = pair
    ids, mask = left_pad(prompts(3))
    eos = early_eos(large, ids, mask)
    out = generate(large, ids, mask, output_scores=True, output_logits=True, max_new_tokens=10, eos_token_id=eos,
                   rollback_threshold=1.0)  # fmt: skip
    ended = ended_steps(out.sequences, ids.shape[1], eos)
    assert bool(ended.any()), "a row must end early for this test to check anything"
    for t, (scores, logits) in enumerate(zip(out.scores, out.logits, strict=True)):
        for step in (scores, logits):
            rows = step[ended[:, t]]
            assert bool((rows[:, PAD] == 0).all()) and bool((rows[:, PAD + 1 :] == -math.inf).all())
    # so stock's compute_transition_scores sums to each row's log-probability without masking
    transition = large.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    assert bool(transition.isfinite().all())
    assert bool((transition[ended] == 0).all())


def test_lossy_scores_are_the_large_models_view_at_the_kept_tokens(pair):
    large, small = pair
    ids, mask = left_pad(prompts(4))
    out = generate(large, ids, mask, output_scores=True, output_logits=True, rollback_threshold=math.inf,
                   fallback_threshold=0.0, max_draft_tokens=12, max_new_tokens=12)  # fmt: skip
    assert sum(out.bild_stats.rollbacks) == 0 and sum(out.bild_stats.accepted) > 0
    # one teacher-forced large forward over the final sequences computes the same logits
    full_mask = torch.cat([mask, torch.ones_like(out.sequences[:, ids.shape[1] :])], dim=1)
    positions = (full_mask.cumsum(dim=1) - 1).clamp(min=0)
    reference = large(out.sequences, attention_mask=full_mask, position_ids=positions).logits.float()
    ended = ended_steps(out.sequences, ids.shape[1])
    for t, logits in enumerate(out.logits):
        live = ~ended[:, t]
        torch.testing.assert_close(logits[live], reference[live, ids.shape[1] + t - 1], **TOLERANCE)
    argmax_agrees = [
        bool((out.scores[t].argmax(-1) == out.sequences[:, ids.shape[1] + t])[~ended[:, t]].all())
        for t in range(len(out.scores))
    ]
    assert not all(argmax_agrees), "lossy BiLD kept small-model tokens the large model would not pick"


def test_scores_of_rows_decoded_alone(bart_pair):
    large, small = bart_pair
    bild.attach(large, small)
    try:
        src = torch.tensor([[5, 9, 12, 30, 7, EOS], [8, 8, 21, 4, EOS, PAD]])
        mask = (src != PAD).long()
        flags = dict(output_scores=True, output_logits=True, max_new_tokens=8, num_beams=1)
        expected = generate(large, src, mask, bild_mode=False, do_sample=False, **flags)
        out = generate(large, src, mask, rollback_threshold=0.0, **flags)
        assert out.cache is None, "BART rows are decoded one at a time"
        assert_steps_match(out, expected, 1, "scores")
        assert_steps_match(out, expected, 1, "logits")
    finally:
        bild.detach(large)


def test_logits_are_as_wide_as_the_large_models_vocabulary(causal_pair):
    """The small model's vocabulary may lack padding rows of the large one: logits keep all the large model's."""
    _, small = causal_pair
    large = bild.attach(qwen(64, 2, seed=5, vocab=56), small)  # 8 rows more: ids 48..55 only in the large model
    ids, mask = left_pad(prompts(2))
    out = generate(large, ids, mask, output_scores=True, output_logits=True, max_new_tokens=4)
    assert all(s.shape == (2, 56) and raw.shape == (2, 56) for s, raw in zip(out.scores, out.logits, strict=True))
    assert bool(out.logits[0][:, 48:].isfinite().all())
    assert bool((out.scores[0][:, 48:] == -math.inf).all()), "ids only the large model has are never picked"


def test_no_outputs_unless_asked(pair):
    large, _ = pair
    ids, mask = left_pad(prompts(2))
    out = generate(large, ids, mask, max_new_tokens=4)
    assert out.scores is None and out.logits is None
    only_scores = generate(large, ids, mask, max_new_tokens=4, output_scores=True)
    assert len(only_scores.scores) == 4 and only_scores.logits is None


# --- num_return_sequences -------------------------------------------------------------------------------


ONE_CHOICE = dict(do_sample=True, top_k=1)  # sampling from one token: greedy, as stock refuses greedy repeats


def test_num_return_sequences_greedy_is_refused_like_stock(pair):
    large, _ = pair
    ids, mask = left_pad(prompts(2))
    for mode in (True, False):
        with pytest.raises(ValueError, match="num_return_sequences"):
            generate(large, ids, mask, bild_mode=mode, do_sample=False, num_return_sequences=2)


def test_num_return_sequences_repeats_each_prompt(pair, s2s):
    large, _ = pair
    ids, mask = left_pad(prompts(2))
    out = generate(large, ids, mask, num_return_sequences=3, **ONE_CHOICE, **LOSSLESS)
    expected = generate(large, ids, mask, bild_mode=False, do_sample=False)
    assert out.sequences.shape[0] == 6 and len(out.bild_stats) == 6
    assert out.sequences.tolist() == expected.sequences.repeat_interleave(3, dim=0).tolist()

    large, _ = s2s
    src = sample_chain(CHAIN, 2, 10, torch.Generator().manual_seed(3))
    src[1, 7:] = PAD
    out = generate(large, src, (src != PAD).long(), num_return_sequences=2, **ONE_CHOICE, **LOSSLESS)
    expected = generate(large, src, (src != PAD).long(), bild_mode=False, do_sample=False)
    assert [strip(r) for r in out.sequences] == [strip(r) for r in expected.sequences.repeat_interleave(2, dim=0)]


def test_num_return_sequences_sampling_differs(pair):
    large, _ = pair
    ids, mask = left_pad(prompts(1))
    torch.manual_seed(0)
    out = generate(large, ids, mask, num_return_sequences=6, do_sample=True, temperature=2.0, max_new_tokens=10,
                   rollback_threshold=1.0, fallback_threshold=0.5)  # fmt: skip
    rows = {tuple(r) for r in out.sequences[:, ids.shape[1] :].tolist()}
    assert out.sequences.shape[0] == 6 and len(rows) > 1


# --- what stopping criteria see -------------------------------------------------------------------------


class Recorder(StoppingCriteria):
    """Never stops; keeps a copy of every input it is shown."""

    def __init__(self):
        self.calls: list[torch.Tensor] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.calls.append(input_ids.clone())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


class DoneTracker(StoppingCriteria):
    """Like lm-eval's MultiTokenEOSCriteria: remembers each row that ever showed its token (``tokens[b]``) after
    the prompt; stops every row once all have (stateful, per row)."""

    def __init__(self, tokens: list[int], prompt_length: int):
        self.tokens, self.prompt_length = tokens, prompt_length
        self.done = [False] * len(tokens)

    def __call__(self, input_ids, scores, **kwargs):
        for b, row in enumerate(input_ids[:, self.prompt_length :].tolist()):
            self.done[b] = self.done[b] or self.tokens[b] in row
        return torch.full((input_ids.shape[0],), all(self.done), dtype=torch.bool)


DIVERGING = dict(rollback_threshold=0.0, fallback_threshold=0.0, max_draft_tokens=6)  # rows advance unevenly


def test_stopping_criteria_see_only_final_tokens_like_stock(pair):
    large, _ = pair
    ids, mask = left_pad(prompts(4))
    stock, ours = Recorder(), Recorder()
    expected = generate(large, ids, mask, bild_mode=False, do_sample=False, max_new_tokens=16,
                        stopping_criteria=[stock])  # fmt: skip
    out = generate(large, ids, mask, max_new_tokens=16, stopping_criteria=[ours], **DIVERGING)
    assert out.sequences.tolist() == expected.sequences.tolist()
    assert sum(out.bild_stats.rollbacks) > 0, "rejected drafts must exist for this test to check anything"
    assert [c.tolist() for c in ours.calls] == [c.tolist() for c in stock.calls]


def test_a_stateful_criterion_is_not_fooled_by_rejected_drafts(pair):
    large, small = pair
    ids, mask = left_pad(prompts(4))
    greedy = generate(large, ids, mask, bild_mode=False, do_sample=False, max_new_tokens=16).sequences
    drafted = small.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=PAD)
    # tokens the small model drafts that the large model never outputs: they only ever appear as rejected drafts
    rejected = set(drafted[:, ids.shape[1] :].flatten().tolist()) - set(greedy[:, ids.shape[1] :].flatten().tolist())
    assert rejected, "the pair must disagree somewhere for this test to check anything"
    for token in sorted(rejected):
        stock = DoneTracker([token] * 4, ids.shape[1])
        expected = generate(large, ids, mask, bild_mode=False, do_sample=False, max_new_tokens=16,
                            stopping_criteria=[stock])  # fmt: skip
        ours = DoneTracker([token] * 4, ids.shape[1])
        out = generate(large, ids, mask, max_new_tokens=16, stopping_criteria=[ours], **DIVERGING)
        assert ours.done == stock.done == [False] * 4
        assert out.sequences.tolist() == expected.sequences.tolist()


def test_a_stateful_criterion_stops_rows_where_stock_does(pair):
    large, _ = pair
    ids, mask = left_pad(prompts(4))
    greedy = generate(large, ids, mask, bild_mode=False, do_sample=False, max_new_tokens=16).sequences
    tokens = [int(greedy[b, ids.shape[1] + 3 + 2 * b]) for b in range(4)]  # rows are done at unequal steps
    stock = DoneTracker(tokens, ids.shape[1])
    expected = generate(large, ids, mask, bild_mode=False, do_sample=False, max_new_tokens=16,
                        stopping_criteria=[stock])  # fmt: skip
    ours = DoneTracker(tokens, ids.shape[1])
    out = generate(large, ids, mask, max_new_tokens=16, stopping_criteria=[ours], **DIVERGING)
    assert expected.sequences.shape[1] < greedy.shape[1], "the criterion must stop generation early"
    assert out.sequences.tolist() == expected.sequences.tolist()
    assert all(g <= 16 for g in out.bild_stats.generated)
    stats = out.bild_stats
    assert all(a <= g for a, g in zip(stats.accepted, stats.generated, strict=True))


def test_scores_with_a_drafter_that_builds_its_own_decoders(causal_pair):
    """An early-exit drafter brings its own decoders (`bild_decoders`): scores and logits still come back."""
    large, _ = causal_pair
    bild.attach(large, bild.early_exit(large, 1))
    try:
        ids, mask = left_pad(prompts(3))
        flags = dict(output_scores=True, output_logits=True, max_new_tokens=8)
        expected = generate(large, ids, mask, bild_mode=False, do_sample=False, **flags)
        out = generate(large, ids, mask, **LOSSLESS, **flags)
        assert_steps_match(out, expected, ids.shape[1], "scores")
        assert_steps_match(out, expected, ids.shape[1], "logits")
    finally:
        bild.detach(large)

"""BiLD with do_sample=True: the speculative-sampling rule is exact, seeds reproduce, warpers apply.

The exactness test compares the empirical distribution of the first two generated tokens over many
sampled rows with the large model's own sampling distribution, computed exactly with stock generate()
(``output_scores``). A chi-square goodness-of-fit test rejects at ``P_VALUE = 1e-3``: with correct code a
random seed would fail it once in a thousand runs (the seeds here are fixed, so the test is deterministic).
The same check is run with a deliberately broken acceptance rule to show that it catches one.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import PAD, VOCAB, left_pad, prompts

from bild import decoding, policies
from bild.state import Sampling

P_VALUE = 1e-3
N_ROWS = 4000
SAMPLING = dict(do_sample=True, temperature=1.5, top_k=6)


@pytest.fixture(scope="module")
def prompt():
    return prompts(1, seed=3, lengths=(4,))[0]


def stock_scores(model, ids, n_new=1, **kwargs):
    """The processed scores stock generate() draws its next token from, `(n_new, batch, V)`."""
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, pad_token_id=PAD, output_scores=True,
        return_dict_in_generate=True, **kwargs,
    )  # fmt: skip
    return torch.stack(out.scores)


def large_joint_distribution(large, prompt, **sampling) -> torch.Tensor:
    """Exact `(V, V)` probability of the first two tokens under stock sampling with ``sampling``'s warpers."""
    warpers = {k: v for k, v in sampling.items() if k != "do_sample"}
    # stock generate() applies warpers only when sampling; it keeps the scores it drew from
    first = stock_scores(large, prompt[None], do_sample=True, **warpers)[0, 0].softmax(-1)  # [V]
    continuations = torch.cat([prompt.repeat(VOCAB, 1), torch.arange(VOCAB)[:, None]], dim=1)  # [V, T+1]
    second = stock_scores(large, continuations, do_sample=True, **warpers)[0].softmax(-1)  # [V, V]
    return first[:, None] * second


def chi_square_p_value(observed: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Goodness of fit of counts to probabilities; cells expected below 5 are pooled into one."""
    observed, expected = observed.flatten().double(), expected_probs.flatten().double() * observed.sum()
    is_small = expected < 5
    observed = torch.cat([observed[~is_small], observed[is_small].sum()[None]])
    expected = torch.cat([expected[~is_small], expected[is_small].sum()[None]])
    keep = expected > 0
    if bool((observed[~keep] > 0).any()):
        return 0.0  # a token the large model can never produce
    stat = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.double), stat / 2))


def bild_joint_counts(large, prompt, seed, sampling=SAMPLING, n_rows=N_ROWS, **settings) -> torch.Tensor:
    ids = prompt.repeat(n_rows, 1)
    torch.manual_seed(seed)
    out = large.generate(
        ids, generation_mode="bild", max_new_tokens=3, pad_token_id=PAD, **sampling, **settings
    )
    first, second = out[:, len(prompt)], out[:, len(prompt) + 1]
    return torch.bincount(first * VOCAB + second, minlength=VOCAB * VOCAB).reshape(VOCAB, VOCAB)


@pytest.mark.parametrize(
    "settings",
    [
        dict(fallback_threshold=0.0, max_draft_tokens=4),  # the small model drafts every token
        dict(fallback_threshold=0.5, max_draft_tokens=1),  # fallbacks interleave with single drafts
        dict(fallback_threshold=1.0, fallback_candidates=3),  # every round: the drawn candidate and 2 siblings
        dict(fallback_threshold=0.5, max_draft_tokens=2, fallback_candidates=4),
    ],
)
def test_rollback_zero_samples_exactly_like_the_large_model(pair, prompt, settings):
    large, _ = pair
    expected = large_joint_distribution(large, prompt, **SAMPLING)
    counts = bild_joint_counts(large, prompt, seed=0, rollback_threshold=0.0, **settings)
    assert chi_square_p_value(counts, expected) > P_VALUE


def test_stock_sampling_passes_the_same_check(pair, prompt):
    """The check's own calibration: stock large-model sampling passes it."""
    large, _ = pair
    expected = large_joint_distribution(large, prompt, **SAMPLING)
    torch.manual_seed(0)
    out = large.generate(prompt.repeat(N_ROWS, 1), max_new_tokens=2, pad_token_id=PAD, **SAMPLING)
    first, second = out[:, len(prompt)], out[:, len(prompt) + 1]
    counts = torch.bincount(first * VOCAB + second, minlength=VOCAB * VOCAB)
    assert chi_square_p_value(counts, expected) > P_VALUE


def residual_forgotten(draft_ids, n_drafted, draft_probs, target_probs, rollback_threshold, generator=None, rule="nll"):
    """A classic bug: after a rejection, draw the replacement from p instead of norm(max(0, p - q))."""
    n_accepted, is_rollback, next_ids = policies.find_rollback_sampled(
        draft_ids, n_drafted, draft_probs, target_probs, rollback_threshold, generator, rule
    )
    from_p = policies.sample(target_probs[torch.arange(len(n_accepted)), n_accepted], generator)
    return n_accepted, is_rollback, torch.where(is_rollback, from_p, next_ids)


FLAT_SAMPLING = dict(do_sample=True, temperature=4.0, top_k=6)  # siblings often kept, then many tokens likely


@pytest.mark.parametrize("is_broken", [False, True])
def test_siblings_under_sampling_are_exact_and_the_check_catches_a_greedy_token_after_one(pair, prompt, monkeypatch,
                                                                                          is_broken):  # fmt: skip
    """Siblings are exact because the token after a kept one is drawn from the large model's distribution
    there; taking its most likely token instead skews the second token, and the check sees it."""
    large, _ = pair
    if is_broken:
        choose = decoding.choose_sibling
        monkeypatch.setattr(decoding, "choose_sibling", lambda *args: choose(*args[:-1], Sampling()))
    expected = large_joint_distribution(large, prompt, **FLAT_SAMPLING)
    counts = bild_joint_counts(large, prompt, seed=0, sampling=FLAT_SAMPLING, rollback_threshold=0.0,
                               fallback_threshold=1.0, fallback_candidates=4)  # fmt: skip
    assert (chi_square_p_value(counts, expected) < P_VALUE) == is_broken


def test_the_check_catches_a_broken_acceptance_rule(pair, prompt, monkeypatch):
    large, _ = pair
    monkeypatch.setattr(decoding, "find_rollback_sampled", residual_forgotten)
    expected = large_joint_distribution(large, prompt, **SAMPLING)
    counts = bild_joint_counts(large, prompt, seed=0, rollback_threshold=0.0, fallback_threshold=0.0)
    assert chi_square_p_value(counts, expected) < P_VALUE


# --- oracles and reproducibility --------------------------------------------------------------------------


@pytest.mark.parametrize("rollback_threshold", [0.0, 2.0])
def test_top_k_one_sampling_is_large_greedy(pair, rollback_threshold):
    """top_k=1 leaves one token per distribution, so sampling must reproduce large greedy token for token."""
    large, _ = pair
    ids, mask = left_pad(prompts(4))
    greedy = large.generate(ids, attention_mask=mask, max_new_tokens=16, pad_token_id=PAD)
    sampled = large.generate(
        ids, attention_mask=mask, max_new_tokens=16, pad_token_id=PAD, generation_mode="bild", do_sample=True,
        top_k=1, rollback_threshold=rollback_threshold, fallback_threshold=0.3, max_draft_tokens=4,
    )  # fmt: skip
    assert torch.equal(sampled, greedy)


def test_top_k_one_sampling_is_large_greedy_encoder_decoder(s2s):
    large, _ = s2s
    ids, mask = left_pad(prompts(3))
    greedy = large.generate(ids, attention_mask=mask, max_new_tokens=10)
    sampled = large.generate(
        ids, attention_mask=mask, max_new_tokens=10, generation_mode="bild", do_sample=True, top_k=1,
        rollback_threshold=0.0, fallback_threshold=0.0,
    )  # fmt: skip
    assert torch.equal(sampled, greedy)


def test_same_seed_same_output(pair):
    large, _ = pair
    ids, mask = left_pad(prompts(4))

    def run(**kwargs):
        return large.generate(
            ids, attention_mask=mask, max_new_tokens=16, pad_token_id=PAD, generation_mode="bild",
            rollback_threshold=1.0, **SAMPLING, **kwargs,
        )  # fmt: skip

    torch.manual_seed(7)
    first = run()
    torch.manual_seed(7)
    assert torch.equal(run(), first)
    torch.manual_seed(8)
    assert not torch.equal(run(), first)
    # a private generator: reproducible, and independent of the global random state
    a = run(generator=torch.Generator().manual_seed(7))
    torch.rand(100)
    assert torch.equal(run(generator=torch.Generator().manual_seed(7)), a)


def test_sampled_bild_counts_add_up(pair):
    """inf never rolls back; fallback 1.0 hands every token to the large model."""
    large, _ = pair
    ids = prompts(1)[0][None]

    def stats(**settings):
        out = large.generate(
            ids, max_new_tokens=12, pad_token_id=PAD, generation_mode="bild", return_dict_in_generate=True,
            **SAMPLING, **settings,
        )  # fmt: skip
        return out.bild_stats

    never = stats(rollback_threshold=math.inf, fallback_threshold=0.0, max_draft_tokens=3)
    assert never.rollbacks == [0] and never.accepted == never.drafted
    assert never.large_forwards == [3]  # 3 drafts + 1 large token per round, 12 tokens
    always = stats(rollback_threshold=2.0, fallback_threshold=1.0, fallback_candidates=0)  # the paper's rule
    assert always.drafted == [0] and always.large_forwards == [12]


# --- the rule itself, on hand-made distributions ------------------------------------------------------------


def test_sampled_rollback_uses_cross_entropy_under_the_large_model():
    # one row, three drafts; the large model gives them probabilities 0.5, 0.1, 0.9
    draft_ids = torch.tensor([[0, 1, 2]])
    target_probs = torch.tensor([[[0.5, 0.4, 0.1], [0.0, 0.1, 0.9], [0.05, 0.05, 0.9], [1.0, 0.0, 0.0]]])
    draft_probs = torch.full((1, 3, 3), 1 / 3)
    n_drafted = torch.tensor([3])
    # -log 0.1 = 2.3 > 2.0: rolled back at draft 1, replaced by a draw from p there (token 2: p = 0.9 vs 0)
    n_accepted, is_rollback, next_ids = policies.find_rollback_sampled(
        draft_ids, n_drafted, draft_probs, target_probs, 2.0
    )
    assert n_accepted.tolist() == [1] and is_rollback.tolist() == [True]
    assert next_ids.item() in (1, 2)
    # 3.0 keeps all three; the next token comes from the last column, which is certain
    n_accepted, is_rollback, next_ids = policies.find_rollback_sampled(
        draft_ids, n_drafted, draft_probs, target_probs, 3.0
    )
    assert (n_accepted.item(), is_rollback.item(), next_ids.item()) == (3, False, 0)


def test_speculative_residual_excludes_what_the_draft_covered():
    """A token rejected at rollback 0 is replaced from max(0, p - q): never by a token with q >= p."""
    generator = torch.Generator().manual_seed(0)
    draft_ids = torch.zeros(2000, 1, dtype=torch.long)
    draft_probs = torch.tensor([0.9, 0.1, 0.0]).repeat(2000, 1, 1)
    target_probs = torch.tensor([[0.3, 0.1, 0.6], [1.0, 0.0, 0.0]]).repeat(2000, 1, 1)
    n_accepted, is_rollback, next_ids = policies.find_rollback_sampled(
        draft_ids, torch.ones(2000, dtype=torch.long), draft_probs, target_probs, 0.0, generator
    )
    assert set(next_ids[is_rollback].tolist()) == {2}  # p - q > 0 only for token 2
    assert set(next_ids[~is_rollback].tolist()) == {0}  # after an accepted draft: the certain column
    assert abs(is_rollback.float().mean().item() - (1 - 0.3 / 0.9)) < 0.04  # rejected with 1 - p/q

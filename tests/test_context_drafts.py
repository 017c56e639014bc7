"""Context drafts (``prompt_lookup_num_tokens`` in bild mode): free drafts copied from each row's own text.

Prompts here repeat a stretch of text, or walk a short cycle of the Markov chain both models learned, so the
lookup finds the row's last n-gram earlier in its text and the large model agrees with what followed it.
"""

from __future__ import annotations

import pytest
import torch
from conftest import CHAIN, EOS, PAD, VOCAB, left_pad, sample_chain
from test_core import bild_generate, strip
from test_sampling import P_VALUE, SAMPLING, chi_square_p_value, large_joint_distribution
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

import bild
from bild import decoding
from bild.bench.bench_config import parse_config
from bild.config import DEFAULT_PROMPT_LOOKUP_NUM_TOKENS, BildSettings
from bild.context_drafts import propose_context_drafts
from bild.schedule import DraftCosts, DraftSchedule
from bild.state import BatchState, DecoderInputs, Sampling, TokenRules

# how context drafts are priced (`DraftSchedule.context_caps`): the small model reads more tokens at no extra cost,
# so every match is proposed (measured costs of these tiny models would make that depend on the machine's timing)
FREE_CHUNKS = DraftCosts(small=((1, 0.1), (64, 0.1)), large=((1, 1.0), (64, 2.0)))
LOOKUP = dict(prompt_lookup_num_tokens=4, max_matching_ngram_size=2, draft_costs=FREE_CHUNKS)


def repeating_prompts(n: int, seed: int = 5) -> list[torch.Tensor]:
    """``n`` prompts of unequal lengths: a walk around `chain_cycle`, then chain-following stretches of text
    each followed by itself and its first half again."""
    generator = torch.Generator().manual_seed(seed)
    rows = [sample_chain(CHAIN, 1, 3 + b % 4, generator)[0] for b in range(1, n)]
    return [torch.tensor(chain_cycle() * 2)] + [torch.cat([row, row, row[: len(row) // 2 + 1]]) for row in rows]


def chain_cycle() -> list[int]:
    """The shortest cycle of 3 tokens or more of the chain: text that walks it repeats itself, and the large
    model follows it."""
    cycles = []
    for first in range(3, VOCAB):
        cycle, token = [first], int(CHAIN[first])
        while token not in cycle:
            cycle.append(token)
            token = int(CHAIN[token])
        cycles.append(cycle[cycle.index(token) :])
    return min((cycle for cycle in cycles if len(cycle) >= 3), key=len)


def totals(out) -> dict:
    return {name: out.bild_stats.total(name) for name in out.bild_stats.names()}


# --- the lookup itself ----------------------------------------------------------------------------------


def lookup(rows, k=3, max_ngram=2, max_length=30):
    """Context drafts of left-padded ``rows``: `(n_context, ends_in_eos, each row's drafts)`."""
    ids, mask = left_pad([torch.tensor(r) for r in rows])
    state = BatchState.from_prompts(ids, mask, max_length, PAD)
    rules = TokenRules(LogitsProcessorList(), StoppingCriteriaList(), max_length, PAD, torch.tensor([EOS]), VOCAB)
    settings = BildSettings(prompt_lookup_num_tokens=k, max_matching_ngram_size=max_ngram)
    n_context, ends_in_eos = propose_context_drafts(state, rules, settings)
    drafts = [state.token_ids[b, ids.shape[1] : int(state.lengths[b])].tolist() for b in range(len(rows))]
    assert (state.lengths - ids.shape[1]).tolist() == n_context.tolist()
    return n_context.tolist(), ends_in_eos.tolist(), drafts


def test_lookup_takes_the_most_recent_earlier_match_of_the_longest_ngram():
    _, _, drafts = lookup([
        [5, 6, 7, 5, 6, 8, 5, 6],  # (5, 6) at 0 and 3: the most recent wins (stock's first match would give 7)
        [5, 6, 9, 4, 6, 7, 5, 6],  # (5, 6) at 0 beats the more recent unigram 6 at 4
        [4, 6, 7, 5, 6],  # no earlier (5, 6): the unigram 6 at 1
        [5, 5],  # only one token follows the match (the suffix itself)
        [3, 4, 5, 6],  # nothing to match
    ])  # fmt: skip
    assert drafts == [[8, 5, 6], [9, 4, 6], [7, 5, 6], [5], []]


def test_lookup_skips_padding_and_stops_at_eos_and_the_length_limit():
    n_context, ends_in_eos, drafts = lookup([[4, PAD], [5, EOS, 7, 5], [3, 9, 8, 5, 9, 7, 3, 9]], k=3, max_ngram=1)
    assert drafts[0] == []  # row 0's last token, PAD, occurs earlier only in the left padding
    assert drafts[1] == [EOS] and ends_in_eos == [False, True, False]  # EOS is the last context draft
    assert drafts[2] == [7, 3, 9]  # the unigram 9 at 4: (3, 9) at 0 is not looked up (max_matching_ngram_size=1)
    n_context, _, drafts = lookup([[3, 9, 8, 3, 9]], k=3, max_length=7)
    assert n_context == [2] and drafts == [[8, 3]]  # room for 2 tokens


# --- oracles ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 8])
@pytest.mark.parametrize("settings", [dict(fallback_threshold=0.5, max_draft_tokens=4, **LOOKUP),
                                      dict(fallback_threshold=0.9, max_draft_tokens=2, prompt_lookup_num_tokens=6,
                                           max_matching_ngram_size=1, draft_costs=FREE_CHUNKS),
                                      dict(fallback_threshold=0.9, max_draft_tokens=4, fallback_candidates=3, **LOOKUP)])  # fmt: skip
def test_rollback_zero_with_lookup_is_large_greedy_decoder_only(pair, batch_size, settings):
    large, _ = pair
    ids, mask = left_pad(repeating_prompts(batch_size))
    expected = large.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=PAD)
    out = bild_generate(large, ids, mask, rollback_threshold=0.0, **settings)
    assert out.sequences.tolist() == expected.tolist()
    counts = totals(out)
    assert counts["context_accepted"] > 0, "the prompts must make context drafts that are kept"
    assert counts["context_drafted"] <= counts["drafted"] and counts["context_accepted"] <= counts["accepted"]


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("batch_size", [1, 8])
def test_rollback_zero_with_lookup_is_large_greedy_encoder_decoder(s2s, batch_size, k):
    """T5: the text looked up is the decoder's (its start token and the accepted tokens)."""
    large, _ = s2s
    generator = torch.Generator().manual_seed(3)
    patterns = [sample_chain(CHAIN, 1, 3 + b % 3, generator)[0] for b in range(batch_size)]
    src = torch.stack([p.repeat(4)[:10] for p in patterns])  # the translation repeats the pattern's too
    src[:, 7] = torch.randint(3, VOCAB, (batch_size,), generator=generator)  # until it does not
    src[1:, 8:] = PAD
    mask = (src != PAD).long()
    expected = large.generate(src, attention_mask=mask, max_new_tokens=12)
    out = bild_generate(large, src, mask, rollback_threshold=0.0, fallback_threshold=0.6, max_new_tokens=12,
                        fallback_candidates=k, **LOOKUP)  # fmt: skip
    assert [strip(r) for r in out.sequences] == [strip(r) for r in expected]
    assert totals(out)["context_accepted"] > 0 and (totals(out)["siblings"] > 0) == (k > 1)


def test_batch_equals_rows_alone_with_lookup(pair):
    large, _ = pair
    rows = repeating_prompts(8, seed=6)
    ids, mask = left_pad(rows)
    settings = dict(fallback_threshold=0.7, rollback_threshold=1.0, max_draft_tokens=3, **LOOKUP)
    batch = bild_generate(large, ids, mask, **settings)
    for b, row in enumerate(rows):
        alone = bild_generate(large, row[None], **settings)
        assert strip(batch.sequences[b, ids.shape[1] :]) == strip(alone.sequences[0, len(row) :])
        assert batch.bild_stats.row(b).to_dict() == alone.bild_stats.to_dict()
    context = batch.bild_stats.context_drafted
    assert len(set(context)) > 1 and min(context) < max(context), "rows must differ in their matches"
    assert totals(batch)["rollbacks"] > 0


@pytest.mark.parametrize("max_draft_tokens", ["auto", 20])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_context_drafts_are_proposed_only_where_checking_them_pays(pair, batch_size, max_draft_tokens):
    """Greedy, under either cap: a context draft the small model keeps saves it a step, and reading n of them
    costs its forward small(n + 1) - small(1) more. Where that is free every match is proposed in full; where
    each costs a whole step none is (no kept draft saves more than it costs)."""
    large, _ = pair
    ids, mask = left_pad(repeating_prompts(batch_size))
    expected = large.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=PAD)
    runs = {}
    for name, small in (("free", ((1, 0.1), (64, 0.1))), ("steep", ((1, 0.1), (64, 6.4)))):
        costs = DraftCosts(small=small, large=((1, 1.0), (64, 2.0)))
        runs[name] = bild_generate(large, ids, mask, rollback_threshold=0.0, max_draft_tokens=max_draft_tokens,
                                   **{**LOOKUP, "draft_costs": costs})  # fmt: skip
        assert runs[name].sequences.tolist() == expected.tolist()
    assert totals(runs["free"])["context_accepted"] > 0 and totals(runs["steep"])["context_drafted"] == 0


def test_copies_that_run_long_are_proposed_in_full():
    """The chance that a copy goes on one more token is read from the tokens kept and the copies cut short, not
    from kept over proposed: copies of 10 that keep 6 go on at 6/7 a token, so where each kept token saves 0.15,
    the first token read costs 0.04 and each further one 0.02, the whole match is worth proposing (kept over
    proposed, 0.6, would stop at 4); copies refused at once are not proposed at all."""
    costs = DraftCosts(small=((1, 0.15), (2, 0.19), (64, 0.19 + 0.02 * 62)), large=((1, 1.0), (64, 2.0)))
    caps = {}
    for kept in (6, 0):
        schedule = DraftSchedule(1, torch.device("cpu"), 20, costs)
        for _ in range(20):
            schedule.update_context(torch.tensor([True]), torch.tensor([10]), torch.tensor([kept]))
        caps[kept] = schedule.context_caps(10, sampling=False).tolist()
    assert caps == {6: [10], 0: [0]}


def test_a_row_keeps_copied_tokens_only_where_it_is_sure_of_them(pair):
    """Greedy: the small model keeps a copied token only where it would have drafted it itself, sure of it. At the
    first one it agrees with but doubts, the round ends as it would have without context drafts: that step,
    already made by the checking forward, falls back and puts its candidates there for the large model."""
    large, small = pair
    cycle = chain_cycle()
    ids = torch.tensor([cycle * 2])
    n_lookup = len(cycle)  # the lookup proposes the cycle once more; the small model's chain leaves it somewhere
    with torch.no_grad():
        probs = small(torch.tensor([cycle * 4])).logits[0, ids.shape[1] - 1 :].softmax(dim=-1)  # [T, V]
    agrees = probs[:n_lookup].argmax(dim=-1) == torch.tensor(cycle)
    n_agreed = int(agrees.int().argmin()) if not bool(agrees.all()) else n_lookup
    confidence = probs[: n_agreed + 1].max(dim=-1).values  # its own step after them too, from the same forward
    doubted = int(confidence[:n_agreed].argmin())
    assert n_agreed > 0 and confidence[doubted] < confidence[n_agreed]  # the case this test is about

    def first_round(fallback_threshold):
        state = BatchState.from_prompts(ids, None, ids.shape[1] + 20, PAD)
        rules = TokenRules(LogitsProcessorList(), StoppingCriteriaList(), state.token_ids.shape[1] + 20, PAD,
                           torch.tensor([EOS]), VOCAB)  # fmt: skip
        settings = BildSettings(fallback_threshold=fallback_threshold, prompt_lookup_num_tokens=n_lookup,
                                fallback_candidates=1)  # fmt: skip
        _, small_decoder, _ = decoding.build_decoders(large, small, DecoderInputs(ids), VOCAB, 1)
        drafts = decoding.draft(small_decoder, state, rules, Sampling(), settings, cap=10)
        return drafts, state.token_ids[0, ids.shape[1] : int(state.lengths[0])].tolist()

    threshold = float(confidence[doubted] + confidence[confidence > confidence[doubted]].min()) / 2
    kept = int((confidence[:n_agreed] < threshold).int().argmax())  # copied tokens before the first doubted one
    drafts, written = first_round(threshold)
    assert drafts.n_context.tolist() == [kept] and drafts.n_drafted.tolist() == [kept]
    assert drafts.fell_back.tolist() == [True] and drafts.has_candidate.tolist() == [True]
    assert written == cycle[: kept + 1] and drafts.n_steps.tolist() == [1]  # the doubted token is the candidate
    drafts, _ = first_round(float(confidence.min()) / 2)  # sure of all: it drafts on from the same forward
    assert drafts.n_context.tolist() == [n_agreed] and int(drafts.n_drafted) > n_agreed


@pytest.mark.parametrize("fallback_threshold", [0.3, 0.866, 0.95])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_context_drafts_save_small_steps_and_never_cost_a_large_forward(pair, fallback_threshold, batch_size):
    """Greedy, no cap reached: a row drafts what it would have drafted without context drafts, reading the
    stretches it copied in one forward each (copies that reach the length limit are not even read). So outputs
    are the same, with fewer small forwards and never more large ones. (0.866 lies among the small model's
    confidences on these prompts.)"""
    large, small = pair
    ids, mask = left_pad(repeating_prompts(batch_size))
    settings = dict(fallback_threshold=fallback_threshold, rollback_threshold=0.0, max_new_tokens=20,
                    max_draft_tokens=64)  # fmt: skip
    plain = bild_generate(large, ids, mask, **settings, prompt_lookup_num_tokens=0)
    copied = bild_generate(large, ids, mask, **settings, **LOOKUP)
    assert copied.sequences.tolist() == plain.sequences.tolist()
    for row_copied, row_plain in zip(copied.bild_stats.large_forwards, plain.bild_stats.large_forwards, strict=True):
        assert row_copied <= row_plain
    assert totals(copied)["context_accepted"] > 0
    assert totals(copied)["small_forwards"] < totals(plain)["small_forwards"]


def test_max_draft_tokens_caps_small_steps_only(pair):
    """Context drafts come on top of the cap: with one small step a round, a round checks more than one draft."""
    large, _ = pair
    ids = torch.tensor([chain_cycle() * 2])
    out = bild_generate(large, ids, fallback_threshold=0.0, rollback_threshold=0.0, max_draft_tokens=1, **LOOKUP)
    stats = out.bild_stats
    # at most one small step a round (none once context drafts reach max_new_tokens), one draft each
    assert stats.drafted[0] - stats.context_drafted[0] == stats.small_forwards[0] <= stats.large_forwards[0]
    assert stats.context_accepted[0] > stats.large_forwards[0]  # yet more drafts kept than rounds


def test_settings_come_from_a_generation_config_and_allow_several_sequences(pair):
    """They are stock GenerationConfig fields; stock generate() would refuse num_return_sequences > 1 with them
    (assisted decoding), bild mode takes it."""
    large, _ = pair
    ids = torch.tensor([chain_cycle() * 2])
    config = bild.BildGenerationConfig(
        rollback_threshold=0.0, max_new_tokens=12, pad_token_id=PAD, return_dict_in_generate=True,
        prompt_lookup_num_tokens=3, num_return_sequences=2, do_sample=True, top_k=1,
    )  # fmt: skip
    out = large.generate(ids, generation_config=config)
    assert out.sequences.shape[0] == 2 and totals(out)["context_accepted"] > 0
    greedy = large.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=PAD)
    assert out.sequences.tolist() == greedy.repeat(2, 1).tolist()  # top_k=1: sampling is greedy
    assert config.prompt_lookup_num_tokens == 3  # the config passed in is left as it was


# --- sampling -------------------------------------------------------------------------------------------

N_ROWS = 4000


def lookup_prompt() -> torch.Tensor:
    cycle = chain_cycle()
    return torch.tensor(cycle + cycle[:2])  # its last bigram occurred at the start: context drafts from token 1


def joint_counts(large, prompt, **settings) -> torch.Tensor:
    torch.manual_seed(0)
    out = large.generate(
        prompt.repeat(N_ROWS, 1), generation_mode="bild", max_new_tokens=3, pad_token_id=PAD, rollback_threshold=0.0,
        **SAMPLING, **settings,
    )  # fmt: skip
    first, second = out[:, len(prompt)], out[:, len(prompt) + 1]
    return torch.bincount(first * VOCAB + second, minlength=VOCAB * VOCAB).reshape(VOCAB, VOCAB)


@pytest.mark.parametrize(
    "settings",
    [
        dict(fallback_threshold=1.0, prompt_lookup_num_tokens=2),  # context drafts only
        # the second token is the small model's first draft, after one context draft
        dict(fallback_threshold=0.0, max_draft_tokens=2, prompt_lookup_num_tokens=1),
    ],
)
def test_rollback_zero_with_lookup_samples_exactly_like_the_large_model(pair, settings):
    """A context draft is drawn from a point mass: kept with probability p(x), else redrawn from p without x."""
    large, _ = pair
    prompt = lookup_prompt()
    expected = large_joint_distribution(large, prompt, **SAMPLING)
    assert 0.1 < float(expected[int(prompt[2])].sum()) < 0.9, "the first context draft must be sometimes rejected"
    assert chi_square_p_value(joint_counts(large, prompt, **settings), expected) > P_VALUE


def test_the_check_catches_context_drafts_treated_as_uniform_draws(pair, monkeypatch):
    large, _ = pair

    def uniform(step_probs, state, start, n_context, n_drafted):
        return torch.full((len(start), int(n_drafted.max()), step_probs.shape[-1]), 1 / step_probs.shape[-1])

    monkeypatch.setattr(decoding, "context_draft_probs", uniform)
    prompt = lookup_prompt()
    expected = large_joint_distribution(large, prompt, **SAMPLING)
    counts = joint_counts(large, prompt, fallback_threshold=1.0, prompt_lookup_num_tokens=2)
    assert chi_square_p_value(counts, expected) < P_VALUE


# --- settings --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(prompt_lookup_num_tokens=-2), "`prompt_lookup_num_tokens` must be an integer >= 0 or None, got -2"),
        (dict(prompt_lookup_num_tokens=2.5), "`prompt_lookup_num_tokens` must be an integer >= 0"),
        (dict(prompt_lookup_num_tokens=True), "`prompt_lookup_num_tokens` must be an integer >= 0"),
        (dict(prompt_lookup_num_tokens=3, max_matching_ngram_size=0), "`max_matching_ngram_size` must be an integer"),
        (dict(max_matching_ngram_size=-1), "`max_matching_ngram_size` must be an integer >= 1 or None"),
    ],
)
def test_bad_values_raise(pair, kwargs, message):
    large, _ = pair
    ids = torch.tensor([[3, 4, 3]])
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        bild_generate(large, ids, **kwargs)
    with pytest.raises(ValueError, match="must be an integer"):  # the same from a stock config passed in
        bild_generate(large, ids, generation_config=GenerationConfig(**kwargs))
    with pytest.raises(ValueError, match="must be an integer"):
        bild.BildGenerationConfig(**kwargs)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_greedy_decoding_drafts_from_the_context_by_default(pair, batch_size):
    """Left unset, prompt_lookup_num_tokens copies up to 10 tokens a round in greedy decoding (still exact), and
    none when sampling; 0 turns context drafts off."""
    large, _ = pair
    ids, mask = left_pad(repeating_prompts(batch_size))
    expected = large.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=PAD)
    runs = {n: bild_generate(large, ids, mask, rollback_threshold=0.0, draft_costs=FREE_CHUNKS,
                             **({} if n is None else {"prompt_lookup_num_tokens": n}))
            for n in (None, 0, 10)}  # fmt: skip
    for out in runs.values():
        assert out.sequences.tolist() == expected.tolist()
    assert totals(runs[None]) == totals(runs[10]) and totals(runs[None])["context_drafted"] > 0
    assert totals(runs[0])["context_drafted"] == 0
    sampled = bild_generate(large, ids, mask, do_sample=True, draft_costs=FREE_CHUNKS)
    assert totals(sampled)["context_drafted"] == 0
    settings = BildSettings()
    assert settings.for_decoding(do_sample=False).prompt_lookup_num_tokens == DEFAULT_PROMPT_LOOKUP_NUM_TOKENS
    assert settings.for_decoding(do_sample=True).prompt_lookup_num_tokens is None
    assert BildSettings(prompt_lookup_num_tokens=3).for_decoding(do_sample=True).prompt_lookup_num_tokens == 3


def test_bench_bild_method_takes_the_lookup_settings():
    base = {"task": "translation", "small": "s", "large": "l"}
    config = parse_config({**base, "methods": [{"name": "bild", "prompt_lookup_num_tokens": 5}, "bild"]})
    lookup_method, plain = config.methods
    assert lookup_method.params["prompt_lookup_num_tokens"] == 5
    assert "max_matching_ngram_size" not in lookup_method.params
    assert lookup_method.label == "bild(0.6, 1, 20+pl5)"
    assert "prompt_lookup_num_tokens" not in plain.params  # unset: not passed to generate()
    assert plain.label == "bild(0.6, 1, 20)"
    off = parse_config({**base, "methods": [{"name": "bild", "prompt_lookup_num_tokens": 0}]}).methods[0]
    assert off.label == "bild(0.6, 1, 20+pl0)" and off.params["prompt_lookup_num_tokens"] == 0
    with pytest.raises(ValueError, match="my.yaml: bild method: `max_matching_ngram_size` must be"):
        parse_config({**base, "methods": [{"name": "bild", "max_matching_ngram_size": 0}]}, source="my.yaml")

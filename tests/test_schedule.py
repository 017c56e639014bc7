"""Cost-aware draft caps (``max_draft_tokens="auto"``) and the check of the unsure token on a fallback."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import PAD, left_pad, prompts

import bild
from bild.schedule import AUTO_MAX_DRAFT_TOKENS, DraftCosts, best_cap

# drafting can never pay: a small step costs 100 large ones
NEVER_PAYS = DraftCosts(small=((1, 100.0),), large=((1, 1.0), (64, 1.0)))
# drafting always pays: small steps are free and verification costs one forward whatever its length
ALWAYS_PAYS = DraftCosts(small=((1, 0.0),), large=((1, 1.0), (64, 1.0)))


def generate(large, ids, mask=None, **kwargs):
    settings = dict(fallback_threshold=0.5, rollback_threshold=0.0, max_new_tokens=20)
    settings.update(kwargs)
    return large.generate(ids, attention_mask=mask, generation_mode="bild", do_sample=False, pad_token_id=PAD,
                          return_dict_in_generate=True, **settings)  # fmt: skip


def stock_greedy(large, ids, mask=None, max_new_tokens=20):
    return large.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=PAD, max_new_tokens=max_new_tokens)


# --- the cost model, on hand-picked numbers ---------------------------------------------------------------


def test_best_cap_follows_costs_and_acceptance():
    assert best_cap([1.0], [1.0], ALWAYS_PAYS) == AUTO_MAX_DRAFT_TOKENS
    assert best_cap([1.0], [1.0], NEVER_PAYS) == 0
    costs = DraftCosts(small=((1, 0.4),), large=((1, 1.0), (2, 1.0), (64, 1.0)))
    assert best_cap([0.0], [1.0], costs) == 0  # a small model that is never confident
    # r = a = 0.5: one draft gives 1.25 tokens for 1.4 (0.89/unit) < 1 token for 1: plain steps win
    assert best_cap([0.5], [0.5], costs) == 0
    # r = a = 0.9: k drafts give sum (0.81)^j tokens; the cap stops growing where a step costs more than it yields
    k = best_cap([0.9], [0.9], costs)
    rates = [(1 + sum(0.81**j for j in range(1, n + 1))) / (1 + 0.4 * sum(0.9**j for j in range(n))) for n in range(21)]
    assert k == max(range(21), key=lambda n: (rates[n], n)) and 0 < k < AUTO_MAX_DRAFT_TOKENS


def test_costs_interpolate_extrapolate_and_round_trip(tmp_path):
    costs = DraftCosts(small=((1, 0.4), (11, 0.6)), large=((16, 2.5), (1, 1.0)))
    assert costs.large == ((1, 1.0), (16, 2.5))  # sorted by tokens fed
    assert costs.small_cost(6) == pytest.approx(0.5) and costs.large_cost(31) == pytest.approx(4.0)
    path = costs.save(tmp_path / "costs.json")
    assert DraftCosts.load(path) == costs == DraftCosts.load(json.loads(path.read_text()))


def test_costs_from_times_never_fall_with_more_tokens():
    """A time above a later point's is noise: it is lowered to the least at or after it, the unit included."""
    costs = DraftCosts.from_ms({1: 26.0, 2: 17.0, 4: 19.0, 8: 27.0}, {1: 110.0, 2: 100.0, 8: 150.0})
    assert costs.small == ((1, 0.17), (2, 0.17), (4, 0.19), (8, 0.27))
    assert costs.large == ((1, 1.0), (2, 1.0), (8, 1.5))
    ordered = DraftCosts.from_ms({1: 20.0, 8: 40.0}, {1: 100.0, 8: 150.0})
    assert ordered.small == ((1, 0.2), (8, 0.4)) and ordered.large == ((1, 1.0), (8, 1.5))


def test_estimated_costs_follow_weight_bytes(causal_pair):
    large, small = causal_pair
    costs = DraftCosts.estimate(large, small)
    assert 0 < costs.small_cost(1) < 1 == costs.large_cost(1)
    assert costs.large_cost(11) == pytest.approx(1 + 10 * 0.19)  # float32 on a CPU: arithmetic-bound


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"small": [[1, 0.4]]}, "exactly the keys 'small' and 'large'"),
        ({"small": [[1, -1.0]], "large": [[1, 1.0]]}, "cost >= 0"),
        ({"small": [[1, 0.4]], "large": [[1, 0.0]]}, "cost > 0"),
        ("/nonexistent/costs.json", "Could not read draft costs"),
    ],
)
def test_bad_costs_are_refused(value, message):
    with pytest.raises(ValueError, match=message):
        bild.BildSettings(max_draft_tokens="auto", draft_costs=value)


def test_bad_draft_cap_is_refused():
    with pytest.raises(ValueError, match="integer >= 1 or 'auto'"):
        bild.BildSettings(max_draft_tokens="fast")
    with pytest.raises(ValueError, match="verify_fallback_token"):
        bild.BildSettings(verify_fallback_token="yes")


# --- "auto" in the loop -----------------------------------------------------------------------------------


def test_auto_never_drafts_where_drafting_never_pays(pair):
    large, _ = pair
    ids, mask = left_pad(prompts(4))
    out = generate(large, ids, mask, max_draft_tokens="auto", draft_costs=NEVER_PAYS)
    stats = out.bild_stats
    assert stats.small_forwards == [0, 0, 0, 0] and stats.undrafted == stats.large_forwards
    assert torch.equal(out.sequences, stock_greedy(large, ids, mask))


def test_auto_is_the_largest_fixed_cap_where_drafting_always_pays(pair):
    large, _ = pair
    ids, mask = left_pad(prompts(4))
    auto = generate(large, ids, mask, max_draft_tokens="auto", draft_costs=dataclasses.asdict(ALWAYS_PAYS),
                    rollback_threshold=1.0, max_new_tokens=30)  # fmt: skip
    fixed = generate(large, ids, mask, max_draft_tokens=AUTO_MAX_DRAFT_TOKENS, rollback_threshold=1.0,
                     max_new_tokens=30, draft_costs=dataclasses.asdict(ALWAYS_PAYS))  # fmt: skip
    assert torch.equal(auto.sequences, fixed.sequences)
    assert auto.bild_stats == fixed.bild_stats


def test_auto_with_measured_costs_is_lossless_and_reproducible(pair, tmp_path, monkeypatch):
    """Without draft_costs, "auto" measures the pair on first use; the next call reads the stored costs."""
    monkeypatch.setenv("BILD_HOME", str(tmp_path))
    large, small = pair
    ids, mask = left_pad(prompts(4))
    calls = []
    hook = large.lm_head.register_forward_hook(lambda *args: calls.append(1))  # each forward, lean or own
    try:
        first = generate(large, ids, mask, max_draft_tokens="auto")
        n_first = len(calls)
        second = generate(large, ids, mask, max_draft_tokens="auto")
        n_second = len(calls) - n_first
    finally:
        hook.remove()
    assert torch.equal(first.sequences, stock_greedy(large, ids, mask))
    assert torch.equal(first.sequences, second.sequences) and first.bild_stats == second.bild_stats
    # the first call timed the large model (a context and repeated forwards), the second only decoded
    assert n_first > n_second == max(second.bild_stats.large_forwards)
    assert DraftCosts.for_pair(large, small) == DraftCosts.load(
        {k: v for k, v in json.loads(next((tmp_path / "fit").glob("costs-*.json")).read_text()).items() if k != "key"}
    )


def test_auto_in_a_saved_config(pair, tmp_path):
    large, _ = pair
    costs_file = ALWAYS_PAYS.save(tmp_path / "costs.json")
    config = bild.BildGenerationConfig(max_draft_tokens="auto", draft_costs=str(costs_file), rollback_threshold=0.0,
                                       max_new_tokens=12, pad_token_id=PAD, do_sample=False)  # fmt: skip
    config.save_pretrained(tmp_path / "config")
    loaded = bild.BildGenerationConfig.from_pretrained(tmp_path / "config")
    assert (loaded.max_draft_tokens, loaded.draft_costs) == ("auto", str(costs_file))
    ids = prompts(1)[0][None]
    out = large.generate(ids, generation_config=loaded)
    assert torch.equal(out, stock_greedy(large, ids, max_new_tokens=12))


# --- the unsure token checked on a fallback ----------------------------------------------------------------


@pytest.mark.parametrize("max_draft_tokens", [4, "auto"])
def test_checking_the_unsure_token_is_lossless_and_batch_safe(pair, max_draft_tokens):
    large, _ = pair
    # "auto" chooses one cap for the rows of a batch: with costs that always favour drafting, that is every
    # row's own choice, so the per-row stats can be compared too (measured costs could favour either)
    costs = {"draft_costs": ALWAYS_PAYS} if max_draft_tokens == "auto" else {}
    ids, mask = left_pad(prompts(4))
    out = generate(large, ids, mask, fallback_threshold=0.9, verify_fallback_token=True,
                   max_draft_tokens=max_draft_tokens, **costs)  # fmt: skip
    assert torch.equal(out.sequences, stock_greedy(large, ids, mask))
    for b in range(4):
        alone = generate(large, ids[b : b + 1, mask[b].bool()], fallback_threshold=0.9, verify_fallback_token=True,
                         max_draft_tokens=max_draft_tokens, **costs)  # fmt: skip
        assert torch.equal(alone.sequences[0], out.sequences[b, -alone.sequences.shape[1] :])
        assert alone.bild_stats.to_dict() == out.bild_stats.row(b).to_dict()


def test_checking_the_unsure_token_saves_large_forwards(pair):
    """With a small model that is always 'unsure', every round falls back; checking its token still gains."""
    large, _ = pair
    ids = prompts(1)[0][None]
    without = generate(large, ids, fallback_threshold=1.0, max_new_tokens=24, fallback_candidates=0)
    checked = generate(large, ids, fallback_threshold=1.0, max_new_tokens=24, verify_fallback_token=True)
    assert torch.equal(without.sequences, checked.sequences)
    assert without.bild_stats.large_forwards[0] == 24 and without.bild_stats.accepted[0] == 0
    # every kept candidate makes its round yield two tokens
    assert checked.bild_stats.accepted[0] > 0
    n_accepted = checked.bild_stats.accepted[0]
    assert checked.bild_stats.large_forwards[0] in (24 - n_accepted, 25 - n_accepted)  # 25: no room after the last


def test_checking_the_unsure_token_keeps_seq2seq_lossless(s2s):
    large, _ = s2s
    src = torch.stack([p[:5] for p in prompts(2, lengths=(5,))])
    out = large.generate(src, generation_mode="bild", fallback_threshold=0.9, rollback_threshold=0.0,
                         verify_fallback_token=True, max_new_tokens=12, do_sample=False)  # fmt: skip
    assert torch.equal(out, large.generate(src, max_new_tokens=12, do_sample=False))


def test_checking_the_unsure_token_under_sampling_with_top_k_1_is_greedy(pair):
    large, _ = pair
    ids, mask = left_pad(prompts(3))
    out = large.generate(ids, attention_mask=mask, generation_mode="bild", do_sample=True, top_k=1,
                         fallback_threshold=0.9, rollback_threshold=0.0, verify_fallback_token=True,
                         max_new_tokens=16, pad_token_id=PAD)  # fmt: skip
    assert torch.equal(out, stock_greedy(large, ids, mask, max_new_tokens=16))

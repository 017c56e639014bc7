"""The rollback rule (``rollback_rule``): what ``rollback_threshold`` bounds, a draft's cross-entropy under the large
model (``"nll"``, the paper's) or how far its log-probability falls below the top token's (``"margin"``). Hand-built
distributions for the rule itself, the float32 oracles on a tiny real pair, and its way through configs, the
bench's labels and journal keys, and the sweep and calibrate grids."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import PAD, left_pad, prompts, qwen
from test_core import strip

import bild
from bild.bench.bench_config import parse_config, parse_method, parse_rollback_rules
from bild.bench.calibration import make_grid
from bild.bench.cli import sweep_methods
from bild.bench.plot import front_curves, short_bild_label
from bild.policies import draft_scores, find_rollback, find_rollback_sampled

# the large model unsure (top 0.40, the draft 0.35), then sure (top 0.90, the draft 0.05); each row drafts token 1
UNSURE, SURE = [0.40, 0.35, 0.25], [0.90, 0.05, 0.05]


def rollback(rows: list[list[float]], threshold: float, rule: str) -> int:
    """Drafts kept of a row that drafted token 1 under each distribution of ``rows`` (then one more column)."""
    probs = torch.tensor([[*rows, [1.0, 0.0, 0.0]]])
    draft_ids = torch.ones(1, len(rows), dtype=torch.long)
    n_drafted = torch.tensor([len(rows)])
    n_accepted, _ = find_rollback(draft_ids, n_drafted, probs.log(), probs.argmax(-1), threshold, rule)
    if threshold > 0:  # the sampled rule is the same bound, nothing drawn (0: exact speculative sampling)
        sampled, _, _ = find_rollback_sampled(draft_ids, n_drafted, torch.full_like(probs[:, :-1], 1 / 3), probs,
                                              threshold, rule=rule)  # fmt: skip
        assert sampled.item() == n_accepted.item()
    return n_accepted.item()


def test_margin_measures_from_the_top_token_nll_from_certainty():
    scores = {rule: draft_scores(torch.tensor([[UNSURE, SURE]]).log(), torch.ones(1, 2, dtype=torch.long), rule, True)
              for rule in ("nll", "margin")}  # fmt: skip
    assert scores["nll"][0].tolist() == pytest.approx([-math.log(0.35), -math.log(0.05)])
    assert scores["margin"][0].tolist() == pytest.approx([math.log(0.40 / 0.35), math.log(0.90 / 0.05)])
    # unsure: a near-tie passes the margin rule at 1 and fails the paper's; sure: both roll the draft back
    assert rollback([UNSURE], 1.0, "nll") == 0 and rollback([UNSURE], 1.0, "margin") == 1
    assert rollback([SURE], 2.0, "nll") == 0 and rollback([SURE], 2.0, "margin") == 0
    assert rollback([UNSURE, SURE], 3.0, "margin") == 2 and rollback([UNSURE, SURE], 0.5, "margin") == 1
    # 0 is lossless under either rule: a draft tied with the large model's own choice (margin 0) is rolled back
    assert rollback([[0.5, 0.5, 0.0]], 0.0, "margin") == 0 and rollback([[0.5, 0.5, 0.0]], 1e-6, "margin") == 1


def test_margin_never_keeps_fewer_drafts_than_nll_at_the_same_threshold():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 6, 50, generator=generator) * 3
    draft_ids = torch.randint(0, 50, (64, 5), generator=generator)
    n_drafted = torch.randint(0, 6, (64,), generator=generator)
    logprobs, target_ids = logits.log_softmax(-1), logits.argmax(-1)
    for threshold in (0.0, 0.5, 1.0, 2.0, 4.0):
        nll, _ = find_rollback(draft_ids, n_drafted, logprobs, target_ids, threshold, "nll")
        margin, _ = find_rollback(draft_ids, n_drafted, logprobs, target_ids, threshold, "margin")
        assert (margin >= nll).all()
        if threshold == 0.0:
            assert margin.tolist() == nll.tolist()  # both keep exactly the large model's own tokens
        elif threshold == 1.0:
            assert (margin > nll).any()


@pytest.mark.parametrize("batch_size", [1, 4])
def test_margin_zero_is_large_greedy(pair, batch_size):
    large, _ = pair
    ids, mask = left_pad(prompts(batch_size))
    expected = large.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=PAD)
    out = large.generate(ids, attention_mask=mask, max_new_tokens=20, pad_token_id=PAD, generation_mode="bild",
                         fallback_threshold=0.5, rollback_threshold=0.0, rollback_rule="margin")  # fmt: skip
    assert out.tolist() == expected.tolist()


@pytest.fixture()
def flat_pair(pair):
    """An untrained large model (every next-token distribution nearly flat over the vocabulary: under the paper's
    rule at threshold 1 almost every draft it would not have chosen is rolled back, under the margin rule almost
    none) with the trained small model."""
    large = qwen(64, 2, seed=5).eval()
    bild.attach(large, pair[1])
    yield large
    bild.detach(large)


def test_margin_keeps_near_ties_of_an_unsure_large_model_and_batch_rows_equal_rows_alone(flat_pair):
    rows = prompts(4)
    ids, mask = left_pad(rows)
    settings = dict(fallback_threshold=0.0, rollback_threshold=1.0, max_draft_tokens=6, max_new_tokens=20,
                    pad_token_id=PAD, generation_mode="bild", return_dict_in_generate=True)  # fmt: skip
    margin = flat_pair.generate(ids, attention_mask=mask, rollback_rule="margin", **settings)
    nll = flat_pair.generate(ids, attention_mask=mask, **settings)
    assert sum(margin.bild_stats.accepted) > 2 * sum(nll.bild_stats.accepted)
    assert sum(margin.bild_stats.rollbacks) < sum(nll.bild_stats.rollbacks)
    for b, row in enumerate(rows):
        alone = flat_pair.generate(row[None], rollback_rule="margin", **settings)
        assert strip(margin.sequences[b, ids.shape[1] :]) == strip(alone.sequences[0, len(row) :])
        assert margin.bild_stats.accepted[b] == alone.bild_stats.accepted[0]


def test_rollback_rule_is_checked_saved_and_loaded(pair, tmp_path):
    large, _ = pair
    with pytest.raises(ValueError, match=r"`rollback_rule` must be one of \['nll', 'margin'\], got 'ratio'"):
        large.generate(prompts(1)[0][None], generation_mode="bild", rollback_rule="ratio", max_new_tokens=2,
                       pad_token_id=PAD)  # fmt: skip
    config = bild.BildGenerationConfig(rollback_threshold=1.0, rollback_rule="margin")
    config.save_pretrained(tmp_path)
    loaded = bild.BildGenerationConfig.from_pretrained(tmp_path)
    assert loaded.rollback_rule == "margin"
    assert bild.BildSettings.from_config(loaded).rollback_rule == "margin"
    assert bild.BildSettings().rollback_rule == "nll"


def test_bench_labels_keys_and_grids_name_the_rule():
    margin = parse_method({"name": "bild", "rollback_threshold": 1, "rollback_rule": "margin"})
    assert margin.label == "bild(0.6, 1, 20+margin)" and margin.params["rollback_rule"] == "margin"
    paper = parse_method({"name": "bild", "rollback_threshold": 1, "rollback_rule": "nll"})
    assert paper.label == "bild(0.6, 1, 20)" and "rollback_rule" not in paper.params  # journals' keys unchanged
    assert parse_rollback_rules(" nll, margin") == ["nll", "margin"]
    with pytest.raises(ValueError, match="--rollback-rule takes rules from nll, margin"):
        parse_rollback_rules("ratio")
    grid = make_grid([0.6], [0.0, 1.0], [20], ["nll", "margin"])
    # rollback 0 is lossless under either rule: once
    assert [(g.get("rollback_rule"), g["rollback_threshold"]) for g in grid] == [(None, 0.0), (None, 1.0), ("margin", 1.0)]
    config = parse_config({"task": "translation", "small": "s", "large": "l"})
    swept = sweep_methods(config, [0.6], [0.0, 1.0], None, rules=["nll", "margin"])
    assert [parse_method(m).label for m in swept if isinstance(m, dict) and m["name"] == "bild"] == ["bild(0.6, 0, 20)", "bild(0.6, 1, 20)", "bild(0.6, 1, 20+margin)"]


def test_fronts_draw_one_bild_curve_per_rule():
    def point(rule: str, rollback: float, speedup: float) -> dict:
        params = {"fallback_threshold": 0.6, "rollback_threshold": rollback, "max_draft_tokens": 20}
        if rule != "nll":
            params["rollback_rule"] = rule
        return {"name": "bild", "params": params, "speedup": speedup, "scores": {"chrf": 40.0}}

    methods = {"large": {"name": "large", "params": {}, "speedup": 1.0, "scores": {"chrf": 40.0}},
               "a": point("nll", 0.0, 1.3), "b": point("nll", 1.0, 1.4), "c": point("margin", 1.0, 1.5)}  # fmt: skip
    curves = front_curves({"task": {"name": "translation", "metric": "chrf"}, "config": {}, "methods": methods})
    assert [c["label"] for c in curves] == ["BiLD rollback sweep: fallback 0.6, N=20",
                                            "BiLD rollback sweep: fallback 0.6, N=20, margin rule"]  # fmt: skip
    assert short_bild_label(methods["c"]) == "(0.6, 1 margin)" and short_bild_label(methods["b"]) == "(0.6, 1)"

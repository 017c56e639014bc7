"""`bild.calibrate` / ``bild calibrate`` on a tiny real pair: budgets, the choice, the refusal, the held-out check."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

import bild
from bild.bench.bench_config import load_config
from bild.bench.calibrate_cli import add_calibrate_parser, parse_draft_caps
from bild.bench.calibration import (
    CONFIRMED,
    NOT_CONFIRMED,
    VIOLATED,
    Budget,
    calibrate,
    check_metric,
    choose,
    grid_points,
    make_grid,
    method_cost,
    metric_difference,
    paired_bootstrap,
    verdict,
)
from bild.bench.tasks import get_task
from bild.bench.tasks.base import Example, chat_prompt
from bild.schedule import DraftCosts

sys.path.insert(0, str(Path(__file__).parent))
from tiny_pair import synthetic_pairs, write_translation_data  # noqa: E402

N_EXAMPLES = 12
PREFIX = "Translate to English: "
MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_translation_data(tmp_path_factory.mktemp("data"), N_EXAMPLES)


def write_config(folder: Path, pair, data_file: Path, **overrides) -> Path:
    config = {
        "task": "translation", "data": str(data_file), "small": str(pair.small), "large": str(pair.large),
        "device": "cpu", "dtype": "float32", "batch_size": 1, "max_new_tokens": MAX_NEW_TOKENS, "chat": True,
        "prefix": PREFIX, "threads": 1, "methods": ["large", {"name": "bild", "max_draft_tokens": 4}],
    }  # fmt: skip
    config.update(overrides)
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


# --- budgets, costs, bootstrap and verdicts on hand-built numbers ----------------------------------------


def test_budget_string_forms_and_mistakes():
    assert Budget.parse("chrf>=-1") == Budget.metric_within("chrf", 1) == Budget("chrf", -1.0)
    assert Budget.parse(" pass@1 >= -0 ") == Budget.metric_within("pass@1", 0) == Budget("pass@1", 0.0)
    assert Budget.parse("agreement>=90%") == Budget.min_agreement(0.9) == Budget("agreement", 0.9)
    for budget in (Budget("chrf", -1.5), Budget("pass@1", 0.0), Budget("agreement", 0.75)):
        assert Budget.parse(str(budget)) == budget
    assert str(Budget.parse("pass@1>=-0")) == "pass@1>=0" and "no worse than large" in Budget("pass@1", 0).describe()
    assert Budget("chrf", -1).is_met(-1.0) and not Budget("chrf", -1).is_met(-1.01)
    assert Budget("pass@1", 0).is_met(0.3 - 0.1 - 0.2)  # float noise below zero is not a loss
    with pytest.raises(ValueError, match=r"write 'chrf>=-1' \(chrf within 1 of large\)"):
        Budget.parse("chrf>=1")
    with pytest.raises(ValueError, match="fraction of examples in"):
        Budget.parse("agreement>=1.5")
    with pytest.raises(ValueError, match="Cannot read the budget 'chrf<=1'"):
        Budget.parse("chrf<=1")
    with pytest.raises(ValueError, match="delta must be a number >= 0"):
        Budget.metric_within("chrf", -1)


def test_budget_metric_must_be_one_the_task_scores():
    task = get_task("translation")
    examples = [Example("a", "Der Hund läuft.", "The dog runs.")]
    check_metric(task, Budget.parse("chrf>=-1"), examples)
    check_metric(task, Budget.parse("agreement>=0.5"), examples)
    with pytest.raises(ValueError, match=r"scores \['bleu', 'chrf'\], not 'rougeL'"):
        check_metric(task, Budget.parse("rougeL>=-1"), examples)


def test_method_cost_prices_forward_counts():
    costs = DraftCosts(small=((1, 0.25), (8, 0.5)), large=((1, 1.0), (11, 2.0)))
    large = {"small_forwards": 0, "large_forwards": 40}
    # 5 rounds of 2 drafts: each large forward reads 1 + 2 tokens per row, at batch 1 -> large_cost(3) = 1.2
    bild_summary = {"small_forwards": 15, "large_forwards": 5, "bild": {"drafted": 10, "large_forwards": 5}}
    assert method_cost(large, costs, 1.0) == pytest.approx(40.0)
    assert method_cost(bild_summary, costs, 1.0) == pytest.approx(15 * 0.25 + 5 * 1.2)
    # 2 rows per call: small_cost(2), large_cost(2 * 3 = 6) = 1.5
    assert method_cost(bild_summary, costs, 2.0) == pytest.approx(15 * (0.25 + 0.25 / 7) + 5 * 1.5)


def test_paired_bootstrap_is_seeded_and_holds_its_point_estimate():
    values = np.array([0.3, 1.7, -0.4, 2.2, 0.9, -1.1, 0.5, 1.3, 0.1, 0.5])  # mean 0.6

    def mean(idx):
        return float(values[idx].mean())

    point, low, high = paired_bootstrap(mean, len(values), confidence=0.9, n_bootstrap=500, seed=3)
    assert point == pytest.approx(0.6) and low < point < high
    assert paired_bootstrap(mean, len(values), confidence=0.9, n_bootstrap=500, seed=3) == (point, low, high)
    assert paired_bootstrap(mean, len(values), confidence=0.9, n_bootstrap=500, seed=4) != (point, low, high)
    wider = paired_bootstrap(mean, len(values), confidence=0.99, n_bootstrap=500, seed=3)
    assert wider[1] <= low and wider[2] >= high

    # corpus chrF, rescored per resample: one of five sentences worse than large's
    task = get_task("translation")
    pairs = synthetic_pairs(5, seed=1)
    examples = [Example(str(i), de, en) for i, (de, en) in enumerate(pairs)]
    large = [en for _, en in pairs]
    ours = [*large[:4], "Something else entirely."]
    statistic = metric_difference(task, "chrf", examples, ours, large, sign=1.0)
    point, low, high = paired_bootstrap(statistic, 5, confidence=0.9, n_bootstrap=200, seed=0)
    full = task.score(ours, examples)["chrf"] - task.score(large, examples)["chrf"]
    assert point == pytest.approx(full) and point < 0 and low <= point <= high
    assert high == pytest.approx(0.0, abs=1e-9)  # resamples without the bad sentence lose nothing


def test_verdict_claims_only_what_the_interval_supports():
    budget = Budget.parse("chrf>=-1")
    assert verdict(budget, point=-0.2, low=-0.9) == CONFIRMED
    assert verdict(budget, point=-0.2, low=-1.5) == NOT_CONFIRMED
    assert verdict(budget, point=-1.2, low=-3.0) == VIOLATED
    assert verdict(Budget.parse("pass@1>=0"), point=0.0, low=0.0) == CONFIRMED
    assert verdict(Budget.parse("agreement>=0.9"), point=0.95, low=0.85) == NOT_CONFIRMED


def test_grid_and_draft_caps_parse():
    grid = make_grid([0.5, 0.9], [0.0, math.inf], [4, "auto"])
    assert len(grid) == 8
    assert grid[1] == {"fallback_threshold": 0.5, "rollback_threshold": 0.0, "max_draft_tokens": "auto"}
    assert parse_draft_caps("4, 10,auto") == [4, 10, "auto"]
    with pytest.raises(ValueError, match="--max-draft-tokens"):
        parse_draft_caps("4,0")


# --- calibration end to end on the tiny pair ------------------------------------------------------------


def independent_speedups(results: dict, costs: DraftCosts) -> dict[str, float]:
    """The module docstring's formula, written out again from the bench results (batch size 1: one row)."""

    def cost(summary):
        stats = summary.get("bild")
        per_round = stats["drafted"] / stats["large_forwards"] if stats else 0.0
        small = summary["small_forwards"] * costs.small_cost(1)
        return small + summary["large_forwards"] * costs.large_cost(1 + per_round)

    return {label: cost(results["methods"]["large"]) / cost(s) for label, s in results["methods"].items()}


def calibration_low(search: dict, data_file: Path, label: str) -> float:
    """The lower end of the 90% paired bootstrap interval of chrF - large over the search run's examples."""
    rows = [json.loads(line) for line in data_file.read_text(encoding="utf-8").splitlines()]
    by_id = {row["id"]: Example(row["id"], row["source"], row["reference"]) for row in rows}
    examples = [by_id[row["id"]] for row in search["examples"]]
    ours = [row["outputs"][label]["prediction"] for row in search["examples"]]
    large = [row["outputs"]["large"]["prediction"] for row in search["examples"]]
    statistic = metric_difference(get_task("translation"), "chrf", examples, ours, large, sign=1.0)
    return paired_bootstrap(statistic, len(examples), confidence=0.9, n_bootstrap=1000, seed=0)[1]


def test_the_choice_needs_the_whole_interval_within_budget():
    """The faster setting matches large on 9 of 10 examples (0.9 >= 0.8) but its interval reaches below 0.8:
    the slower one, equal to large everywhere, is chosen."""
    matches = {"fast": [1] * 9 + [0], "exact": [1] * 10}
    speed = {"large": 1.0, "fast": 2.0, "exact": 1.5}
    methods = {label: {"name": "large" if label == "large" else "bild", "params": {"rollback_threshold": 1.0},
                       "quality": 0.0, "exact_match_large": sum(matches.get(label, [1] * 10)) / 10,
                       "speedup": speed[label]} for label in speed}  # fmt: skip
    examples = [{"outputs": {label: {"exact_match_large": bool(m[i])} for label, m in matches.items()}}
                for i in range(10)]  # fmt: skip
    results = {"methods": methods, "examples": examples, "task": {"higher_is_better": True}}
    budget = Budget.parse("agreement>=0.8")
    points = grid_points(results, get_task("translation"), [None] * 10, budget, None, confidence=0.9,
                         n_bootstrap=1000, seed=0)  # fmt: skip
    fast, exact = points
    assert fast.statistic == pytest.approx(0.9) and budget.is_met(fast.statistic)
    assert fast.low < 0.8 and not fast.is_within_budget
    assert exact.low == exact.statistic == 1.0 and exact.is_within_budget
    assert choose(points, budget, 10) is exact


def test_a_setting_that_changes_answers_needs_more_than_six_unchanged_scores():
    """pass@1 on 6 problems: "changed" rewrites 4 answers (all still pass), "same" changes none. Without the
    pessimistic pseudo-example both intervals would be [0, 0]; with it only the unchanged setting is safe."""
    example = Example("f", "def f():\n", "    return 1\n",
                      {"test": "def check(candidate):\n    assert candidate() == 1\n", "entry_point": "f"})
    answers = {"large": ["    return 1\n"] * 6, "same": ["    return 1\n"] * 6,
               "changed": ["    return 1\n"] * 2 + ["    return 2 - 1\n"] * 4}  # fmt: skip
    methods = {label: {"name": "large" if label == "large" else "bild", "params": {}, "quality": 1.0,
                       "exact_match_large": 1.0, "speedup": 1.0} for label in answers}  # fmt: skip
    examples = [{"outputs": {label: {"prediction": preds[i], "exact_match_large": preds[i] == answers["large"][i]}
                             for label, preds in answers.items()}} for i in range(6)]  # fmt: skip
    results = {"methods": methods, "examples": examples, "task": {"higher_is_better": True}}
    budget = Budget.parse("pass@1>=0")
    same, changed = grid_points(results, get_task("code"), [example] * 6, budget, None, confidence=0.9,
                                n_bootstrap=1000, seed=0)  # fmt: skip
    assert same.statistic == changed.statistic == 0.0
    assert same.low == 0.0 and same.is_within_budget
    assert changed.low < 0 and not changed.is_within_budget


def test_calibrate_picks_the_fastest_setting_within_budget(tiny_pair, data_file, tmp_path):
    config = load_config(write_config(tmp_path, tiny_pair, data_file, skip=1))
    grid = make_grid([0.2, 0.6], [0.0, math.inf], [4])
    out = tmp_path / "out"
    result = calibrate(config, "chrf>=-1", grid=grid, calibration=6, held_out=4, out_dir=out, progress=False)

    saved = json.loads((out / "calibration.json").read_text(encoding="utf-8"))
    search = json.loads((out / "search" / "results.json").read_text(encoding="utf-8"))
    costs = DraftCosts.load(saved["draft_costs"])
    speed = independent_speedups(search, costs)
    chrf = {label: s["scores"]["chrf"] for label, s in search["methods"].items()}
    settings = [label for label in search["methods"] if label != "large"]
    low = {label: calibration_low(search, data_file, label) for label in settings}
    within = [label for label in settings if low[label] >= -1]
    expected = max(within, key=lambda label: (speed[label], low[label]))
    assert result.chosen.label == saved["choice"]["label"] == expected
    assert sorted(p.label for p in result.grid if p.is_within_budget) == sorted(within)
    assert [p.speedup for p in result.grid] == pytest.approx([speed[label] for label in settings])
    assert [p.statistic for p in result.grid] == pytest.approx([chrf[label] - chrf["large"] for label in settings])
    # the budget mattered: the fastest setting overall (the small model unchecked) is outside it
    fastest = max(settings, key=speed.get)
    assert fastest not in within and speed[fastest] > speed[expected]

    # slices: calibration = examples 1..6, held-out = 7..10, disjoint and in order
    held = json.loads((out / "held-out" / "results.json").read_text(encoding="utf-8"))
    assert saved["calibration_ids"] == [row["id"] for row in search["examples"]] == [f"ex{i}" for i in range(1, 7)]
    assert saved["held_out_ids"] == [row["id"] for row in held["examples"]] == [f"ex{i}" for i in range(7, 11)]
    assert list(held["methods"]) == ["large", expected]

    check = result.held_out
    assert (check.first, check.n_examples) == (7, 4) and check.low <= check.statistic <= check.high
    held_chrf = {label: s["scores"]["chrf"] for label, s in held["methods"].items()}
    assert check.statistic == pytest.approx(held_chrf[expected] - held_chrf["large"])
    assert check.verdict == verdict(result.budget, check.statistic, check.low) == saved["held_out"]["verdict"]
    assert (out / "pareto.png").read_bytes().startswith(b"\x89PNG") and expected in (out / "calibration.md").read_text()
    assert bild.BildGenerationConfig.from_pretrained(out).fallback_threshold == result.chosen.params["fallback_threshold"]


def test_calibrate_refuses_when_no_setting_meets_the_budget(tiny_pair, data_file, tmp_path):
    """Only the small model's own output (never fall back, never roll back) against "equal to large everywhere"."""
    config = load_config(write_config(tmp_path, tiny_pair, data_file))
    grid = make_grid([0.0], [math.inf], [32])
    message = (r"No grid setting meets the budget agreement>=1 .* reached agreement 0\.\d+ \(interval down to 0\.\d+\)\. "
               r"Use more calibration examples .* loosen the budget \(e\.g\. 'agreement>=0\.\d+'\) .*rollback_threshold=0")
    with pytest.raises(ValueError, match=message):
        calibrate(config, "agreement>=1", grid=grid, calibration=6, held_out=2, out_dir=tmp_path / "out",
                  progress=False)  # fmt: skip
    assert not (tmp_path / "out" / "generation_config.json").exists()


def test_cli_writes_a_config_that_loads_and_decodes(tiny_pair, data_file, tmp_path, capsys):
    """Lossless settings only: confirmed on the held-out slice; the saved config decodes as large greedy."""
    parser = argparse.ArgumentParser(prog="bild")
    add_calibrate_parser(parser.add_subparsers(dest="verb"))
    out = tmp_path / "out"
    args = parser.parse_args(["calibrate", "--config", str(write_config(tmp_path, tiny_pair, data_file)), "--budget",
                              "agreement>=1", "--calibration", "3", "--held-out", "3", "--fallback", "0.4,0.8",
                              "--rollback", "0", "--out", str(out), "--quiet"])  # fmt: skip
    assert args.run(args) == 0
    printed = capsys.readouterr().out
    assert "confirmed" in printed and "not confirmed" not in printed and "generation_config.json" in printed

    loaded = bild.BildGenerationConfig.from_pretrained(out)
    assert loaded.rollback_threshold == 0.0 and loaded.max_draft_tokens == 4
    assert loaded.fallback_threshold in (0.4, 0.8)
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair.large, padding_side="left")
    large = AutoModelForCausalLM.from_pretrained(tiny_pair.large, dtype=torch.float32).eval()
    small = AutoModelForCausalLM.from_pretrained(tiny_pair.small, dtype=torch.float32).eval()
    bild.attach(large, small)
    texts = [chat_prompt(tokenizer, PREFIX + de) for de, _ in synthetic_pairs(N_EXAMPLES, seed=7)[6:9]]
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        ours = large.generate(**inputs, generation_config=loaded, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        greedy = large.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    assert torch.equal(ours, greedy)


def test_calibrate_drafts_with_a_named_drafter(tiny_pair, data_file, tmp_path):
    """Every setting and the held-out check draft with the config's int8 drafter, priced by the given costs."""
    config = load_config(write_config(tmp_path, tiny_pair, data_file, drafters={"int8": {"quantization": "int8"}}))
    grid = make_grid([0.4], [0.0, math.inf], [4])
    options = {"grid": grid, "calibration": 3, "held_out": 2, "out_dir": tmp_path / "out", "progress": False}
    with pytest.raises(ValueError, match=r"drafter 'int4' is not one of the config's drafters \(\['int8'\]\)"):
        calibrate(config, "agreement>=0.5", drafter="int4", **options)
    with pytest.raises(ValueError, match="--draft-costs costs.json"):
        calibrate(config, "agreement>=0.5", drafter="int8", **options)
    costs = DraftCosts(small=((1, 0.2), (8, 0.4)), large=((1, 1.0), (8, 1.5)))
    result = calibrate(config, "agreement>=0.5", drafter="int8", draft_costs=costs, **options)
    search = json.loads((tmp_path / "out" / "search" / "results.json").read_text(encoding="utf-8"))
    assert [p.label for p in result.grid] == ["bild(0.4, 0, 4) [int8]", "bild(0.4, inf, 4) [int8]"]
    assert search["config"]["drafters"] == {"int8": {"quantization": "int8"}}
    held = json.loads((tmp_path / "out" / "held-out" / "results.json").read_text(encoding="utf-8"))
    assert list(held["methods"]) == ["large", result.chosen.label]

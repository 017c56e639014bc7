"""The ``bild`` command line end to end on a tiny real model pair: bench, sweep, generate, config errors."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from bild.bench import cli
from bild.bench.bench_config import load_config, parse_config, parse_float_list, parse_methods
from bild.bench.loading import ModelPair
from bild.bench.methods import measure_costs_first
from bild.bench.metrics import prefix_agreement
from bild.bench.plot import pareto_front
from bild.bench.report import json_safe
from bild.kernels import fp16_available

sys.path.insert(0, str(Path(__file__).parent))
from tiny_pair import build_tiny_seq2seq_pair, synthetic_pairs  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SUMMARY_KEYS = {
    "name", "params", "n_examples", "wall_s", "s_per_example", "n_tokens", "tokens_per_s", "speedup", "large_forwards",
    "small_forwards", "large_forwards_per_token", "small_forwards_per_token", "quality", "scores",
    "exact_match_large", "prefix_agreement_large",
}  # fmt: skip


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "de-en.jsonl"
    rows = [
        {"id": f"ex{i}", "source": de, "reference": en}
        for i, (de, en) in enumerate(synthetic_pairs(3, seed=7))
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_config(folder: Path, pair, data_file: Path, **overrides) -> Path:
    config = {
        "task": "translation", "data": str(data_file), "small": str(pair.small), "large": str(pair.large),
        "device": "cpu", "dtype": "float32", "batch_size": 1, "max_new_tokens": 16, "chat": True,
        "prefix": "Translate to English: ", "limit": 2, "threads": 1,
        "methods": [
            "large", "small", {"name": "assisted", "num_assistant_tokens": 4},
            {"name": "bild", "fallback_threshold": 0.5, "rollback_threshold": 2.0, "max_draft_tokens": 4},
            {"name": "bild", "fallback_threshold": 0.5, "rollback_threshold": 0.0, "label": "bild-lossless"},
            {"name": "bild", "fallback_threshold": 0.0, "rollback_threshold": "inf", "max_draft_tokens": 32,
             "label": "bild-as-small"},
        ],
    }  # fmt: skip
    config.update(overrides)
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_bench_end_to_end(tiny_pair, data_file, tmp_path, capsys):
    config = write_config(tmp_path, tiny_pair, data_file)
    out = tmp_path / "out"
    assert cli.main(["bench", "--config", str(config), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "| method | bleu [95% CI] | chrf [95% CI] | speedup |" in printed and "bild-lossless" in printed

    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert {"config", "environment", "task", "n_examples", "notes", "methods", "examples"} <= set(results)
    assert results["n_examples"] == 2 and len(results["examples"]) == 2
    assert results["environment"]["torch"] and results["environment"]["cpu_count"] >= 1
    assert results["config"]["methods"][-1]["rollback_threshold"] == "inf"  # strict JSON, no Infinity
    methods = results["methods"]
    assert list(methods) == [
        "large",
        "small",
        "assisted(n=4)",
        "bild(0.5, 2, 4)",
        "bild-lossless",
        "bild-as-small",
    ]
    for label, summary in methods.items():
        assert SUMMARY_KEYS <= set(summary), label
        assert summary["wall_s"] > 0 and summary["n_tokens"] > 0 and summary["tokens_per_s"] > 0
        assert summary["speedup"] > 0 and 0 <= summary["quality"] <= 100 + 1e-9
    assert methods["large"]["large_forwards"] > 0 and methods["large"]["small_forwards"] == 0
    assert methods["large"]["speedup"] == 1.0 and methods["large"]["exact_match_large"] == 1.0
    assert methods["small"]["small_forwards"] > 0 and methods["small"]["large_forwards"] == 0
    assert methods["assisted(n=4)"]["large_forwards"] > 0 and methods["assisted(n=4)"]["small_forwards"] > 0
    for label in ("bild(0.5, 2, 4)", "bild-lossless", "bild-as-small"):
        summary = methods[label]
        assert summary["large_forwards"] > 0 and summary["small_forwards"] > 0
        # the hooks count exactly the forwards BiLD reports, batch size 1
        assert summary["large_forwards"] == summary["bild"]["large_forwards"]
        assert summary["small_forwards"] == summary["bild"]["small_forwards"]
        for rate in ("fallback_rate", "rollback_rate", "acceptance_rate"):
            assert 0.0 <= summary["bild"][rate] <= 1.0
    # where the time goes: the large model alone spends nothing in the drafter, BiLD in both; the three parts
    # add up to the wall time per token
    assert methods["large"]["small_ms_per_token"] == 0 and methods["large"]["large_ms_per_token"] > 0
    for label, summary in methods.items():
        parts = summary["small_ms_per_token"] + summary["large_ms_per_token"] + summary["rest_ms_per_token"]
        assert parts == pytest.approx(1000 * summary["wall_s"] / summary["n_tokens"]), label
        assert summary["rest_ms_per_token"] >= 0, label
    assert methods["bild-lossless"]["small_ms_per_token"] > 0 and methods["bild-lossless"]["large_ms_per_token"] > 0
    # oracles: rollback 0 is the large model's greedy output; never falling back nor rolling back is the small's
    assert methods["bild-lossless"]["exact_match_large"] == 1.0
    assert methods["assisted(n=4)"]["exact_match_large"] == 1.0
    for example in results["examples"]:
        outputs = example["outputs"]
        assert outputs["bild-as-small"]["text"] == outputs["small"]["text"]
        assert outputs["bild-lossless"]["text"] == outputs["large"]["text"]
        assert outputs["large"]["n_tokens"] <= 16 and set(outputs["bild(0.5, 2, 4)"]["bild_stats"]) >= {
            "rollbacks"
        }

    report = (out / "results.md").read_text(encoding="utf-8")
    assert "| method | bleu [95% CI] |" in report and "bild-as-small" in report and "Columns:" in report
    assert "| S ms/tok | L ms/tok | rest ms/tok |" in report
    # the machine a table comes from: CPU flags, torch's kernels, and each model's linear-layer path
    env = results["environment"]
    assert env["cpu_capability"] and set(env["kernels"]) == {"large", "small"}
    assert set(env["kernels"].values()) <= {"stock", "onednn"} and "torch kernels" in report and "linear layers" in report


def test_stock_kernels_leave_the_models_as_loaded(tiny_pair, data_file, tmp_path):
    config = write_config(tmp_path, tiny_pair, data_file, kernels="stock", methods=["large"], limit=1)
    assert cli.main(["bench", "--config", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8"))
    assert results["environment"]["kernels"] == {"large": "stock", "small": "stock"}
    assert results["config"]["kernels"] == "stock"


@pytest.mark.skipif(not fp16_available(), reason="this torch has no fbgemm fp16 GEMM (x86 CPUs only)")
def test_fp16_kernels_are_recorded_and_a_bfloat16_run_says_what_to_change(tiny_pair, data_file, tmp_path, capsys):
    config = write_config(tmp_path, tiny_pair, data_file, kernels="fp16", methods=["large", "bild"], limit=1)
    assert cli.main(["bench", "--config", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8"))
    assert results["environment"]["kernels"] == {"large": "fp16", "small": "fp16"}
    assert cli.main(["bench", "--config", str(config), "--dtype", "bfloat16", "--out", str(tmp_path / "bf16")]) == 2
    assert "load it with dtype=torch.float32" in capsys.readouterr().err


def test_stop_strings_end_every_method(tiny_pair, data_file, tmp_path):
    """A stop string ends large, assisted and BiLD alike; batched rows that stop early lose their padding."""
    methods = ["large", {"name": "assisted", "num_assistant_tokens": 4},
               {"name": "bild", "fallback_threshold": 0.5, "rollback_threshold": 0.0, "label": "bild-lossless"}]  # fmt: skip
    config = write_config(tmp_path, tiny_pair, data_file, batch_size=2, stop_strings=[" "], methods=methods)
    out = tmp_path / "out"
    assert cli.main(["bench", "--config", str(config), "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["config"]["stop_strings"] == [" "]
    for example in results["examples"]:
        outputs = example["outputs"]
        texts = {label: outputs[label]["text"] for label in ("large", "assisted(n=4)", "bild-lossless")}
        assert len(set(texts.values())) == 1, texts
        assert outputs["large"]["n_tokens"] < 16 and texts["large"].strip().count(" ") <= 1, texts


def test_sweep_writes_pareto_png(tiny_pair, data_file, tmp_path, capsys):
    config = write_config(tmp_path, tiny_pair, data_file, batch_size=2)
    out = tmp_path / "sweep"
    argv = ["sweep", "--config", str(config), "--out", str(out), "--fallback", "0.4,0.9", "--rollback", "1,inf",
            "--max-new-tokens", "8", "--quiet"]  # fmt: skip
    assert cli.main(argv) == 0
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert list(results["methods"]) == [
        "large", "small", "assisted(n=4)", "bild(0.4, 1, 4)", "bild(0.4, inf, 4)", "bild(0.9, 1, 4)",
        "bild(0.9, inf, 4)",
    ]  # fmt: skip
    assert results["config"]["max_new_tokens"] == 8 and results["config"]["batch_size"] == 2
    assert any("row by row" in note for note in results["notes"])  # batch 2: stock assisted runs rows alone
    png = (out / "pareto.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5_000
    assert "pareto.png" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_encoder_decoder_pair(tmp_path_factory, data_file, tmp_path):
    pair = build_tiny_seq2seq_pair(tmp_path_factory.mktemp("tiny-t5"), steps=100)
    config = write_config(tmp_path, pair, data_file, chat=False, prefix=None,
                          methods=["large", "small", "assisted", {"name": "bild", "rollback_threshold": 0.0}])  # fmt: skip
    assert cli.main(["bench", "--config", str(config), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8"))
    assert results["examples"][0]["prompt"].startswith("translate German to English: ")
    bild_summary = results["methods"]["bild(0.6, 0, 20)"]
    assert bild_summary["exact_match_large"] == 1.0
    assert bild_summary["large_forwards"] == bild_summary["bild"]["large_forwards"]  # encoder runs not counted


def test_generate_prints_output_and_stats(tiny_pair, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Translate to English: Der Hund schläft.\n\n", encoding="utf-8")
    argv = ["generate", "--small", str(tiny_pair.small), "--large", str(tiny_pair.large), "--prompts-file",
            str(prompts), "--prompt", "Translate to English: Die Katze isst.", "--chat", "--max-new-tokens", "12",
            "--rollback-threshold", "inf", "--device", "cpu", "--threads", "1"]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "rollback inf" in printed and printed.count("--- prompt") == 2
    assert printed.count("large_forwards") == 2 and "fallbacks" in printed


def test_generate_without_prompts_is_a_clear_error(capsys):
    assert cli.main(["generate", "--small", "s", "--large", "l"]) == 2
    assert "--prompt" in capsys.readouterr().err


@pytest.mark.parametrize("verb", ["generate", "bench", "sweep"])
def test_help_works_for_every_verb(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([verb, "--help"])
    assert exit_info.value.code == 0
    assert "usage: bild " + verb in capsys.readouterr().out


def test_top_level_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    printed = capsys.readouterr().out
    assert all(verb in printed for verb in ("generate", "bench", "sweep"))


BASE = {"task": "translation", "small": "s", "large": "l"}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"batchsize": 2}, "unknown key(s) ['batchsize']"),
        ({"device": "tpu"}, "`device` must be one of ['auto', 'cpu', 'cuda']"),
        ({"dtype": "fp8"}, "`dtype` must be one of ['auto', 'float32', 'bfloat16', 'float16']"),
        ({"kernels": "mkl"}, "`kernels` must be one of ['fit', 'stock', 'fp16']"),
        ({"batch_size": 0}, "`batch_size` must be a positive integer"),
        ({"max_new_tokens": "64"}, "`max_new_tokens` must be a positive integer"),
        ({"chat": "yes"}, "`chat` must be true or false"),
        ({"large": None}, "`large` is required"),
        ({"methods": []}, "`methods` must be a non-empty list"),
        ({"methods": ["beam"]}, "unknown method 'beam' in `methods`; allowed names: ['large', 'small', 'assisted', 'bild']"),
        ({"methods": [{"name": "bild", "fallback": 0.5}]}, "unknown key(s) ['fallback'] for method 'bild'"),
        ({"methods": [{"name": "bild", "fallback_threshold": 1.5}]}, "bild method: `fallback_threshold` must be a probability in [0, 1]"),
        ({"methods": [{"name": "bild", "rollback_threshold": -1}]}, "bild method: `rollback_threshold` must be >= 0"),
        ({"methods": [{"name": "bild", "max_draft_tokens": 0}]}, "bild method: `max_draft_tokens` must be an integer >= 1"),
        ({"methods": [{"name": "assisted", "num_assistant_tokens_schedule": "fast"}]}, "`num_assistant_tokens_schedule` must be one of"),
        ({"methods": ["large", "large"]}, "methods ['large'] appear twice"),
        ({"stop_strings": ["", "x"]}, "`stop_strings` must be a list of non-empty strings"),
    ],
)  # fmt: skip
def test_config_validation_names_the_bad_key(changes, message):
    with pytest.raises(ValueError) as error:
        parse_config({**BASE, **changes}, source="my.yaml")
    assert message in str(error.value) and str(error.value).startswith("my.yaml: ")


def test_config_defaults_and_overrides():
    config = parse_config({**BASE, "methods": ["large", {"name": "bild", "rollback_threshold": ".inf"}]})
    assert config.methods[1].params == {
        "fallback_threshold": 0.6,
        "rollback_threshold": math.inf,
        "max_draft_tokens": 20,
        "verify_fallback_token": False,
        "draft_costs": None,
        "fallback_candidates": "auto",
    }
    assert config.methods[1].label == "bild(0.6, inf, 20)"
    changed = config.replace(batch_size=4, limit=None, device="cuda:1")
    assert (changed.batch_size, changed.limit, changed.device, changed.methods) == (
        4,
        None,
        "cuda:1",
        config.methods,
    )
    with pytest.raises(ValueError, match="command line: `batch_size`"):
        config.replace(batch_size=-1)


def test_bad_config_file_is_reported_by_the_cli(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**BASE, "methods": ["greedy"]}), encoding="utf-8")
    assert cli.main(["bench", "--config", str(path)]) == 2
    assert "unknown method 'greedy'" in capsys.readouterr().err
    assert cli.main(["bench", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_shipped_configs_are_valid():

    paths = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))
    assert len(paths) >= 14
    for path in paths:
        names = {spec.name for spec in load_config(path).methods}
        # the task configs compare every method; the drafter studies (-aligned, -exit) and the rollback study large
        # and BiLD only; the main job and the studies in folders large, stock assisted and BiLD
        if path.stem.endswith(("-aligned", "-exit")) or path.parent.name == "rollback":
            assert names == {"large", "bild"}, path
        elif path.stem == "qwen-coder-main" or path.parent.name in ("variants", "defaults", "drafter", "compiled", "context", "costs", "verifier", "avx2", "fp16"):
            assert names == {"large", "assisted", "bild"}, path
        else:
            assert names == {"large", "small", "assisted", "bild"}, path


def test_float_lists_and_inf():
    assert parse_float_list("0.3, 0.5,inf", "--rollback") == [0.3, 0.5, math.inf]
    with pytest.raises(ValueError, match="--fallback"):
        parse_float_list("0.3,high", "--fallback")
    assert json_safe({"a": [math.inf, 1.0], "b": (float("nan"),)}) == {"a": ["inf", 1.0], "b": ["nan"]}


def test_prefix_agreement():
    assert prefix_agreement([1, 2, 3], [1, 2, 3]) == 1.0
    assert prefix_agreement([1, 2, 9, 9], [1, 2, 3]) == 0.5
    assert prefix_agreement([1, 2], [1, 2, 3, 4]) == 0.5
    assert prefix_agreement([], []) == 1.0 and prefix_agreement([5], []) == 0.0


def test_pareto_front():
    points = [(1.0, 30.0), (1.5, 29.0), (1.2, 28.0), (2.0, 20.0), (0.8, 31.0), (1.5, 29.0)]
    assert pareto_front(points) == [4, 0, 1, 5, 3]  # (1.2, 28) is beaten by (1.5, 29); ties both stay
    assert pareto_front([(1.0, 5.0), (2.0, 6.0)], higher_is_better=False) == [0, 1]


def test_named_drafters_run_next_to_the_small_model(tiny_pair, data_file, tmp_path):
    """A compressed copy of the small model and an early exit of the large one, each given to assisted and BiLD."""
    drafters = {"q8": {"quantization": "int8", "lean": False}, "exit1": {"early_exit": 1}}
    methods = ["large", {"name": "small", "drafter": "q8"}, {"name": "assisted", "num_assistant_tokens": 4, "drafter": "q8"},
               {"name": "bild", "rollback_threshold": 0.0, "drafter": "q8"},
               {"name": "bild", "rollback_threshold": 0.0, "max_draft_tokens": "auto", "drafter": "exit1"}]  # fmt: skip
    config = write_config(tmp_path, tiny_pair, data_file, drafters=drafters, methods=methods)
    out = tmp_path / "out"
    assert cli.main(["bench", "--config", str(config), "--out", str(out), "--quiet"]) == 0
    methods = json.loads((out / "results.json").read_text(encoding="utf-8"))["methods"]
    assert list(methods) == ["large", "small [q8]", "assisted(n=4) [q8]", "bild(0.6, 0, 20) [q8]", "bild(0.6, 0, auto) [exit1]"]
    for label in ("assisted(n=4) [q8]", "bild(0.6, 0, 20) [q8]", "bild(0.6, 0, auto) [exit1]"):
        assert methods[label]["exact_match_large"] == 1.0, label  # lossless whatever the drafter
    exit_summary = methods["bild(0.6, 0, auto) [exit1]"]
    assert exit_summary["large_forwards"] == exit_summary["bild"]["large_forwards"]  # a shared head, counted apart
    assert exit_summary["small_forwards"] == exit_summary["bild"]["small_forwards"]


def test_drafters_must_be_defined_and_valid():
    with pytest.raises(ValueError, match=r"drafter\(s\) \['q8'\] that `drafters` does not define"):
        parse_config({**BASE, "methods": [{"name": "bild", "drafter": "q8"}]})
    with pytest.raises(ValueError, match="`quantization` must be one of"):
        parse_config({**BASE, "drafters": {"q": {"quantization": "int3"}}})
    with pytest.raises(ValueError, match="drop `model`"):
        parse_config({**BASE, "drafters": {"q": {"early_exit": 2, "model": "x"}}})
    with pytest.raises(ValueError, match="group_size"):
        parse_config({**BASE, "drafters": {"q": {"quantization": "int4", "group_size": 0}}})
    with pytest.raises(ValueError, match="vocab_size"):
        parse_config({**BASE, "drafters": {"q": {"quantization": "int4", "vocab_size": "all"}}})
    with pytest.raises(ValueError, match="`compile` must be true or false"):
        parse_config({**BASE, "drafters": {"q": {"quantization": "int4", "compile": "yes"}}})
    with pytest.raises(ValueError, match="drop `lean: false`"):
        parse_config({**BASE, "drafters": {"q": {"compile": True, "lean": False}}})
    ok = {"a": {"quantization": "int4", "vocab_size": "auto", "group_size": 128}, "b": {"quantization": "int4", "vocab_size": None},
          "c": {"quantization": "int4", "compile": True}, "d": {"lean": False}}  # fmt: skip
    assert parse_config({**BASE, "drafters": ok}).drafters == ok


def test_variants_plot_writes_a_png(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    import plot_variants

    def methods(speedups):
        return {
            label: {"name": label.split("(")[0], "speedup": s, "large_forwards_per_token": 1 / (s * 1.5)}
            for label, s in speedups.items()
        }

    results = [
        {"task": {"name": "code"}, "environment": {"dtype": "bfloat16"}, "methods": methods({"large": 1.0, "bild(0.5, 0, 20)": 2.5})},
        {"task": {"name": "translation"}, "environment": {"dtype": "float32"}, "methods": methods({"large": 1.0, "assisted": 1.2})},
    ]  # fmt: skip
    paths = []
    for i, result in enumerate(results):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(result))
    plot_variants.main([*map(str, paths), "--out", str(tmp_path / "v.png")])
    assert (tmp_path / "v.png").read_bytes()[:8] == PNG_MAGIC and "wrote" in capsys.readouterr().out


def test_bild_methods_that_price_their_choices_measure_costs_before_the_timed_calls(causal_pair, tmp_path,
                                                                                    monkeypatch):  # fmt: skip
    """The pair's costs are measured on first use, which a timed call must never be: the warm-up does it."""
    monkeypatch.setenv("BILD_HOME", str(tmp_path))
    large, small = causal_pair
    pair = ModelPair(large, small, tokenizer=None, eos_token_ids=[1], pad_token_id=0)
    fixed = parse_methods([{"name": "bild", "fallback_candidates": 3, "max_draft_tokens": 4}], "test")[0]
    measure_costs_first(fixed, pair)
    assert not list(tmp_path.glob("fit/costs-*.json"))
    auto = parse_methods([{"name": "bild"}], "test")[0]  # fallback_candidates="auto" by default
    measure_costs_first(auto, pair)
    assert len(list(tmp_path.glob("fit/costs-*.json"))) == 1

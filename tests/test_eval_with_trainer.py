"""scripts/eval_with_trainer.py on a tiny real pair: Seq2SeqTrainer predictions equal direct generate()."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from tiny_pair import synthetic_pairs
from transformers import AutoModelForCausalLM, AutoTokenizer

from bild.bench.tasks import get_task

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "eval_with_trainer.py"
PREFIX = "Translate to English: "


def load_script():
    spec = importlib.util.spec_from_file_location("eval_with_trainer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["eval_with_trainer"] = module
    spec.loader.exec_module(module)
    return module


eval_with_trainer = load_script()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "de-en.jsonl"
    rows = [{"id": f"ex{i}", "source": de, "reference": en} for i, (de, en) in enumerate(synthetic_pairs(5, seed=3))]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_trainer_evaluation_is_lossless_at_rollback_zero(tiny_pair, data_file, tmp_path):
    argv = [
        "--task", "translation", "--data", str(data_file), "--small", str(tiny_pair.small), "--large",
        str(tiny_pair.large), "--limit", "5", "--batch-size", "2", "--max-new-tokens", "16", "--prefix", PREFIX,
        "--rollback", "0", "--fallback", "0.5", "--out", str(tmp_path),
    ]  # fmt: skip
    metrics = eval_with_trainer.main(argv)

    assert {"bleu", "chrf", "bild_large_forwards_per_token", "bild_fallback_rate", "bild_rollback_rate"} <= set(metrics)
    assert metrics["examples"] == 5 and 0 < metrics["bild_large_forwards_per_token"] <= 1
    assert json.loads((tmp_path / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    predicted = [json.loads(line)["prediction"] for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]

    # the oracle: each prompt decoded alone by the large model, greedy
    task = get_task("translation")
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair.large)
    large = AutoModelForCausalLM.from_pretrained(tiny_pair.large)
    expected = []
    for example in task.load(str(data_file)):
        text = task.prompt(example, tokenizer, chat=True, prefix=PREFIX)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        out = large.generate(**ids, max_new_tokens=16, do_sample=False)[0, ids["input_ids"].shape[1] :]
        expected.append(task.postprocess(tokenizer.decode(out, skip_special_tokens=True), example))
    assert predicted == expected


def test_new_tokens_strips_padding_and_prompt():
    pad = 9
    assert eval_with_trainer.new_tokens([9, 9, 5, 6, 7, 8, 9, -100, -100], [5, 6], pad) == [7, 8, 9]
    with pytest.raises(ValueError, match="start with its prompt"):
        eval_with_trainer.new_tokens([9, 5, 7, 8], [5, 6], pad)


def test_bad_task_is_a_clear_error(tiny_pair):
    with pytest.raises(ValueError, match="Unknown task"):
        eval_with_trainer.main(["--task", "poetry", "--large", str(tiny_pair.large), "--small", str(tiny_pair.small)])


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        eval_with_trainer.parse_args(["--help"])
    assert exit_info.value.code == 0
    assert "Seq2SeqTrainer" in capsys.readouterr().out


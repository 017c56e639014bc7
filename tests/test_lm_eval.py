"""BiLD under EleutherAI's lm-evaluation-harness: its stop-sequence criterion, and a whole generate_until task."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CHAIN, PAD, SMALL_CHAIN, left_pad, prompts
from tiny_pair import synthetic_pairs
from transformers import AutoModelForCausalLM, AutoTokenizer

import bild
from bild.compat import records_recurrent_states

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[dev]' installs it)")
try:  # lm-eval 0.4.10+ keeps its Hugging Face helpers apart
    from lm_eval.models import utils_hf as lm_eval_utils
except ImportError:
    from lm_eval.models import utils as lm_eval_utils

DIVERGING = dict(rollback_threshold=0.0, fallback_threshold=0.0, max_draft_tokens=6)  # rows advance unevenly
GEN_KWARGS = "generation_mode=bild,rollback_threshold=0.0,fallback_threshold=0.5,do_sample=False"


@pytest.fixture(scope="module")
def real_pair(tiny_pair):
    """(large, small, tokenizer): the tiny Qwen2 pair with its trained BPE tokenizer, attached."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair.large)
    tokenizer.padding_side = "left"
    large = AutoModelForCausalLM.from_pretrained(tiny_pair.large)
    small = AutoModelForCausalLM.from_pretrained(tiny_pair.small)
    bild.attach(large, small)
    yield large, small, tokenizer
    bild.detach(large)


def chat_prompts(tokenizer, n: int) -> list[str]:
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": f"Translate to English: {de}"}], tokenize=False,
                                      add_generation_prompt=True)  # fmt: skip
        for de, _ in synthetic_pairs(n, seed=13)
    ]


def stop_criteria(tokenizer, stops: list[str], ids: torch.Tensor, decoder_length: int | None = None):
    """What lm-eval's HFLM builds for a generate_until batch (one MultiTokenEOSCriteria per stop sequence); an
    encoder-decoder's criterion reads the decoder's ids, which start ``decoder_length`` long."""
    return lm_eval_utils.stop_sequences_criteria(tokenizer, stops, decoder_length or ids.shape[1], ids.shape[0])


def test_harness_criterion_stops_where_stock_does_at_batch_4(real_pair):
    large, _, tokenizer = real_pair
    batch = tokenizer(chat_prompts(tokenizer, 4), return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    stops = [".", tokenizer.eos_token]
    common = dict(attention_mask=mask, max_new_tokens=24, pad_token_id=tokenizer.pad_token_id, do_sample=False)
    stock = stop_criteria(tokenizer, stops, ids)
    expected = large.generate(ids, stopping_criteria=stock, **common)
    ours = stop_criteria(tokenizer, stops, ids)
    out = large.generate(ids, stopping_criteria=ours, generation_mode="bild", return_dict_in_generate=True,
                         **DIVERGING, **common)  # fmt: skip
    texts = tokenizer.batch_decode(out.sequences[:, ids.shape[1] :], skip_special_tokens=True)
    assert all("." in text for text in texts), "every output contains the stop string"
    assert out.sequences.shape[1] < ids.shape[1] + 24, "the harness criterion ended generation"
    assert len(set(out.bild_stats.large_forwards)) > 1 or len(set(out.bild_stats.generated)) > 1
    assert out.sequences.tolist() == expected.tolist()
    assert [c.done_tracker for c in ours] == [c.done_tracker for c in stock]


def test_harness_criterion_never_sees_rejected_drafts(pair, tokenizer):
    """A stop string the small model drafts but the large model never outputs must not end any row."""
    large, small = pair
    ids, mask = left_pad(prompts(4))
    common = dict(attention_mask=mask, max_new_tokens=16, pad_token_id=PAD, do_sample=False)
    greedy = large.generate(ids, **common)
    drafted = small.generate(ids, **common)
    rejected = set(drafted[:, ids.shape[1] :].flatten().tolist()) - set(greedy[:, ids.shape[1] :].flatten().tolist())
    assert rejected, "the pair must disagree somewhere for this test to check anything"
    for token in sorted(rejected):
        stop = tokenizer.decode([token])
        stock = stop_criteria(tokenizer, [stop], ids)
        expected = large.generate(ids, stopping_criteria=stock, **common)
        ours = stop_criteria(tokenizer, [stop], ids)
        out = large.generate(ids, stopping_criteria=ours, generation_mode="bild", **DIVERGING, **common)
        assert ours[0].done_tracker == stock[0].done_tracker == [False] * 4, f"stop string {stop!r}"
        assert out.tolist() == expected.tolist()


def stops_like_stock(large, ids, tokenizer, stop_at: int, **common) -> None:
    """Stop at the token row 0 of greedy output has at ``stop_at``: bild's outputs and the criterion's done flags
    equal stock's, and the criterion stopped a row."""
    greedy = large.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=PAD, **common)
    new_tokens = greedy[:, -12:]
    stop = tokenizer.decode([int(new_tokens[0, stop_at])])
    decoder_length = 1 if large.config.is_encoder_decoder else None
    stock = stop_criteria(tokenizer, [stop], ids, decoder_length)
    expected = large.generate(ids, stopping_criteria=stock, max_new_tokens=12, do_sample=False, pad_token_id=PAD,
                              **common)  # fmt: skip
    ours = stop_criteria(tokenizer, [stop], ids, decoder_length)
    out = large.generate(ids, stopping_criteria=ours, generation_mode="bild", max_new_tokens=12, pad_token_id=PAD,
                         **DIVERGING, **common)  # fmt: skip
    assert out.tolist() == expected.tolist()
    assert ours[0].done_tracker == stock[0].done_tracker and True in stock[0].done_tracker


def test_harness_criterion_on_bart_rows_decoded_alone_stops_where_stock_does(trained_bart, bart_pair, tokenizer):
    """BART-like decoders decode each row as a batch of one; the harness's criterion still sees the batch in step."""
    large = trained_bart
    bild.attach(large, bart_pair[1])
    try:
        ids, mask = left_pad(prompts(4, seed=2))
        stops_like_stock(large, ids, tokenizer, stop_at=3, attention_mask=mask)
    finally:
        bild.detach(large)


@pytest.mark.skipif(not records_recurrent_states(), reason="this transformers cannot roll recurrent states back")
def test_harness_criterion_on_a_state_space_model_stops_where_stock_does(tokenizer):
    """Mamba: recurrent state, so rows are decoded one at a time too."""
    from test_recurrent import tiny

    large, small = tiny("mamba", 32, 2, 0, CHAIN, 40), tiny("mamba", 32, 1, 1, SMALL_CHAIN, 40)
    bild.attach(large, small)
    ids, mask = left_pad(prompts(3, seed=2))
    stops_like_stock(large, ids, tokenizer, stop_at=2, attention_mask=mask)


def write_task(folder) -> str:
    """A tiny local generate_until task (YAML + JSONL) in ``folder``; returns its name."""
    docs = [{"de": de, "en": en.rstrip(".")} for de, en in synthetic_pairs(10, seed=7)]
    (folder / "tiny_translate.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    (folder / "tiny_translate.yaml").write_text(
        "task: tiny_translate\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'tiny_translate.jsonl'}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        'doc_to_text: "<|im_start|>user\\nTranslate to English: {{de}}<|im_end|>\\n<|im_start|>assistant\\n"\n'
        'doc_to_target: "{{en}}"\n'
        "generation_kwargs:\n  until: [\".\"]\n  max_gen_toks: 24\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return "tiny_translate"


def test_simple_evaluate_generate_until_task_equals_greedy(real_pair, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    large, _, tokenizer = real_pair
    task = write_task(tmp_path)
    lm = HFLM(pretrained=large, tokenizer=tokenizer, batch_size=4)
    manager = TaskManager(include_path=str(tmp_path))

    def evaluate(gen_kwargs=None):
        with bild.collect_stats() as calls:
            result = simple_evaluate(model=lm, tasks=[task], task_manager=manager, gen_kwargs=gen_kwargs,
                                     log_samples=True)  # fmt: skip
        responses = {s["doc_id"]: s["resps"] for s in result["samples"][task]}
        return result["results"][task]["exact_match,none"], responses, bild.BildStats.concat(calls)

    greedy_score, greedy_responses, greedy_stats = evaluate()
    score, responses, stats = evaluate(GEN_KWARGS)
    assert len(greedy_stats) == 0, "without generation_mode the harness runs stock generate()"
    assert len(stats) == 10 and stats.total("accepted") > 0, "BiLD ran on every document and drafts were kept"
    assert stats.total("large_forwards") < stats.total("generated")
    assert responses == greedy_responses
    assert score == greedy_score > 0

"""`bild.align`: a drafter tuned on the large model's outputs agrees with it more and stays a plain model.

The causal pair's small model maps 8 of 45 tokens to the wrong successor, so it disagrees with the large
model on about a fifth of the tokens; aligning must fix that on held-out prompts.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json

import pytest
import torch
from conftest import CHAIN, PAD, left_pad, prompts, sample_chain
from tiny_pair import synthetic_pairs
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

import bild
from bild.bench.align_cli import ALIGN_CONVERTED, ALIGN_OPTIONS, add_align_parser, align_kwargs
from bild.bench.alignment import (
    AlignCollator,
    AlignTarget,
    generate_targets,
    load_prompts,
    split_held_out,
    target_features,
    top_k_kl,
)

FAST = dict(
    max_new_tokens=12, batch_size=16, generation_batch_size=16, fallback_threshold=0.0, progress=False
)
LAST_LAYER = dict(train_last_layers=1, learning_rate=3e-2, epochs=20)  # the fixture drafter has one layer
# fallback 0: drafts end only at max_draft_tokens or a rejection: acceptance measures argmax agreement alone


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: see conftest.one_thread


def texts(tokenizer, rows) -> list[str]:
    """Token-id rows as prompt texts of the char-level tokenizer (one letter per word id)."""
    return [tokenizer.decode(row) for row in rows]


@pytest.fixture(scope="module")
def train_prompts(tokenizer):
    return texts(tokenizer, prompts(64, seed=1))


@pytest.fixture(scope="module")
def held_out(tokenizer):
    return texts(tokenizer, prompts(16, seed=2))


@pytest.fixture(scope="module")
def aligned(causal_pair, tokenizer, train_prompts, held_out, tmp_path_factory):
    """(result, drafter): a copy of the causal drafter aligned on 64 prompts, last layer trained."""
    large, small = causal_pair
    drafter = copy.deepcopy(small)
    root = tmp_path_factory.mktemp("align")
    result = bild.align(
        large,
        drafter,
        tokenizer,
        train_prompts,
        output_dir=root / "drafter",
        eval_prompts=held_out,
        cache_dir=root / "cache",
        **FAST,
        **LAST_LAYER,
    )
    return result, drafter


def test_alignment_raises_agreement_on_held_out_prompts(aligned):
    before, after = aligned[0].before, aligned[0].after
    assert before.token_agreement < 0.85  # the pair really disagrees
    assert after.token_agreement >= before.token_agreement + 0.15
    assert after.accepted_per_large_forward >= 1.3 * before.accepted_per_large_forward
    assert after.tokens_per_large_forward > before.tokens_per_large_forward
    assert after.target_nll < before.target_nll


@pytest.mark.parametrize("learning_rate", [0.0, 1e-2])
def test_default_lora_trains_and_merges_into_plain_weights(
    causal_pair, tokenizer, train_prompts, held_out, tmp_path, learning_rate
):
    large, small = causal_pair
    drafter = copy.deepcopy(small)
    result = bild.align(
        large,
        drafter,
        tokenizer,
        train_prompts,
        output_dir=tmp_path,
        eval_prompts=held_out,
        cache_dir=tmp_path / "cache",
        learning_rate=learning_rate,
        epochs=20,
        **FAST,
    )
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert set(loaded.state_dict()) == set(small.state_dict())  # no adapter weights left
    is_same = [torch.equal(loaded.state_dict()[name], weight) for name, weight in small.state_dict().items()]
    if learning_rate == 0:  # training that does nothing changes nothing: the margins below come from training
        assert all(is_same) and result.after == result.before
    else:
        assert not all(is_same)
        assert result.after.target_nll < result.before.target_nll - 0.2
        assert result.after.token_agreement >= result.before.token_agreement


def test_saved_drafter_loads_and_is_lossless_with_bild(aligned, causal_pair):
    result, drafter = aligned
    large, _ = causal_pair
    loaded = AutoModelForCausalLM.from_pretrained(result.output_dir)
    for name, weight in drafter.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], weight), name
    AutoTokenizer.from_pretrained(result.output_dir)
    report = json.loads((result.output_dir / "alignment.json").read_text())
    assert report["after"]["token_agreement"] == result.after.token_agreement

    ids, mask = left_pad(prompts(6, seed=3))
    greedy = large.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=PAD)
    bild.attach(large, loaded)
    try:
        out = large.generate(
            ids,
            attention_mask=mask,
            generation_mode="bild",
            rollback_threshold=0.0,
            fallback_threshold=0.3,
            max_new_tokens=12,
            pad_token_id=PAD,
        )
    finally:
        bild.detach(large)
    assert torch.equal(out, greedy)


def test_targets_are_large_greedy_cached_and_reused(causal_pair, tokenizer, tmp_path):
    large, _ = causal_pair
    texts_ = texts(tokenizer, prompts(10, seed=4))
    forwards = []
    hook = large.register_forward_hook(lambda *args: forwards.append(1))
    try:
        first = generate_targets(
            large, tokenizer, texts_, max_new_tokens=8, batch_size=4, cache_dir=tmp_path, progress=False
        )
        n_first = len(forwards)
        again = generate_targets(
            large, tokenizer, texts_, max_new_tokens=8, batch_size=4, cache_dir=tmp_path, progress=False
        )
        n_again = len(forwards) - n_first
        # a run stopped after 6 of 10 rows (batches of 4, longest first): the second batch, which lost two rows,
        # and the third are generated again, as they were batched the first time
        (path,) = tmp_path.glob("targets-*.jsonl")
        path.with_suffix(".partial").write_text("".join(path.read_text().splitlines(keepends=True)[:6]))
        path.unlink()
        resumed = generate_targets(
            large, tokenizer, texts_, max_new_tokens=8, batch_size=4, cache_dir=tmp_path, progress=False
        )
        n_resumed = len(forwards) - n_first
    finally:
        hook.remove()
    assert n_first >= 3 * 8 and n_again == 0 and again == first
    assert 0 < n_resumed <= 2 * 8 and resumed == first and path.is_file()
    for target in first:  # the oracle: each prompt continued greedily alone
        out = large.generate(
            torch.tensor([target.prompt_ids]), max_new_tokens=8, do_sample=False, pad_token_id=PAD
        )
        assert out[0, len(target.prompt_ids) :].tolist() == target.target_ids
        assert [ids[0] for ids in target.topk_ids] == target.target_ids  # top-1 is the greedy token


def test_kl_loss_to_the_large_top_k_also_aligns(causal_pair, tokenizer, train_prompts, held_out, tmp_path):
    large, small = causal_pair
    result = bild.align(
        large,
        copy.deepcopy(small),
        tokenizer,
        train_prompts,
        output_dir=tmp_path,
        eval_prompts=held_out,
        cache_dir=tmp_path,
        loss="kl",
        top_k=8,
        **FAST,
        **LAST_LAYER,
    )
    assert result.after.token_agreement >= result.before.token_agreement + 0.15


def test_encoder_decoder_pair_aligns_with_seq2seq_trainer(seq2seq_pair, tokenizer, tmp_path):
    large, small = seq2seq_pair
    generator = torch.Generator().manual_seed(5)
    sources = texts(tokenizer, sample_chain(CHAIN, 48, 10, generator))
    train, held = split_held_out(sources, 16)
    drafter = copy.deepcopy(small)
    result = bild.align(
        large,
        drafter,
        tokenizer,
        train,
        output_dir=tmp_path,
        eval_prompts=held,
        cache_dir=tmp_path,
        learning_rate=1e-2,
        epochs=20,
        **FAST,
    )  # LoRA on q, k, v, o, wi, wo
    assert result.after.token_agreement >= result.before.token_agreement + 0.1
    assert result.after.accepted_per_large_forward >= 1.5 * result.before.accepted_per_large_forward
    saved_by_save_pretrained = {"architectures", "dtype"}
    for key in small.config.to_dict().keys() - saved_by_save_pretrained:  # the Trainer left the config alone
        assert getattr(drafter.config, key) == getattr(small.config, key), key
    assert type(AutoModelForSeq2SeqLM.from_pretrained(tmp_path)) is type(small)


def test_resume_loads_the_last_checkpoint(causal_pair, tokenizer, train_prompts, tmp_path):
    large, small = causal_pair
    kwargs = dict(
        output_dir=tmp_path,
        cache_dir=tmp_path,
        learning_rate=1e-2,
        epochs=2,
        training_args={"save_steps": 4},
        **FAST,
    )
    trained = copy.deepcopy(small)
    bild.align(large, trained, tokenizer, train_prompts, **kwargs)
    assert (tmp_path / "checkpoint-8").is_dir()  # 2 epochs of 4 steps
    resumed = copy.deepcopy(small)  # the untrained drafter gets the checkpoint's adapters, no more steps
    training_forwards = []
    hook = resumed.register_forward_hook(lambda module, *_: training_forwards.append(module.training))
    try:
        bild.align(large, resumed, tokenizer, train_prompts, resume=True, **kwargs)
    finally:
        hook.remove()
    assert not any(training_forwards)
    for name, weight in trained.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], weight), name


def test_load_prompts_takes_the_end_and_spares_the_bench(tmp_path, tokenizer):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"text": f"p{i}"}) + "\n" for i in range(10)))
    assert load_prompts(str(path), tokenizer, n=3, chat=False, reserve_first=5) == ["p7", "p8", "p9"]
    assert load_prompts(str(path), tokenizer, chat=False, reserve_first=5) == [f"p{i}" for i in range(5, 10)]
    with pytest.raises(ValueError, match="reserved for the bench"):
        load_prompts(str(path), tokenizer, n=6, chat=False, reserve_first=5)
    pairs = tmp_path / "de-en.jsonl"
    pairs.write_text(
        "".join(json.dumps({"source": de, "reference": en}) + "\n" for de, en in synthetic_pairs(4))
    )
    german = synthetic_pairs(4)[-1][0]
    assert load_prompts(str(pairs), tokenizer, n=1, chat=False, task="translation", reserve_first=1) == [
        f"translate German to English: {german}"
    ]
    assert split_held_out(list("abcde"), 2) == (list("abc"), list("de"))
    path.write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"no text field \['prompt', 'text'\]"):
        load_prompts(str(path), tokenizer, chat=False, reserve_first=0)


def test_cli_aligns_a_saved_pair(tiny_pair, tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"Translate to English: {de}"}) + "\n"
            for de, _ in synthetic_pairs(24, seed=5)
        )
    )
    parser = argparse.ArgumentParser()
    add_align_parser(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(
        [
            "align",
            "--small",
            str(tiny_pair.small),
            "--large",
            str(tiny_pair.large),
            "--out",
            str(tmp_path / "out"),
            "--prompts",
            str(data),
            "--n-train",
            "12",
            "--n-eval",
            "4",
            "--reserve-first",
            "8",
            "--max-new-tokens",
            "8",
            "--batch-size",
            "4",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--quiet",
            "--train-arg",
            "save_strategy=no",
        ]
    )
    assert args.run(args) == 0
    assert "accepted_per_large_forward" in capsys.readouterr().out
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert (
        loaded.config.hidden_size == AutoModelForCausalLM.from_pretrained(tiny_pair.small).config.hidden_size
    )


def test_cli_tables_set_every_align_keyword_from_a_real_option(tmp_path):
    """``bild align`` passes `align` every keyword but eval_prompts, each from an option the parser defines."""
    keywords = [p.name for p in inspect.signature(bild.align).parameters.values() if p.kind is p.KEYWORD_ONLY]
    assert sorted([*ALIGN_OPTIONS, *ALIGN_CONVERTED, "eval_prompts"]) == sorted(keywords)
    parser = argparse.ArgumentParser()
    add_align_parser(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(["align", "--small", "s", "--large", "l", "--out", str(tmp_path), "--no-chat",
                              "--last-layers", "2", "--top-k", "3", "--train-arg", "seed=7", "--quiet"])  # fmt: skip
    kwargs = align_kwargs(args)
    assert {name: kwargs[name] for name in ALIGN_CONVERTED} == {
        "output_dir": tmp_path, "train_last_layers": 2, "add_special_tokens": True,
        "training_args": {"seed": 7}, "progress": False,
    }  # fmt: skip
    assert kwargs["top_k"] == 3 and kwargs["loss"] == "ce" and kwargs["resume"] is False


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(loss="mse"), "loss must be one of"),
        (dict(prompts=[]), "non-empty list of prompt texts"),
        (dict(lora_rank=0), "lora_rank must be >= 1"),
        (dict(train_last_layers=2), "train_last_layers must be between 1 and 1"),
        (dict(resume=True), "no checkpoint-\\* folder"),
        (dict(small="t5"), "same kind"),
    ],
)
def test_mistakes_raise_clear_errors_before_any_work(
    causal_pair, seq2seq_pair, tokenizer, tmp_path, change, match
):
    large, small = causal_pair
    kwargs = dict(prompts=["abc"], output_dir=tmp_path / "out", cache_dir=tmp_path, **FAST) | change
    if kwargs.get("small") == "t5":
        small = kwargs.pop("small") and seq2seq_pair[1]
    kwargs.pop("small", None)
    with pytest.raises(ValueError, match=match):
        bild.align(large, small, tokenizer, kwargs.pop("prompts"), **kwargs)
    assert not list(tmp_path.glob("targets-*"))  # nothing was generated


def test_left_padded_trimmed_batch_gives_each_row_its_own_loss(causal_pair):
    _, small = causal_pair
    rows = [
        AlignTarget([5, 6, 7], [8, 9], [], []),
        AlignTarget([10], [11, 12, 13, 1], [], []),
        AlignTarget([3, 4, 5, 6, 7, 8], [9], [], []),
    ]
    collate = AlignCollator.for_model(small, PAD)
    batch = collate([target_features(row, False, False) for row in rows])
    assert collate.trim_logits and batch["logits_to_keep"] == 5 and batch["labels"].shape == (3, 5)
    with torch.no_grad():
        batched = small(**batch).loss  # mean over the 7 target tokens
        alone = [
            small(
                input_ids=torch.tensor([row.prompt_ids + row.target_ids]),
                labels=torch.tensor([[-100] * len(row.prompt_ids) + row.target_ids]),
            ).loss
            * len(row.target_ids)
            for row in rows
        ]
    torch.testing.assert_close(batched, sum(alone) / 7, atol=1e-5, rtol=1e-5)


def test_top_k_kl_on_hand_built_distributions():
    probs = torch.tensor([[0.7, 0.2, 0.1, 0.0]])  # [N=1, V=4]
    topk_ids, topk_logprobs = torch.tensor([[0, 1, 2]]), probs[:, :3].log()
    assert (
        top_k_kl(probs.clamp(min=1e-12).log(), topk_ids, topk_logprobs).abs() < 1e-6
    )  # q == p: no divergence
    uniform = torch.zeros(1, 4)
    expected = (probs[:, :3] * (probs[:, :3] / 0.25).log()).sum()
    torch.testing.assert_close(top_k_kl(uniform, topk_ids, topk_logprobs), expected)
    beyond = torch.tensor(
        [[0, 1, 9]]
    )  # id 9 is a padding row the small vocabulary lacks: p renormalized over 0, 1
    p = torch.tensor([0.7, 0.2]) / 0.9
    torch.testing.assert_close(top_k_kl(uniform, beyond, topk_logprobs), (p * (p / 0.25).log()).sum())

"""BiLD where transformers users already call generate(): streamers, Seq2SeqTrainer, pipelines."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import CHAIN, EOS, PAD, char_tokenizer, prompts, sample_chain
from datasets import Dataset
from safetensors.torch import load_file
from transformers import (
    DataCollatorForSeq2Seq,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    TextIteratorStreamer,
    TextStreamer,
    pipeline,
)

import bild

# Rollback-heavy: the small model never falls back and every disagreement is rolled back.
ROLLBACK_HEAVY = dict(fallback_threshold=0.0, rollback_threshold=0.0, max_draft_tokens=8)


def test_text_streamer_prints_the_final_text_once(pair, tokenizer, capsys):
    large, _ = pair
    ids = prompts(1)[0][None]
    out = large.generate(ids, generation_mode="bild", max_new_tokens=20, pad_token_id=PAD, return_dict_in_generate=True,
                         streamer=TextStreamer(tokenizer, skip_prompt=True), **ROLLBACK_HEAVY)  # fmt: skip
    assert sum(out.bild_stats.rollbacks) >= 2
    printed = capsys.readouterr().out
    assert printed.rstrip("\n") == tokenizer.decode(out.sequences[0, ids.shape[1] :])


def test_text_iterator_streamer_yields_the_final_text(pair, tokenizer):
    large, _ = pair
    ids = prompts(1)[0][None]
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    result = {}
    kwargs = dict(
        generation_mode="bild", max_new_tokens=20, pad_token_id=PAD, streamer=streamer, **ROLLBACK_HEAVY
    )
    thread = threading.Thread(target=lambda: result.update(out=large.generate(ids, **kwargs)))
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    assert streamed == tokenizer.decode(result["out"][0, ids.shape[1] :])


@pytest.fixture(scope="module")
def eval_set():
    src = sample_chain(CHAIN, 10, 8, torch.Generator().manual_seed(7))
    labels = torch.cat([CHAIN[src], torch.full((10, 1), EOS)], dim=1)
    return Dataset.from_dict({"input_ids": src.tolist(), "labels": labels.tolist()})


def make_trainer(large, tmp_path, **args):
    config = bild.BildGenerationConfig(
        fallback_threshold=0.5, rollback_threshold=1.0, max_new_tokens=10, decoder_start_token_id=PAD,
        pad_token_id=PAD, eos_token_id=EOS,
    )  # fmt: skip
    arguments = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), predict_with_generate=True, generation_config=config, per_device_eval_batch_size=4,
        report_to=[], use_cpu=True, disable_tqdm=True, **args,
    )  # fmt: skip
    collator = DataCollatorForSeq2Seq(char_tokenizer(), model=large, label_pad_token_id=PAD)
    return Seq2SeqTrainer(model=large, args=arguments, data_collator=collator)


def test_seq2seq_trainer_predicts_with_bild(s2s, eval_set, tmp_path):
    large, _ = s2s
    original_config = large.generation_config
    trainer = make_trainer(large, tmp_path)
    try:
        with bild.collect_stats() as calls:
            prediction = trainer.predict(eval_set)
        direct = large.generate(torch.tensor(eval_set["input_ids"]), max_new_tokens=10)
        predicted = [[t for t in row if t != PAD] for row in prediction.predictions.tolist()]
        assert predicted == [[t for t in row if t != PAD] for row in direct.tolist()]
        assert len(calls) == 3  # 10 examples, batches of 4
        summary = bild.BildStats.concat(calls).summary()
        assert 0 < summary["large_forwards_per_token"] < 1

        short = trainer.predict(eval_set, max_new_tokens=2)  # gen kwargs override the config
        assert all(len([t for t in row if t != PAD]) <= 2 for row in short.predictions.tolist())
    finally:
        large.generation_config = original_config


def test_training_an_attached_model_saves_only_the_large_model(s2s, eval_set, tmp_path):
    large, small = s2s
    original_config, state = large.generation_config, {k: v.clone() for k, v in large.state_dict().items()}
    small_state = {k: v.clone() for k, v in small.state_dict().items()}
    trainer = make_trainer(large, tmp_path, max_steps=2, per_device_train_batch_size=4, save_strategy="no")
    trainer.train_dataset = eval_set
    try:
        trainer.train()
        trainer.save_model(str(tmp_path / "saved"))
        saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
        assert set(saved) <= set(state) and not any("bild" in k for k in saved)
        assert all(torch.equal(v, small.state_dict()[k]) for k, v in small_state.items()), (
            "small must not train"
        )
    finally:
        large.load_state_dict(state)
        large.eval()  # trainer.train() leaves the shared session model in train mode (dropout on)
        large.generation_config = original_config


def test_text_generation_pipeline(pair, tokenizer):
    large, _ = pair
    generator = pipeline("text-generation", model=large, tokenizer=tokenizer)
    text = tokenizer.decode(prompts(1)[0])
    stock = generator(text, max_new_tokens=12, do_sample=False, pad_token_id=PAD)
    with bild.collect_stats() as calls:
        lossless = generator(
            text,
            generation_mode="bild",
            rollback_threshold=0.0,
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=PAD,
        )
    assert lossless == stock
    assert len(calls) == 1


def test_chat_pipeline_greedy_and_sampling(tiny_pair):
    """Chat messages go through the tokenizer's chat template; the pipeline's generation config may sample."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_pair.large, padding_side="left")
    large = AutoModelForCausalLM.from_pretrained(tiny_pair.large)
    small = AutoModelForCausalLM.from_pretrained(tiny_pair.small)
    generator = pipeline("text-generation", model=bild.attach(large, small), tokenizer=tokenizer)
    chat = [{"role": "user", "content": "Translate to English: Der Hund läuft schnell."}]

    stock = generator(chat, max_new_tokens=12, do_sample=False)
    lossless = generator(chat, generation_mode="bild", rollback_threshold=0.0, max_new_tokens=12, do_sample=False)
    assert lossless == stock
    assert stock[0]["generated_text"][-1]["role"] == "assistant"

    def sampled(seed):
        torch.manual_seed(seed)
        return generator(chat, generation_mode="bild", max_new_tokens=12, do_sample=True, temperature=1.5)

    assert sampled(0) == sampled(0)

"""Build a tiny REAL model pair (two Qwen2 decoders sharing one trained BPE tokenizer) in a folder."""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import tiny_models
import torch
from tiny_models import train
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# (German, English) pieces of a toy grammar: subject, verb phrase, adverb
SUBJECTS = [
    ("Der Hund", "The dog"),
    ("Die Katze", "The cat"),
    ("Das Kind", "The child"),
    ("Der Mann", "The man"),
    ("Die Frau", "The woman"),
    ("Der Lehrer", "The teacher"),
]
VERBS = [
    ("läuft", "runs"),
    ("schläft", "sleeps"),
    ("isst", "eats"),
    ("liest ein Buch", "reads a book"),
    ("sieht den Ball", "sees the ball"),
    ("trinkt Wasser", "drinks water"),
]
ADVERBS = [
    ("", ""),
    (" schnell", " fast"),
    (" heute", " today"),
    (" im Garten", " in the garden"),
    (" jeden Tag", " every day"),
]
SMALL_SHAPE = dict(hidden=32, layers=2)
LARGE_SHAPE = dict(hidden=64, layers=3)


@dataclass(frozen=True)
class TinyPair:
    """Folders of the pair; each holds a model, its generation config and the shared tokenizer."""

    root: Path
    small: Path
    large: Path


def synthetic_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` seeded (German, English) sentence pairs from the toy grammar."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        (s_de, s_en), (v_de, v_en), (a_de, a_en) = (
            rng.choice(SUBJECTS),
            rng.choice(VERBS),
            rng.choice(ADVERBS),
        )
        pairs.append((f"{s_de} {v_de}{a_de}.", f"{s_en} {v_en}{a_en}."))
    return pairs


def write_translation_data(folder: Path, n: int, seed: int = 7) -> Path:
    """A JSONL file of ``n`` synthetic German->English examples (``id``, ``source``, ``reference``) in ``folder``."""
    path = Path(folder) / "de-en.jsonl"
    rows = [{"id": f"ex{i}", "source": de, "reference": en} for i, (de, en) in enumerate(synthetic_pairs(n, seed))]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def synthetic_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Chat-formatted translation exchanges plus plain sentences, for tokenizer and model training."""
    lines = []
    for i, (de, en) in enumerate(synthetic_pairs(n, seed)):
        if i % 2:
            lines.append(
                f"<|im_start|>user\nTranslate to English: {de}<|im_end|>\n"
                f"<|im_start|>assistant\n{en}<|im_end|>\n"
            )
        else:
            lines.append(f"{de} {en}<|endoftext|>")
    return lines


def build_tokenizer(corpus: list[str], vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on ``corpus``, wrapped with eos/pad tokens and a chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
    )


def build_model(tokenizer, shape: dict, seed: int):
    """A seeded float32 Qwen2ForCausalLM of the given ``shape`` over ``tokenizer``'s vocabulary."""
    model = tiny_models.qwen(len(tokenizer), shape["hidden"], shape["layers"], seed, pad=tokenizer.pad_token_id,
                             eos=tokenizer.eos_token_id, tie=True)  # fmt: skip
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return model


def build_t5(tokenizer, shape: dict, seed: int):
    """A seeded float32 T5ForConditionalGeneration of the given ``shape`` over ``tokenizer``'s vocabulary."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    model = tiny_models.t5(len(tokenizer), shape["hidden"], shape["layers"], seed, pad=pad, eos=eos)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad, decoder_start_token_id=pad)
    return model


def corpus_windows(token_ids: torch.Tensor, seq_len: int = 48, batch_size: int = 16):
    """Batches of random ``seq_len`` windows of the 1-D ``token_ids``, for next-token prediction."""

    def batch(generator: torch.Generator) -> dict:
        starts = torch.randint(0, len(token_ids) - seq_len, (batch_size,), generator=generator)
        ids = torch.stack([token_ids[s : s + seq_len] for s in starts.tolist()])  # [B, T]
        return {"input_ids": ids, "labels": ids}

    return batch


def translation_pairs(tokenizer, pairs: list[tuple[str, str]], batch_size: int = 16):
    """Batches of German -> English pairs (``translate German to English: `` prefix) for a seq2seq model."""

    def batch(generator: torch.Generator) -> dict:
        picks = torch.randint(0, len(pairs), (batch_size,), generator=generator).tolist()
        sources = [f"translate German to English: {pairs[i][0]}" for i in picks]
        targets = [pairs[i][1] + tokenizer.eos_token for i in picks]
        inputs = tokenizer(sources, padding=True, return_tensors="pt")  # [B, T_src]
        labels = tokenizer(targets, padding=True, return_tensors="pt")  # [B, T_tgt]
        return {**inputs, "labels": labels["input_ids"].masked_fill(labels["attention_mask"] == 0, -100)}

    return batch


def build_tiny_pair(root: str | Path, *, steps: int = 300, seed: int = 0) -> TinyPair:
    """Write (or reuse) ``root/small`` and ``root/large``: a tiny trained pair sharing one tokenizer.

    Training runs ``steps`` AdamW steps per model on the synthetic corpus (a few seconds on 2 CPU cores),
    so the pair agrees on most tokens and stops with ``<|im_end|>``, like a real instruct pair.
    """
    root = Path(root)
    pair = TinyPair(root=root, small=root / "small", large=root / "large")
    if (root / "COMPLETE").is_file():
        return pair
    corpus = synthetic_corpus(seed=seed)
    tokenizer = build_tokenizer(corpus)
    token_ids = torch.tensor([i for line in corpus for i in tokenizer(line)["input_ids"]])  # [N]
    for folder, shape, model_seed in (
        (pair.small, SMALL_SHAPE, seed + 1),
        (pair.large, LARGE_SHAPE, seed + 2),
    ):
        model = train(build_model(tokenizer, shape, model_seed), corpus_windows(token_ids), steps, model_seed)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    (root / "COMPLETE").write_text("ok\n")
    return pair


def build_tiny_seq2seq_pair(root: str | Path, *, steps: int = 200, seed: int = 0) -> TinyPair:
    """Like `build_tiny_pair`, with two T5 encoder-decoders trained on plain-prefix German -> English."""
    root = Path(root)
    pair = TinyPair(root=root, small=root / "small", large=root / "large")
    if (root / "COMPLETE").is_file():
        return pair
    tokenizer = build_tokenizer(synthetic_corpus(seed=seed))
    pairs = synthetic_pairs(400, seed)
    for folder, shape, model_seed in (
        (pair.small, SMALL_SHAPE, seed + 1),
        (pair.large, LARGE_SHAPE, seed + 2),
    ):
        model = train(build_t5(tokenizer, shape, model_seed), translation_pairs(tokenizer, pairs), steps, model_seed)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    (root / "COMPLETE").write_text("ok\n")
    return pair


if __name__ == "__main__":
    print(build_tiny_pair(sys.argv[1] if len(sys.argv) > 1 else "tiny-pair"))

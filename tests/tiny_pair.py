"""Build a tiny REAL model pair (two Qwen2 decoders sharing one trained BPE tokenizer) in a folder."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

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
SMALL_SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2)
LARGE_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3)
SMALL_T5_SHAPE = dict(d_model=32, d_ff=64, num_layers=2)
LARGE_T5_SHAPE = dict(d_model=64, d_ff=128, num_layers=3)


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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

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
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        **shape,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    return model


def build_t5(tokenizer, shape: dict, seed: int):
    """A seeded float32 T5ForConditionalGeneration of the given ``shape`` over ``tokenizer``'s vocabulary."""
    from transformers import GenerationConfig, T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_kv=16,
        num_heads=4,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        **shape,
    )
    model = T5ForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return model


def train_seq2seq(
    model, tokenizer, pairs: list[tuple[str, str]], steps: int, seed: int, batch_size: int = 16
):
    """A few AdamW steps of German -> English (``translate German to English: `` prefix) on ``pairs``."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model.train()
    try:
        with torch.enable_grad():
            for _ in range(steps):
                picks = torch.randint(0, len(pairs), (batch_size,), generator=generator).tolist()
                sources = [f"translate German to English: {pairs[i][0]}" for i in picks]
                targets = [pairs[i][1] + tokenizer.eos_token for i in picks]
                inputs = tokenizer(sources, padding=True, return_tensors="pt")  # [B, T_src]
                labels = tokenizer(targets, padding=True, return_tensors="pt")  # [B, T_tgt]
                label_ids = labels["input_ids"].masked_fill(labels["attention_mask"] == 0, -100)
                loss = model(**inputs, labels=label_ids).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    finally:
        torch.set_num_threads(n_threads)
        model.eval()
    return model


def train(model, token_ids: torch.Tensor, steps: int, seed: int, seq_len: int = 48, batch_size: int = 16):
    """A few Adam steps of next-token prediction on random windows of the 1-D ``token_ids``."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and immune to busy shared cores
    model.train()
    try:
        with torch.enable_grad():
            for _ in range(steps):
                starts = torch.randint(0, len(token_ids) - seq_len, (batch_size,), generator=generator)
                batch = torch.stack([token_ids[s : s + seq_len] for s in starts.tolist()])  # [B, T]
                loss = model(input_ids=batch, labels=batch).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    finally:
        torch.set_num_threads(n_threads)
        model.eval()
    return model


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
        model = train(build_model(tokenizer, shape, model_seed), token_ids, steps, model_seed)
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
        (pair.small, SMALL_T5_SHAPE, seed + 1),
        (pair.large, LARGE_T5_SHAPE, seed + 2),
    ):
        model = train_seq2seq(build_t5(tokenizer, shape, model_seed), tokenizer, pairs, steps, model_seed)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    (root / "COMPLETE").write_text("ok\n")
    return pair


if __name__ == "__main__":
    import sys

    print(build_tiny_pair(sys.argv[1] if len(sys.argv) > 1 else "tiny-pair"))

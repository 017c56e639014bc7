"""Tiny real model pairs for the core tests, trained for a few seconds on synthetic text.

Text follows a Markov chain over the vocabulary: token ``t`` is followed by ``CHAIN[t]`` 90% of the time.
The large model learns that chain; the small model learns a chain that differs on a few tokens, so it
drafts confidently and is sometimes wrong: both fallbacks and rollbacks happen.
"""

from __future__ import annotations

import string

import pytest
import tiny_models
import torch
from tiny_models import train
from tiny_pair import build_tiny_pair
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2ForCausalLM,
    T5ForConditionalGeneration,
)

import bild

VOCAB = 48  # 0 pad, 1 eos, 2 bos, 3.. words
PAD, EOS, BOS = 0, 1, 2
FIRST_WORD = 3
_perm = torch.randperm(VOCAB - FIRST_WORD, generator=torch.Generator().manual_seed(0)) + FIRST_WORD
CHAIN = torch.arange(VOCAB)
CHAIN[FIRST_WORD:] = _perm
SMALL_CHAIN = CHAIN.clone()
SMALL_CHAIN[FIRST_WORD : FIRST_WORD + 45 : 6] = CHAIN[FIRST_WORD + 1 : FIRST_WORD + 46 : 6]  # 8 tokens differ


def sample_chain(chain: torch.Tensor, n: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """`(n, length)` token ids following ``chain`` 90% of the time, a random word otherwise."""
    seq = torch.empty(n, length, dtype=torch.long)
    seq[:, 0] = torch.randint(FIRST_WORD, VOCAB, (n,), generator=generator)
    for t in range(1, length):
        noise = torch.randint(FIRST_WORD, VOCAB, (n,), generator=generator)
        keep = torch.rand(n, generator=generator) < 0.9
        seq[:, t] = torch.where(keep, chain[seq[:, t - 1]], noise)
    return seq


def qwen(hidden: int, layers: int, seed: int, vocab: int = VOCAB) -> Qwen2ForCausalLM:
    return tiny_models.qwen(vocab, hidden, layers, seed, pad=PAD, eos=EOS, bos=BOS)


def t5(d_model: int, layers: int, seed: int) -> T5ForConditionalGeneration:
    return tiny_models.t5(VOCAB, d_model, layers, seed, pad=PAD, eos=EOS)


def causal_batches(chain):
    def batch(generator):
        ids = sample_chain(chain, 32, 24, generator)
        return {"input_ids": ids, "labels": ids}

    return batch


def translation_batches(chain):
    """Target = the chain's successor of each source token, then EOS."""

    def batch(generator):
        src = sample_chain(chain, 32, 10, generator)
        labels = torch.cat([chain[src], torch.full((32, 1), EOS)], dim=1)
        return {"input_ids": src, "labels": labels}

    return batch


@pytest.fixture(scope="session", autouse=True)
def bild_home(tmp_path_factory):
    """A fresh ``$BILD_HOME`` for the session: costs and kernel choices measured by tests never reach the user's."""
    home = tmp_path_factory.mktemp("bild-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BILD_HOME", str(home))
        yield home


@pytest.fixture(scope="session")
def causal_pair():
    """(large, small) decoder-only Qwen2 pair, trained on slightly different chains."""
    large = train(qwen(64, 2, seed=0), causal_batches(CHAIN), steps=120, seed=0)
    small = train(qwen(32, 1, seed=1), causal_batches(SMALL_CHAIN), steps=120, seed=0)
    return large, small


@pytest.fixture(scope="session")
def seq2seq_pair():
    """(large, small) T5 pair mapping each source token to its chain successor."""
    large = train(t5(64, 2, seed=0), translation_batches(CHAIN), steps=150, seed=0)
    small = train(t5(32, 1, seed=1), translation_batches(SMALL_CHAIN), steps=150, seed=0)
    return large, small


@pytest.fixture()
def pair(causal_pair):
    """The causal pair with ``bild.attach``, detached again after the test."""
    large, small = causal_pair
    bild.attach(large, small)
    yield large, small
    bild.detach(large)


@pytest.fixture()
def s2s(seq2seq_pair):
    """The T5 pair with ``bild.attach``, detached again after the test."""
    large, small = seq2seq_pair
    bild.attach(large, small)
    yield large, small
    bild.detach(large)


def bart(d_model: int, layers: int, seed: int) -> BartForConditionalGeneration:
    torch.manual_seed(seed)
    config = BartConfig(
        vocab_size=VOCAB, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=2 * d_model,
        decoder_ffn_dim=2 * d_model, max_position_embeddings=128, pad_token_id=PAD, eos_token_id=EOS,
        bos_token_id=BOS, decoder_start_token_id=EOS, forced_eos_token_id=None, attn_implementation="eager",
    )  # fmt: skip
    return BartForConditionalGeneration(config).eval()


@pytest.fixture(scope="session")
def bart_pair():
    """(large, small) untrained BART pair: random weights are fine for exact-equality oracles."""
    return bart(64, 2, 0), bart(32, 1, 1)


@pytest.fixture(scope="session")
def trained_bart():
    """A BART model mapping each source token to its chain successor (an untrained one repeats one token)."""
    return train(bart(64, 2, seed=0), translation_batches(CHAIN), steps=150, seed=0)


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """Folders of a tiny trained Qwen2 pair sharing a BPE tokenizer with a chat template (tests/tiny_pair.py)."""
    return build_tiny_pair(tmp_path_factory.mktemp("tiny-pair"))


@pytest.fixture(scope="session")
def tokenizer():
    return char_tokenizer()


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A real character-level tokenizer over the tiny vocabulary: one letter per word id."""
    letters = string.ascii_letters[: VOCAB - FIRST_WORD]
    vocab = {"<pad>": PAD, "</s>": EOS, "<s>": BOS, **{c: i + FIRST_WORD for i, c in enumerate(letters)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", bos_token="<s>", padding_side="left"
    )


def prompts(n: int, seed: int = 1, lengths=(3, 7, 5, 9)) -> list[torch.Tensor]:
    """``n`` chain-following prompts of unequal lengths."""
    generator = torch.Generator().manual_seed(seed)
    return [sample_chain(CHAIN, 1, lengths[i % len(lengths)], generator)[0] for i in range(n)]


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - len(row) :] = row
        mask[b, width - len(row) :] = 1
    return ids, mask


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: on tiny matrices it is faster than two and immune to busy shared cores."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)

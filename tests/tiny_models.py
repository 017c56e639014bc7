"""The one factory of tiny real models for the tests, and the one loop that trains them for a few seconds."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, T5Config, T5ForConditionalGeneration


def qwen(vocab: int, hidden: int, layers: int, seed: int, *, pad: int, eos: int, bos: int | None = None,
         tie: bool = False) -> Qwen2ForCausalLM:  # fmt: skip
    """A seeded float32 Qwen2 decoder (eager attention)."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=tie,
        pad_token_id=pad, eos_token_id=eos, bos_token_id=bos, attn_implementation="eager",
    )  # fmt: skip
    return Qwen2ForCausalLM(config)


def t5(vocab: int, d_model: int, layers: int, seed: int, *, pad: int, eos: int) -> T5ForConditionalGeneration:
    """A seeded float32 T5 encoder-decoder (eager attention); decoding starts from ``pad`` like T5's."""
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab, d_model=d_model, d_kv=16, d_ff=2 * d_model, num_layers=layers, num_heads=4,
        decoder_start_token_id=pad, pad_token_id=pad, eos_token_id=eos, attn_implementation="eager",
    )  # fmt: skip
    return T5ForConditionalGeneration(config)


def train(model, batch_fn: Callable[[torch.Generator], dict], steps: int, seed: int = 0, lr: float = 3e-3):
    """``steps`` AdamW steps on ``model(**batch_fn(generator)).loss``; returns the model in eval mode.

    One thread: on tiny matrices it is faster than two and immune to busy shared cores.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model.train()
    try:
        with torch.enable_grad():
            for _ in range(steps):
                loss = model(**batch_fn(generator)).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    finally:
        torch.set_num_threads(n_threads)
        model.eval()
    return model


def qwen3_5(vocab: int, hidden: int, layers: int, seed: int, *, pad: int, eos: int, bos: int | None = None):
    """A seeded float32 Qwen3.5 text decoder: gated delta-net (linear attention) layers, full attention last."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    torch.manual_seed(seed)
    config = Qwen3_5TextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=2,
        linear_key_head_dim=16, linear_value_head_dim=16, layer_types=["linear_attention"] * (layers - 1) + ["full_attention"],
        max_position_embeddings=512, pad_token_id=pad, eos_token_id=eos, bos_token_id=bos, tie_word_embeddings=False,
        attn_implementation="eager",
    )  # fmt: skip
    return Qwen3_5ForCausalLM(config)


def mamba(vocab: int, hidden: int, layers: int, seed: int, *, pad: int, eos: int, bos: int | None = None):
    """A seeded float32 Mamba (state-space) decoder: no attention at all."""
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(seed)
    config = MambaConfig(
        vocab_size=vocab, hidden_size=hidden, state_size=8, num_hidden_layers=layers, expand=2, conv_kernel=4,
        time_step_rank=8, pad_token_id=pad, eos_token_id=eos, bos_token_id=bos if bos is not None else eos,
        tie_word_embeddings=False, use_mambapy=False,
    )  # fmt: skip
    return MambaForCausalLM(config)

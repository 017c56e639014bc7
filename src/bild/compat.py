"""Every use of transformers' private internals and every version probe, in one place.

bild supports transformers 5.17 to the newest 5.x. What it relies on beyond the public API, each
tested in tests/test_compat.py:
- `cache_kwarg`: the forward() keyword that takes the KV cache is ``cache`` from 5.2x and
  ``past_key_values`` before (the old name is a deprecated alias afterwards).
- `crop_cache`: ``DynamicCache.crop(n)`` / ``EncoderDecoderCache.crop(n)`` accept a negative ``n`` (slots
  to drop from the end) on every supported version; the latter crops self-attention only.
- `takes_forward_arg`: whether a model's forward() names ``position_ids`` / ``logits_to_keep``.
- `prepared_special_tokens`: ``generate()`` leaves the prepared EOS and pad ids on the generation config
  it hands a ``custom_generate`` callable, as ``_eos_token_tensor`` / ``_pad_token_tensor``.
- The ``custom_generate=<callable>`` route of generate() itself (used in integration.py) is public API.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache, EncoderDecoderCache, GenerationConfig, PreTrainedModel
from transformers.cache_utils import Cache


def new_cache(model: PreTrainedModel) -> Cache:
    """An empty dynamic cache for ``model`` (full-length layers, so cropping is exact)."""
    if model.config.is_encoder_decoder:
        return EncoderDecoderCache(DynamicCache(), DynamicCache())
    return DynamicCache()


def takes_forward_arg(model: torch.nn.Module, name: str) -> bool:
    """Whether ``model.forward`` has a parameter called ``name``."""
    return name in inspect.signature(model.forward).parameters


def cache_kwarg(model: torch.nn.Module) -> str:
    """The forward() argument that takes the cache: ``cache`` from transformers 5.2x, ``past_key_values`` before."""
    return "cache" if takes_forward_arg(model, "cache") else "past_key_values"


def crop_cache(cache: Cache, n_remove: int) -> None:
    """Drop the last ``n_remove`` slots of every row and layer of ``cache``."""
    if n_remove > 0:
        cache.crop(-n_remove)


def prepared_special_tokens(config: GenerationConfig) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(eos_ids, pad_id)`` tensors as generate() prepared them, before it calls a custom decoding loop."""
    return getattr(config, "_eos_token_tensor", None), getattr(config, "_pad_token_tensor", None)

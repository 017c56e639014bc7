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
- `SeenByGenerate`: stock ``generate()`` calls ``get_generation_mode()`` (public) on the config it prepared
  from the one passed in, and ``_prepare_generation_config`` calls the private static
  ``_get_default_generation_params()`` on the model's own ``generation_config`` (Seq2SeqTrainer calls it
  too, after generate(), so the caller's name is checked); `BildGenerationConfig` hooks both to refuse
  stock decoding on a model that was never attached (tests/test_user_errors.py).
- `gather_cache_slots`: a dynamic cache's layers keep ``keys`` / ``values`` as [B, heads, S, head_dim] tensors
  in ``cache.layers[i]`` that may be replaced (T5 rows decoded together are right-aligned this way);
  `has_relative_positions` names the encoder-decoder families that place tokens only relative to each other.
- Early exit (`run_decoder_layer`, `crop_cache_layers`, `output_with_cache`): see the block at the end.
- `tree_attention_mask`: decoder-only models and encoder-decoders' decoders take a 4D ``attention_mask``
  `(batch, 1, query, key)` as given (``masking_utils`` returns a 4D mask as is); its format follows the
  private ``config._attn_implementation``: "sdpa" (and flex/flash refuse) wants bool (True: attend), "eager"
  an additive float mask; T5-family decoders get the additive one under sdpa too (on 5.17 their sdpa path
  misreads a bool 4D mask).
- `relative_positions`: a T5-family decoder's self-attention layers with ``has_relative_attention_bias`` compute
  their bias in ``compute_bias(query_length, key_length, ...)`` (later layers reuse the first one's), from
  ``_relative_position_bucket`` and the ``relative_attention_bias`` embedding; bild swaps in a ``compute_bias``
  that reads explicit positions for a forward whose tokens do not sit at their slots (tree siblings).
- `absolute_positions`: BART-like decoders (BART, mBART, Marian, Blenderbot, ...) add position embeddings from
  ``decoder.embed_positions``, whose forward takes ``position_ids`` (computed by the decoder from its cache
  length); a forward pre-hook replaces them for a forward whose tokens do not sit at their slots.
- `supports_assistant_ensemble_weight`: stock's ``assistant_ensemble_weight`` is a GenerationConfig field (5.17 on, checked).
- Recurrent layers (`new_cache`, `crop_cache`, `keep_recurrent_states`, `has_recurrent_state`): transformers builds
  linear-attention / state-space cache layers from the config (``DynamicCache(config=...)``, 5.2x); after
  ``activate_past_recording(recurrent_states_to_keep=n)`` a layer keeps its conv buffer whole and appends, per
  forward, the state before it and after each of its last ``n - 1`` tokens to ``recurrent_states_history[i]``;
  ``crop(-k)`` restores ``history[-k]`` and forgets the record. bild sets ``recurrent_states_to_keep`` per forward,
  and rolls back within a round itself from those attributes (keeping the record; see `_roll_back_recorded`).
- The lean drafter forward (`cache_past`, `store_past`): see the block at the end.
- The ``custom_generate=<callable>`` route of generate() itself (used in integration.py) is public API.
"""

from __future__ import annotations

import inspect
import sys
from contextlib import contextmanager

import torch
from transformers import DynamicCache, EncoderDecoderCache, GenerationConfig, PreTrainedModel
from transformers.cache_utils import (
    Cache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    get_layer_types_and_kwargs,
)

try:  # recurrent cache layers (transformers 5.2x)
    from transformers.cache_utils import (
        LinearAttentionAndFullAttentionLayer,
        LinearAttentionAndSlidingWindowAttentionLayer,
        LinearAttentionCacheLayerMixin,
    )
except ImportError:  # pragma: no cover - older versions decode no recurrent model
    LinearAttentionCacheLayerMixin = LinearAttentionAndFullAttentionLayer = None
    LinearAttentionAndSlidingWindowAttentionLayer = ()
try:  # layers that store nothing (shared KV, attention-free layers): 5.2x
    from transformers.cache_utils import DummyLayer

    STORELESS_LAYERS = (DummyLayer,)
except ImportError:  # pragma: no cover - 5.17
    STORELESS_LAYERS = ()


def new_cache(model: PreTrainedModel) -> Cache:
    """An empty dynamic cache for ``model`` (full-length attention layers, so cropping is exact).

    Models with recurrent layers (linear attention, state-space, short convolutions: `has_recurrent_state`)
    get their own layer kinds, recording past states so that `crop_cache` can roll them back.
    """
    if model.config.is_encoder_decoder:
        return EncoderDecoderCache(DynamicCache(), DynamicCache())
    if not _needs_typed_layers(model):
        return DynamicCache()
    cache = DynamicCache(config=model.config)
    for i, layer in enumerate(cache.layers):  # sliding windows would drop slots bild still tracks: keep them all
        if isinstance(layer, LinearAttentionAndSlidingWindowAttentionLayer):
            cache.layers[i] = LinearAttentionAndFullAttentionLayer(number_of_states=layer.number_of_states)
        elif type(layer) is DynamicSlidingWindowLayer:
            cache.layers[i] = DynamicLayer()
    for layer in _recurrent_layers(cache):
        layer.activate_past_recording(recurrent_states_to_keep=0)
        # one history list per state (transformers' dict.fromkeys shares one list between them)
        layer.recurrent_states_history = {i: [] for i in range(layer.number_of_states)}
    return cache


def takes_forward_arg(model: torch.nn.Module, name: str) -> bool:
    """Whether ``model.forward`` has a parameter called ``name``."""
    return name in inspect.signature(model.forward).parameters


def cache_kwarg(model: torch.nn.Module) -> str:
    """The forward() argument that takes the cache: ``cache`` from transformers 5.2x, ``past_key_values`` before."""
    return "cache" if takes_forward_arg(model, "cache") else "past_key_values"


def crop_cache(cache: Cache, n_remove: int, settle: bool = True) -> None:
    """Drop the last ``n_remove`` tokens of every row and layer of ``cache``.

    Recurrent layers go back to their recorded state before those tokens. ``settle``: no token the cache now
    holds will be dropped later, so they forget their recorded past (transformers' own ``crop``); otherwise
    they keep it, so that a later call may still roll back past this point (see `keep_recurrent_states`).
    """
    recurrent = _recurrent_layers(cache)
    if not recurrent:
        if n_remove > 0:
            cache.crop(-n_remove)
        return
    for layer in _cache_layers(cache):
        if layer not in recurrent:
            if n_remove > 0:
                layer.crop(-n_remove)
        elif _is_initialized(layer):
            if settle:
                layer.crop(-n_remove)
            elif n_remove > 0:
                _roll_back_recorded(layer, n_remove)


def has_recurrent_state(model: PreTrainedModel) -> bool:
    """Whether ``model`` carries recurrent state between forwards (linear attention, state-space or short
    convolution layers: Mamba, Qwen3.5, Qwen3-Next, Falcon-H1, LFM, ...): a state that takes in every token fed,
    so a row cannot skip a token the way attention skips a masked cache slot."""
    return bool(getattr(model, "_is_stateful", False)) or bool(_recurrent_layers(_typed_cache(model)))


def is_attention_free(model: PreTrainedModel) -> bool:
    """A model whose layers are all recurrent (Mamba, Falcon-Mamba, ...): its forward takes the attention mask of
    the tokens fed only (stock generate() passes none after the prefill), not of the cache before them."""
    cache = _typed_cache(model)
    recurrent = _recurrent_layers(cache)
    return bool(recurrent) and all(
        (layer in recurrent or isinstance(layer, STORELESS_LAYERS)) and not isinstance(layer, DynamicLayer)
        for layer in _cache_layers(cache)
    )


def attention_window(model: PreTrainedModel) -> int | None:
    """The smallest sliding or chunked attention window of ``model``'s decoder layers, or None (full attention).

    Transformers builds such windows from cache slots (a key is seen when its slot is within the window of the
    query's), so bild keeps a row's slots contiguous for them (`TrackedCache.right_align`) and never feeds
    siblings, which a 4D mask given as is would let see past the window."""
    if model.config.is_encoder_decoder:
        return None
    try:
        layer_types, layer_kwargs = get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))
    except Exception:  # configs without per-layer information
        return None
    if isinstance(layer_kwargs, dict):  # 5.17: one set of kwargs for every layer
        layer_kwargs = [layer_kwargs] * len(layer_types)
    windows = [
        kwargs["sliding_window"] for kind, kwargs in zip(layer_types, layer_kwargs, strict=True)
        if kind in WINDOWED_LAYER_TYPES and kwargs.get("sliding_window")
    ]  # fmt: skip
    return min(windows) if windows else None


def recurrent_rollback_obstacle(model: PreTrainedModel) -> str | None:
    """Why bild cannot roll back ``model``'s recurrent state on this transformers version, or None."""
    if not has_recurrent_state(model):
        return None
    if not records_recurrent_states():
        import transformers

        return (
            f"bild rolls {type(model).__name__}'s recurrent (linear-attention / state-space) layers back through "
            f"their recorded past states, which transformers {transformers.__version__} does not keep: upgrade to "
            f"transformers>=5.25 (pip install -U transformers), or use stock generate() for this model (leave out "
            f"generation_mode='bild')."
        )
    return None


def keep_recurrent_states(cache: Cache, n_states: int) -> None:
    """Have the recurrent layers of ``cache`` record their state after each of the last ``n_states`` tokens
    of the next forward (besides the one before it): a later `crop_cache` may drop up to ``n_states - 1`` of
    them, or all of them when the forward feeds ``n_states`` tokens."""
    for layer in _recurrent_layers(cache):
        layer.recurrent_states_to_keep = n_states


def _cache_layers(cache: Cache) -> list:
    cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
    return list(getattr(cache, "layers", ()))


def _recurrent_layers(cache: Cache | None) -> list:
    if cache is None or LinearAttentionCacheLayerMixin is None:
        return []
    return [layer for layer in _cache_layers(cache) if isinstance(layer, LinearAttentionCacheLayerMixin)]


def _typed_cache(model: PreTrainedModel) -> Cache | None:
    """The dynamic cache transformers builds from ``model``'s config (its layer kinds), or None."""
    if model.config.is_encoder_decoder:
        return None
    try:
        return DynamicCache(config=model.config)
    except Exception:  # configs without per-layer information: plain attention layers
        return None


def _needs_typed_layers(model: PreTrainedModel) -> bool:
    """A cache whose layers are not all plain attention (recurrent, indexed, ...): build it from the config."""
    cache = _typed_cache(model)
    plain = (DynamicLayer, DynamicSlidingWindowLayer)
    return cache is not None and any(type(layer) not in plain for layer in cache.layers)


def records_recurrent_states() -> bool:
    """Whether this transformers version's recurrent layers record per-token past states (``recurrent_states_to_keep``)."""
    return LinearAttentionCacheLayerMixin is not None and "recurrent_states_to_keep" in inspect.signature(
        LinearAttentionCacheLayerMixin.activate_past_recording
    ).parameters


def _is_initialized(layer) -> bool:
    return any(layer.is_conv_states_initialized.values()) or any(layer.is_recurrent_states_initialized.values())


def _roll_back_recorded(layer, n_remove: int) -> None:
    """Like ``LinearAttentionCacheLayerMixin.crop(-n_remove)`` (and the attention part of a hybrid layer), but the
    layer keeps recording: its conv buffer stays whole and its past states before the dropped tokens stay."""
    layer.cumulative_length_linear.sub_(n_remove)
    for i in range(layer.number_of_states):
        if layer.is_conv_states_initialized[i]:
            layer.conv_states[i] = layer.conv_states[i][..., :-n_remove]
        if layer.is_recurrent_states_initialized[i]:
            history = layer.recurrent_states_history[i]
            layer.recurrent_states[i] = history[-n_remove]
            layer.recurrent_states_history[i] = history[:-n_remove]
    if isinstance(layer, DynamicLayer):
        DynamicLayer.crop(layer, -n_remove)


class SeenByGenerate:
    """Mixed into a `GenerationConfig` subclass: ``self._on_generate()`` runs whenever generate() uses the config.

    That is when it is passed as ``generate(generation_config=...)`` and when it is the model's own
    ``generation_config``.
    """

    def get_generation_mode(self, assistant_model=None):
        self._on_generate()
        return super().get_generation_mode(assistant_model)

    def _get_default_generation_params(self) -> dict:
        if sys._getframe(1).f_code.co_name == "_prepare_generation_config":  # generate() reads the model's config
            self._on_generate()
        return super()._get_default_generation_params()

    def _on_generate(self) -> None:
        raise NotImplementedError


def supports_assistant_ensemble_weight() -> bool:
    """Whether stock assisted generation takes ``assistant_ensemble_weight`` (its lossy verification; 5.17 on)."""
    return hasattr(GenerationConfig(), "assistant_ensemble_weight")


def prepared_special_tokens(config: GenerationConfig) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(eos_ids, pad_id)`` tensors as generate() prepared them, before it calls a custom decoding loop."""
    return getattr(config, "_eos_token_tensor", None), getattr(config, "_pad_token_tensor", None)


# Encoder-decoder families whose decoders position tokens only relative to each other (T5's bucketed
# relative attention bias, computed from cache slots): their rows can run together once every row's cache
# slots are contiguous. Families with absolute positions taken from the cache length (BART, Marian,
# Pegasus, ...) cannot, and decode one row at a time.
RELATIVE_POSITION_SEQ2SEQ = ("t5", "mt5", "umt5", "longt5", "switch_transformers")


WINDOWED_LAYER_TYPES = ("sliding_attention", "chunked_attention", "hybrid_sliding")
TREE_MASK_ATTENTION = ("sdpa", "eager")  # attention implementations that take a custom 4D mask here


def attention_implementation(model: PreTrainedModel) -> str:
    return getattr(model.config, "_attn_implementation", None) or "eager"


def tree_attention_mask(model: PreTrainedModel, allowed: torch.Tensor) -> torch.Tensor:
    """A `(batch, 1, query, key)` attention mask in the format ``model``'s attention takes, from bool ``allowed``."""
    implementation = attention_implementation(model)
    if implementation == "sdpa" and not has_relative_positions(model):
        return allowed[:, None]
    # T5's sdpa path folds its position bias into the mask: on 5.17 it misreads a bool 4D one, an additive one
    # it adds (tests/test_compat.py, on every supported version)
    if implementation in TREE_MASK_ATTENTION:
        dtype = next(model.parameters()).dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )[:, None]
    raise ValueError(
        f"fallback_candidates > 1 needs a model with attn_implementation in {TREE_MASK_ATTENTION}, got "
        f"{implementation!r}: load it with attn_implementation='sdpa', or use fallback_candidates <= 1."
    )


def takes_custom_4d_mask(model: PreTrainedModel) -> bool:
    """Whether a decoder-only model's attention takes a custom 4D mask as given: models on transformers' attention
    interface do (``_supports_attention_backend``); others (e.g. Megatron-BERT on 5.17) may misread one."""
    return bool(getattr(model, "_supports_attention_backend", False))


def has_relative_positions(model: PreTrainedModel) -> bool:
    return model.config.is_encoder_decoder and model.config.model_type in RELATIVE_POSITION_SEQ2SEQ


@contextmanager
def relative_positions(model: PreTrainedModel, query_positions: torch.Tensor, key_positions: torch.Tensor):
    """Within the block, ``model``'s decoder (T5 family) biases attention by explicit token positions instead of
    cache slots: ``query_positions`` `(batch, query)` for the forward's tokens, ``key_positions`` `(batch, key)`
    for every slot it attends to (cache, then the forward's tokens)."""
    layers = [m for m in model.get_decoder().modules() if getattr(m, "has_relative_attention_bias", False)]
    if not layers or not all(hasattr(m, "compute_bias") for m in layers):
        raise RuntimeError(f"bild: {type(model).__name__} has no relative attention bias to position siblings by.")

    def bias_from_positions(layer):
        takes_bucket_options = "bidirectional" in inspect.signature(layer._relative_position_bucket).parameters

        def compute_bias(query_length: int, key_length: int, *args, **kwargs) -> torch.Tensor:
            relative = key_positions[:, None, :key_length] - query_positions[:, -query_length:, None]  # [B, Q, K]
            if takes_bucket_options:  # T5, MT5: a static method; UMT5 reads them from the layer
                buckets = layer._relative_position_bucket(
                    relative, bidirectional=not layer.is_decoder, num_buckets=layer.relative_attention_num_buckets,
                    max_distance=layer.relative_attention_max_distance,
                )  # fmt: skip
            else:
                buckets = layer._relative_position_bucket(relative)
            return layer.relative_attention_bias(buckets).permute(0, 3, 1, 2)  # [B, heads, Q, K]

        return compute_bias

    for layer in layers:
        layer.compute_bias = bias_from_positions(layer)  # an instance attribute shadows the method
    try:
        yield
    finally:
        for layer in layers:
            del layer.compute_bias


def embeds_decoder_positions(model: PreTrainedModel) -> bool:
    """An encoder-decoder whose decoder adds absolute position embeddings, from the cache length, through an
    ``embed_positions`` module that takes ``position_ids`` (BART, mBART, Marian, Blenderbot, ...)."""
    if not model.config.is_encoder_decoder:
        return False
    embed = getattr(model.get_decoder(), "embed_positions", None)
    return isinstance(embed, torch.nn.Module) and takes_forward_arg(embed, "position_ids")


@contextmanager
def absolute_positions(model: PreTrainedModel, positions: torch.Tensor):
    """Within the block, ``model``'s decoder (see `embeds_decoder_positions`) embeds the positions
    ``positions`` `(query,)` for a forward's tokens (a batch of one) instead of those after its cache length."""

    embed = model.get_decoder().embed_positions
    signature = inspect.signature(embed.forward)

    def use_positions(module, args, kwargs):
        bound = signature.bind(*args, **kwargs)  # the decoder may pass position_ids by position (Pegasus-X)
        given = bound.arguments.get("position_ids")  # in the layout this module takes: (query,) or (query, 1)
        bound.arguments["position_ids"] = positions if given is None else positions.reshape(given.shape)
        return bound.args, bound.kwargs

    handle = embed.register_forward_pre_hook(use_positions, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def gather_cache_slots(cache: Cache, index: torch.Tensor) -> None:
    """Keep, per row, the self-attention slots ``index[b]`` (in that order) of every layer: `(batch_size, S')`.

    Relies on the 5.x cache layout: ``cache.layers[i].keys`` / ``.values`` of shape [B, heads, S, head_dim]
    (an `EncoderDecoderCache` holds them in ``self_attention_cache``).
    """
    cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
    for layer in cache.layers:
        if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
            continue
        index = index.to(layer.keys.device)  # layers may sit on different devices (device_map="auto")
        expanded = index[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
        layer.keys = layer.keys.gather(2, expanded)
        layer.values = layer.values.gather(2, expanded)


# --- Early exit (bild.early_exit) -------------------------------------------------------------------------
# What `bild.early_exit` relies on beyond the public API, for Llama/Qwen2-family decoder layers:
# - `run_decoder_layer`: a decoder layer called on its own takes ``(hidden_states, attention_mask=4-D additive
#   mask, position_ids, position_embeddings=(cos, sin), use_cache)`` plus the cache as ``cache`` (5.2x) or
#   ``past_key_values`` (before); it returns the hidden states (a tuple whose first item on older versions).
# - `crop_cache_layers`: a dynamic cache keeps one ``DynamicLayer`` per layer in ``cache.layers`` (a layer
#   built with ``layer_idx=i`` writes into ``cache.layers[i]``, appended on demand in a ``DynamicCache()``);
#   ``layer.crop(-n)`` drops the last ``n`` slots of that layer alone (5.17 fails on a layer never written).
# - `output_with_cache`: model outputs name the cache ``cache`` (5.2x) or ``past_key_values`` (before).


def run_decoder_layer(
    layer: torch.nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    cache: Cache | None,
) -> torch.Tensor:
    """One decoder layer on `(batch_size, L, hidden)` states with a `(batch_size, 1, L, S + L)` additive mask."""
    kwargs = {cache_kwarg(layer): cache} if cache is not None else {}
    output = layer(
        hidden_states, attention_mask=attention_mask, position_ids=position_ids,
        position_embeddings=position_embeddings, use_cache=cache is not None, **kwargs,
    )  # fmt: skip
    return output[0] if isinstance(output, tuple) else output


def crop_cache_layers(cache: Cache, layer_ids: range, n_remove: int) -> None:
    """Drop the last ``n_remove`` slots of the layers ``layer_ids`` of ``cache`` only (others keep theirs)."""
    if n_remove > 0:
        for layer_idx in layer_ids:
            if layer_idx < len(cache.layers):
                cache.layers[layer_idx].crop(-n_remove)


def output_with_cache(output_class: type, cache: Cache | None, **fields):
    """``output_class(**fields)`` with the cache under the field name this transformers version uses."""
    name = "cache" if "cache" in output_class.__dataclass_fields__ else "past_key_values"
    return output_class(**fields, **{name: cache})


# --- Lean drafter forward (bild.lean) ----------------------------------------------------------------------
# What `bild.lean` relies on beyond the public API, for Llama-family decoders (tests/test_lean.py checks the logits
# equal the model's own forward): ``model.model`` holds ``embed_tokens``, ``rotary_emb`` (called as
# ``rotary_emb(hidden, position_ids) -> (cos, sin)``), ``layers`` and ``norm``; each layer ``input_layernorm``,
# ``self_attn`` (``q/k/v/o_proj``, ``head_dim``, ``scaling``, Qwen3's ``q_norm``/``k_norm`` on the head dim),
# ``post_attention_layernorm`` and ``mlp`` (``gate/up/down_proj``, ``act_fn``); the attention is softmax(q k^T *
# scaling) v over the rotated queries and keys (rotate_half convention), as transformers' sdpa path computes it. A
# `DynamicCache` keeps each layer's keys / values in ``cache.layers[i]`` (see `gather_cache_slots`), created on the
# first ``update`` of that layer.


def cache_past(cache: Cache, n_layers: int) -> list[tuple[torch.Tensor, torch.Tensor] | None] | None:
    """Each layer's cached ``(keys, values)`` `(batch_size, heads, S, head_dim)` (None: nothing cached yet), or None
    when ``cache`` is not a plain dynamic cache of full attention layers."""
    if type(cache) is not DynamicCache or len(cache.layers) > n_layers:
        return None
    past = []
    for i in range(n_layers):
        layer = cache.layers[i] if i < len(cache.layers) else None
        if layer is not None and type(layer) is not DynamicLayer:
            return None
        is_empty = layer is None or not layer.is_initialized or layer.keys.numel() == 0
        past.append(None if is_empty else (layer.keys, layer.values))
    return past


def store_past(cache: Cache, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Make ``keys`` / ``values`` (the old slots, then the new ones) layer ``layer_idx``'s cache."""
    if layer_idx < len(cache.layers) and cache.layers[layer_idx].is_initialized:
        cache.layers[layer_idx].keys, cache.layers[layer_idx].values = keys, values
    else:  # first write: the public update creates and fills the layer
        cache.update(keys, values, layer_idx)

"""Tiny seeded pairs of (almost) every text-generating architecture in transformers' model registry.

`build_pair(key)` (`cached_pair` caches it) takes the defaults of ``AutoConfig.for_model(model_type)``,
shrinks every usual size field it finds (widths, layers, heads, experts, linear-attention and state-space
sizes, vocabulary, sliding windows, per-layer type lists cut to the new layer count keeping one layer of each
kind; in sub-configs too), builds the class that ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` or
``MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES`` names for it, seeded, in float32 and eval mode (eager
attention, else sdpa), and returns a `Built` pair: the small model is the large one with noise on its weights
(so it agrees with the large model often, not always) and logits scaled to a fixed spread (so it is sometimes
confident, sometimes not). Where an architecture cannot be built that way it returns the reason instead;
`SKIP` names the known ones. Per-architecture fixes live in `OVERRIDES`, kept to what the generic shrinking
cannot know.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
)

VOCAB = 256
HIDDEN = 64
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 16
FFN = 64
LAYERS = 2
EXPERTS = 4
TOP_K = 2
WINDOW = 4  # sliding windows shorter than prompt + new tokens: the window matters
NOISE = 0.5  # the small model: the large model's weights plus this much (relative) Gaussian noise
SMALL_LOGIT_STD = 4.0  # the small model's logits are scaled to about this spread over the vocabulary

HIDDEN_KEYS = {
    "hidden_size", "d_model", "n_embd", "embed_dim", "emb_dim", "dim", "embedding_dim", "word_embed_proj_dim",
    "lru_width", "embedding_size", "out_hidden_size", "cross_attention_hidden_size", "attention_hidden_size",
}  # fmt: skip
FFN_KEYS = {
    "intermediate_size", "d_ff", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "n_inner", "dim_ff", "dff",
    "moe_intermediate_size", "shared_expert_intermediate_size", "moe_shared_expert_intermediate_size",
    "shared_intermediate_size", "shared_experts_intermediate_size", "dense_intermediate_size",
    "first_dense_intermediate_size", "prefix_dense_intermediate_size", "intermediate_size_mlp", "d_inner",
    "expert_ffn_hidden_size", "ffn_hidden_size", "feed_forward_size", "mlp_only_intermediate_size",
    "speech_encoder_intermediate_size", "t2u_encoder_ffn_dim", "t2u_decoder_ffn_dim",
}  # fmt: skip
LAYER_KEYS = {
    "num_hidden_layers", "num_layers", "n_layer", "n_layers", "decoder_layers", "encoder_layers",
    "num_decoder_layers", "num_encoder_layers", "depth", "speech_encoder_layers", "t2u_encoder_layers",
    "t2u_decoder_layers", "num_blocks",
}  # fmt: skip
HEAD_KEYS = {
    "num_attention_heads", "n_head", "n_heads", "num_heads", "attention_heads", "encoder_attention_heads",
    "decoder_attention_heads", "num_encoder_attention_heads", "num_decoder_attention_heads",
    "speech_encoder_attention_heads", "t2u_encoder_attention_heads", "t2u_decoder_attention_heads",
    "swa_num_attention_heads", "index_n_heads", "index_num_heads", "indexer_n_heads",
}  # fmt: skip
KV_HEAD_KEYS = {
    "num_key_value_heads", "num_kv_heads", "num_query_groups", "swa_num_key_value_heads", "indexer_kv_heads",
}  # fmt: skip
HEAD_DIM_KEYS = {
    "head_dim", "d_kv", "d_head", "attention_head_size", "kv_channels", "attention_head_dim", "swa_head_dim",
    "dim_head", "index_head_dim", "indexer_head_dim", "linear_head_dim", "v_head_dim",
}  # fmt: skip
FIXED = {  # key: at most this value
    # multi-head latent attention
    "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "qk_head_dim": 16, "q_lora_rank": 32, "kv_lora_rank": 32,
    "o_lora_rank": 32,
    # linear attention and state-space layers
    "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 2,
    "linear_num_value_heads": 4, "linear_num_heads": 4, "state_size": 8, "mamba_d_state": 8,
    "ssm_state_size": 8, "mamba_n_heads": 8, "mamba_num_heads": 8, "n_mamba_heads": 8, "mamba_d_head": 16,
    "mamba_head_dim": 16, "mamba_headdim": 16, "mamba_d_ssm": 128, "n_groups": 1, "mamba_n_groups": 1,
    "mamba_ngroups": 1, "time_step_rank": 8, "mamba_dt_rank": 8, "chunk_size": 16, "mamba_chunk_size": 16,
    # mixtures of experts
    "num_experts": EXPERTS, "num_local_experts": EXPERTS, "n_routed_experts": EXPERTS,
    "moe_num_experts": EXPERTS, "num_experts_per_tok": TOP_K, "num_experts_per_token": TOP_K,
    "moe_topk": TOP_K, "moe_k": TOP_K, "top_k_experts": TOP_K, "n_shared_experts": 1, "num_shared_experts": 1,
    "moe_num_shared_experts": 1, "n_group": 1, "topk_group": 1, "num_expert_group": 1,
    "first_k_dense_replace": 1, "num_dense_layers": 1,
    # positions and windows
    "max_position_embeddings": 512, "n_positions": 512, "n_ctx": 512, "sliding_window": WINDOW,
    "window_size": WINDOW, "attention_window_size": WINDOW, "sliding_window_size": WINDOW,
    "local_attention_window_len": WINDOW, "rotary_dim": 8,
    # the rest
    "adapter_rank": 8, "index_topk": 4, "laurel_rank": 8, "hidden_size_per_layer_input": 16,
    "vocab_size_per_layer_input": VOCAB, "num_nextn_predict_layers": 0, "image_size": 32, "patch_size": 8,
}  # fmt: skip
VOCAB_KEYS = {"vocab_size", "decoder_vocab_size", "src_vocab_size", "tgt_vocab_size", "unpadded_vocab_size"}
PERIOD_SUFFIXES = ("_period", "_pattern", "_every_n_layers", "_interval", "_sparse_step")
INDEX_LIST_WORDS = ("idx", "indices", "_ids", "_layers")  # in the names of lists of layer indices
SEQ2SEQ = ":seq2seq"  # registry_types() key suffix: the seq2seq class of a type both mappings name

# model_type: why it is not built (then its tests are skipped with that reason)
SKIP: dict[str, str] = {
    "blt": "BltForCausalLM fails at its own default config (BltConfig has no num_hidden_layers for its "
    "per-layer config lookup)",
    "gemma4_assistant": "a drafter whose every layer reads its target model's KV cache: not a model alone",
    "gemma4_unified_assistant": "a drafter whose every layer reads its target's KV cache: not a model alone",
    "gemma3n": "its vision tower needs timm, which is not installed (gemma3n_text covers the text model)",
    "voxtral_realtime": "its forward needs input_features (audio) at every step",
    "musicgen": "decodes several audio codebooks per step: input_ids are (batch * num_codebooks, length)",
    "musicgen_melody": "decodes several audio codebooks per step: input_ids are (batch * codebooks, length)",
    "dots3_note": "its vision and audio adapters' widths are tied to the text width in ways the shrinking "
    "does not follow (dots3_note_text covers the text model)",
}

_QSA = {  # qwen4_exp's indexed attention: the defaults leave these unset
    "indexer_n_heads": 2, "indexer_budget": 8, "indexer_compress_ratio": 4, "indexer_kv_heads": 1,
    "hc_lowrank": 8, "heads_per_ngram": 2, "ngram_vocab_size_base": 512, "split_ngram_parts": 4,
}  # fmt: skip
# model_type: {key: value} set after shrinking (a sub-config's keys as "text_config.key"), only where needed
OVERRIDES: dict[str, dict] = {
    "bamba": {"attn_layer_indices": [1]},  # the defaults have no attention layer at all
    "granitemoehybrid": {"layer_types": ["mamba", "attention"]},  # nor these
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},
    "lfm2": {"layer_types": ["conv", "full_attention"], "full_attn_idxs": [1]},  # nor conv layers here
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "falcon_h1": {"mamba_d_ssm": 64},  # 8 heads of 8
    "mamba2": {"num_heads": 8},  # heads * head_dim = expand * hidden
    "deepseek_v2": {"num_experts_per_tok": TOP_K},  # None in the defaults
    "dots1": {"n_routed_experts": EXPERTS, "num_experts_per_tok": TOP_K, "n_shared_experts": 1},  # None too
    "zamba": {  # one shared attention block used by two layers; attention reads [hidden, embeddings]
        "num_hidden_layers": 4, "layers_block_type": ["mamba", "hybrid", "mamba", "hybrid"],
        "attention_hidden_size": 2 * HIDDEN, "attention_head_dim": 2 * HIDDEN // HEADS,
    },  # fmt: skip
    "zamba2": {
        "attention_hidden_size": 2 * HIDDEN, "attention_head_dim": 2 * HIDDEN // HEADS, "kv_channels": 32,
    },  # fmt: skip
    "hrm_text": {"num_layers_per_stack": 1, "H_cycles": 1, "L_cycles": 1, "L_bp_cycles": [1]},
    "dory": {  # its to_dict() writes each layer as (layer, "mlp") and every count doubled
        "num_hidden_layers": 6, "n_input_layers": 2, "n_recurrent_layers": 2, "n_output_layers": 2,
        "layer_types": ["sliding_attention", "mlp", "full_attention", "mlp", "sliding_attention", "mlp"],
    },  # fmt: skip
    "kolibri1_1": {
        "num_hidden_layers": 2, "layer_types": ["sliding_attention", "indexed_attention"],
        "kv_source_layers": [0, 1], "index_layers": [1], "mlp_only_layers": [0],
        "mlp_only_intermediate_size": FFN, "index_pool_size": 64, "index_compression": 4,
        "index_num_heads": 2, "index_num_local_tokens": 4, "index_num_sink_tokens": 1,
    },  # fmt: skip
    "gemma3n_text": {"num_kv_shared_layers": 2},  # 4 layers: sliding, full, then two reading their K/V
    "dots3_note_text": {"head_dim": 16},  # = qk_nope_head_dim + qk_rope_head_dim
    "qwen4_exp_text": _QSA,
    "qwen4_exp": {f"text_config.{key}": value for key, value in _QSA.items()},
    "cohere_compass_text": {  # the defaults have no rope parameters for its layer type
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4}},
    },
    "dbrx": {"attn_config.rope_theta": 10000.0, "attn_config.clip_qkv": 8.0},
    "nemo_speechlm": {"audio_config.diarization_config.head_config.audio_hidden_size": HIDDEN},
    "vibevoice_asr": {  # its audio tokenizers' convolutions double their channels per stage
        f"{part}_tokenizer_encoder_config.{key}": value
        for part in ("acoustic", "semantic") for key, value in (("num_filters", 2), ("depths", [1] * 7))
    },  # fmt: skip
    "reformer": {"is_decoder": True, "axial_pos_shape": [16, 32], "axial_pos_embds_dim": [16, 48]},
    "xlstm": {"qk_dim_factor": 1.0},
}
# model_type: what to do to each model after building it
AFTER_BUILD: dict[str, Callable] = {"xmod": lambda model: model.set_default_language("en_XX")}


@dataclass
class Built:
    """A tiny pair and what a test needs to prompt it."""

    large: torch.nn.Module
    small: torch.nn.Module
    is_encoder_decoder: bool
    special_ids: frozenset[int]  # token ids the configs name: prompts avoid them
    vocab_size: int


def registry_types() -> list[str]:
    """Every model_type of both mappings once; a type in both is listed again as ``"<type>:seq2seq"``."""
    causal = list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    seq2seq = [f"{t}{SEQ2SEQ}" if t in causal else t for t in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES]
    return causal + seq2seq


def model_class(key: str):
    """The class the registry names for ``key`` (a model_type, or ``"<type>:seq2seq"``)."""
    if key.endswith(SEQ2SEQ) or key not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return getattr(transformers, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES[key.removesuffix(SEQ2SEQ)])
    return getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[key])


def _is_config(value) -> bool:
    return isinstance(value, dict) and "model_type" in value


def _layer_count_key(d: dict) -> str | None:
    for key in ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "decoder_layers"):
        if isinstance(d.get(key), int):
            return key
    return None


def _layer_index(key) -> int | None:
    """A layer index given as a dict key (``5`` or ``"05"``), else None."""
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    return int(key) if isinstance(key, str) and key.isdigit() else None


def _shrink_layer_lists(d: dict, n_old: int) -> int:
    """Cut every per-layer list of ``d`` (length ``n_old``), every list of layer indices and every dict keyed
    by layer index to the same layers, keeping at least one layer of each kind (each distinct combination of
    per-layer values); returns the new layer count."""
    index_lists = [k for k, v in d.items() if _is_index_list(k, v, n_old)]
    per_layer = [
        k for k, v in d.items()
        if isinstance(v, list) and len(v) == n_old and n_old > 1 and k not in index_lists
    ]
    by_index = [
        k for k, v in d.items()
        if isinstance(v, dict) and v
        and all(_layer_index(i) is not None and isinstance(x, dict) for i, x in v.items())
    ]  # per_layer_config: {"05": {"head_dim": 512}, ...}
    kinds = [
        tuple(_hashable(d[k][i]) for k in per_layer)
        + tuple(i in d[k] for k in index_lists)
        + tuple(_hashable(next((v for j, v in d[k].items() if _layer_index(j) == i), None)) for k in by_index)
        for i in range(n_old)
    ]
    chosen = sorted({kind: i for i, kind in reversed(list(enumerate(kinds)))}.values())
    for i in range(n_old):  # at least LAYERS layers
        if len(chosen) >= min(LAYERS, n_old):
            break
        if i not in chosen:
            chosen = sorted([*chosen, i])
    for k in per_layer:
        d[k] = [d[k][i] for i in chosen]
    for k in index_lists:
        d[k] = [new for new, old in enumerate(chosen) if old in d[k]]
    for k in by_index:
        old = {_layer_index(j): (j, v) for j, v in d[k].items()}
        d[k] = {
            (str(new).zfill(len(old[i][0])) if isinstance(old[i][0], str) else new): _shrink_sizes(old[i][1])
            for new, i in enumerate(chosen) if i in old
        }  # fmt: skip
    return len(chosen)


def _is_index_list(key: str, value, n_layers: int) -> bool:
    """Whether ``value`` lists layer indices (``full_attn_idxs``, ``attn_layer_indices``, ...)."""
    if not isinstance(value, list) or not value or not any(w in key for w in INDEX_LIST_WORDS):
        return False
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_layers for i in value):
        return False
    return value == sorted(set(value))  # increasing


def _hashable(value):
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return tuple(map(_hashable, value)) if isinstance(value, list) else value


def shrink(d: dict) -> dict:
    """``d`` (a config's ``to_dict()``, sub-configs included) with its sizes made tiny, in place."""
    for value in d.values():
        if _is_config(value):
            shrink(value)
        elif isinstance(value, list) and value and all(_is_config(v) for v in value):
            for v in value:
                shrink(v)
    count_key = _layer_count_key(d)
    n_layers = _shrink_layer_lists(d, d[count_key]) if count_key is not None else None
    _shrink_sizes(d, count_key, n_layers)
    if "qk_rope_head_dim" in d and "head_dim" in d:  # multi-head latent attention: rotary part of each head
        d["head_dim"] = d["qk_rope_head_dim"]
    rope = d.get("rope_parameters")
    if isinstance(rope, dict) and "mrope_section" in rope:
        rope["mrope_section"] = _split(HEAD_DIM // 2, rope["mrope_section"])
    return d


def _shrink_sizes(d: dict, count_key: str | None = None, n_layers: int | None = None) -> dict:
    """The int size fields of ``d`` (not its sub-configs) made tiny, in place."""
    heads = d.get("num_attention_heads")
    for key, value in list(d.items()):
        if value is None and key in HEAD_DIM_KEYS | KV_HEAD_KEYS:  # some defaults leave these unset
            value = 10**6
        if key in FFN_KEYS and isinstance(value, list) and all(isinstance(v, int) for v in value):
            d[key] = [FFN] * len(value)  # one per layer (gemma3n)
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        if key in HIDDEN_KEYS:
            d[key] = HIDDEN
        elif key in FFN_KEYS:
            d[key] = FFN
        elif key in LAYER_KEYS:
            d[key] = n_layers if key == count_key and n_layers else min(value, LAYERS)
        elif key in HEAD_KEYS:
            d[key] = min(value, HEADS)
        elif key in KV_HEAD_KEYS:
            d[key] = 1 if value == 1 else HEADS if value == heads else KV_HEADS
        elif key in HEAD_DIM_KEYS:
            d[key] = HEAD_DIM
        elif key in FIXED:
            d[key] = min(value, FIXED[key]) if key not in ("num_nextn_predict_layers",) else FIXED[key]
        elif key in VOCAB_KEYS:
            d[key] = VOCAB
        elif key.endswith(PERIOD_SUFFIXES) and value > 2:
            d[key] = 2
        elif key.endswith("_offset") and value > 1:
            d[key] = 1
    return d


def _split(total: int, parts: list[int]) -> list[int]:
    """``total`` split in the proportions of ``parts`` (each at least 1, summing to ``total``)."""
    shares = [max(1, round(total * p / sum(parts))) for p in parts]
    shares[-1] += total - sum(shares)
    return shares


def _token_ids(d: dict, found: dict[tuple, int | list]) -> None:
    """Every special-token field of ``d`` and its sub-configs, by path."""
    for key, value in d.items():
        if _is_config(value):
            _token_ids(value, found)
        elif key.endswith(("_token_id", "_token_index", "_token_ids")) or key in ("unk_index", "mask_index"):
            found[(id(d), key)] = (d, key)


def fit_token_ids(d: dict) -> set[int]:
    """Move special token ids that fall outside the tiny vocabulary into its top; return every special id."""
    fields: dict = {}
    _token_ids(d, fields)
    moved: dict[int, int] = {}
    used = set()
    for holder, key in fields.values():
        value = holder[key]
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int) and v < VOCAB:
                used.add(v)
    top = VOCAB - 1

    def fit(v):
        nonlocal top
        if not isinstance(v, int) or v < VOCAB:
            return v
        if v not in moved:
            while top in used:
                top -= 1
            moved[v] = top
            used.add(top)
        return moved[v]

    for holder, key in fields.values():
        value = holder[key]
        holder[key] = [fit(v) for v in value] if isinstance(value, list) else fit(value)
    return used


def _set(d: dict, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    for part in path:
        d = d[part]
    d[last] = value


def tiny_config(model_type: str, attn_implementation: str = "eager", only_changes: bool = False):
    """The tiny config of ``model_type`` and the special token ids it names.

    The shrunk fields are passed with every other field of the defaults (``only_changes=False``), or alone, so
    that the config derives the rest (per-layer layouts, head sizes) from them itself (``only_changes=True``).
    """
    base = AutoConfig.for_model(model_type)
    original = base.to_dict()
    d = shrink(copy.deepcopy(original))
    for dotted, value in OVERRIDES.get(model_type, {}).items():
        _set(d, dotted, value)
    special = fit_token_ids(d)
    for key in ("transformers_version", "architectures", "_name_or_path", "id2label", "label2id"):
        d.pop(key, None)
    if only_changes:
        d = {k: v for k, v in d.items() if k not in original or original[k] != v}
    config = type(base).from_dict(d, attn_implementation=attn_implementation)
    return config, special


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Add seeded Gaussian noise, `NOISE` times each weight tensor's own spread, to ``model``'s weights."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point() and param.numel() > 1:
                std = float(param.std())
                if std > 0:
                    param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * NOISE * std)


def _sharpen(model: torch.nn.Module, kwargs: dict) -> None:
    """Scale the model's logits (a hook on its output layer) to a spread of about `SMALL_LOGIT_STD`."""
    head = model.get_output_embeddings()
    if head is None:
        return
    with torch.no_grad():
        logits = model(**kwargs).logits[0, -1].float()
    std = float(logits.std())
    if not std > 0:
        return
    scale = SMALL_LOGIT_STD / std
    head.register_forward_hook(lambda module, args, output: output * scale)


def build_pair(key: str, seed: int = 0) -> Built | str:
    """``(large, small)`` tiny models of ``key`` (see `registry_types`), or why they cannot be built."""
    if key in SKIP:
        return SKIP[key]
    model_type = key.removesuffix(SEQ2SEQ)
    errors = []
    for only_changes in (False, True):
        for implementation in ("eager", "sdpa"):
            try:
                return _build(key, model_type, seed, implementation, only_changes)
            except Exception as err:  # noqa: BLE001 - any failure to build is a reason to skip
                errors.append(f"{implementation}: {_one_line(err)}")
    return f"cannot build a tiny {model_type}: {'; '.join(dict.fromkeys(errors))}"


def _build(key: str, model_type: str, seed: int, implementation: str, only_changes: bool) -> Built:
    config, special = tiny_config(model_type, implementation, only_changes)
    cls = model_class(key)
    if not isinstance(config, cls.config_class):  # a text-only class registered under a composite type
        config = config.get_text_config(decoder=True)
        config._attn_implementation = implementation
    if key in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and getattr(config, "is_decoder", None) is False:
        config.is_decoder = True  # BERT-like models are causal (and cache) only as decoders
    models = []
    for _ in range(2):
        torch.manual_seed(seed)
        model = cls(config).float().eval()
        if model_type in AFTER_BUILD:
            AFTER_BUILD[model_type](model)
        generation = model.generation_config
        if model.config.is_encoder_decoder and generation.decoder_start_token_id is None:  # T5: its pad id
            generation.decoder_start_token_id = generation.pad_token_id or 0
        models.append(model)
    large, small = models
    _perturb(small, seed + 1)
    vocab = config.get_text_config(decoder=True).vocab_size
    built = Built(large, small, bool(large.config.is_encoder_decoder), frozenset(special), vocab)
    _sharpen(small, _probe_inputs(built))
    return built


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = " ".join(lines[:2]) if lines and lines[0].endswith(":") else (lines[0] if lines else "")
    return f"{type(err).__name__}: {text}"[:240]


def _probe_inputs(built: Built) -> dict:
    """Inputs of one forward of either model: a prompt (and for an encoder-decoder, the decoder start)."""
    kwargs = {"input_ids": prompt_ids(built, seed=123)}
    if built.is_encoder_decoder:
        start = built.large.generation_config.decoder_start_token_id
        kwargs["decoder_input_ids"] = torch.full((1, 1), start if isinstance(start, int) else 0)
    return kwargs


def prompt_ids(built: Built, length: int = 5, seed: int = 0, batch: int = 1) -> torch.Tensor:
    """`(batch, length)` seeded random ids that no config names as special."""
    allowed = torch.tensor([i for i in range(4, min(built.vocab_size, VOCAB)) if i not in built.special_ids])
    generator = torch.Generator().manual_seed(seed)
    return allowed[torch.randint(len(allowed), (batch, length), generator=generator)]


@functools.lru_cache(maxsize=8)
def cached_pair(key: str) -> Built | str:
    """`build_pair`, once per key per process."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_pair(key)

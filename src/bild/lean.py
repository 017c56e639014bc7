"""Both models' forward in bild's loop without transformers' per-module machinery, and a compiled one-token step.

On a few CPU cores a compressed drafter's step is bound by overhead, not by its weights: of 43 ms per step of the
int4 Qwen2.5-Coder-0.5B (bf16, AMX Xeon, 2 cores), its matmuls take 22 ms; the rest is about a thousand small
tensor operations and the Python around them (mask building, attention dispatch, output records, hooks). For the
Llama family (Llama, Qwen2, Qwen3, Mistral without a sliding window) `LeanForward` writes the decoder out
(embedding, RMSNorm, rotary attention over the KV cache, SwiGLU), calling the model's own modules (quantized or
kernel-fitted linear layers, norms, the rotary embedding, the pruned output layer) and its own `DynamicCache`, so
its logits are the model's (tests/test_lean.py), at about 37 ms per step. A quantized drafter's q, k and v
projections run as one packed matmul there, and an int8-dynamic drafter's gate and up projections too (`Fused`,
the same numbers bit for bit; the compiled step below keeps them apart: compiled, they step faster so).
`compile_drafter` further compiles the one-token step with `torch.compile` (dynamic shapes: one graph for a batch
of one, one for larger batches, whatever the cache length), at about 27 ms: its first step costs a compile, about
55 s on 2 cores, and about 20 s in a later process, which finds the compiled kernels in torch's on-disk cache
(docs/measured.md, "The drafter's step"; an int8-dynamic drafter: "The drafter's step on AVX2").

The large model's forward costs its weights' bytes more than overhead, but transformers' forward over a chunk of
drafts (its mask, its attention path) costs more than the written-out one: 6-7% for 8-20 tokens of the 1.5B model,
2% for one (bf16, same machine; docs/measured.md, "The verifier's forward"). The logits are the same in float32
(bit for bit on that pair; the float32 oracles hold).

bild's loop uses the lean forward for both models wherever it applies (`lean_obstacle` says why not elsewhere), except
for a verification with sibling candidates (a tree mask), which runs the model's own forward. A model's own forward
hooks do not see the lean one (`LeanForward.register_hooks` does; its layers' parts and output layer still run as
modules); `keep_own_forward` or `own_forward` keep a model on its own forward.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import weakref
from collections import OrderedDict
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.hooks import RemovableHandle
from transformers import PreTrainedModel

from .compat import cache_past, store_past
from .drafters import DynamicInt8Linear, concatenated

LEAN_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
# each model's LeanForward, kept across generate() calls (its compiled step too), not in the model (not deep-copied)
_LEAN_FORWARDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_OWN_FORWARD: weakref.WeakSet = weakref.WeakSet()  # models that `keep_own_forward` keeps off the lean path
_LAYER_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
_ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")
_MLP_PARTS = ("gate_proj", "up_proj", "down_proj", "act_fn")


def lean_obstacle(model: nn.Module) -> str | None:
    """Why `LeanForward` cannot run ``model`` (None: it can)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not isinstance(model, PreTrainedModel) or model_type not in LEAN_MODEL_TYPES:
        return f"model type {model_type!r} is not one of {LEAN_MODEL_TYPES}"
    if config.is_encoder_decoder:
        return "an encoder-decoder model"
    if len(set((getattr(model, "hf_device_map", None) or {}).values())) > 1:
        return "spread over devices (device_map): its forward's hooks move the tensors"
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return "a sliding attention window"
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return "layers other than full attention"
    inner = getattr(model, "model", None)
    if not all(hasattr(inner, name) for name in ("embed_tokens", "rotary_emb", "layers", "norm")):
        return "not a Llama-family module layout"
    for layer in inner.layers:
        if not (
            all(hasattr(layer, name) for name in _LAYER_PARTS)
            and all(hasattr(layer.self_attn, name) for name in _ATTENTION_PARTS)
            and all(hasattr(layer.mlp, name) for name in _MLP_PARTS)
        ):
            return "not a Llama-family layer layout"
    return None


def lean_forward(model: nn.Module) -> LeanForward | None:
    """``model``'s `LeanForward` (made once, kept beside the model in a weak registry while it lives), or None where
    it does not apply."""
    if model in _OWN_FORWARD:
        return None
    lean = _LEAN_FORWARDS.get(model)
    if lean is None and lean_obstacle(model) is None:
        lean = _LEAN_FORWARDS[model] = LeanForward(len(model.model.layers))
    return lean


def loop_forward(model: nn.Module) -> str:
    """How bild's loop runs ``model``: "compiled" (`compile_drafter`), "lean" or "own"."""
    lean = lean_forward(model)
    return "own" if lean is None else "lean" if lean.compiled_step is None else "compiled"


def keep_own_forward(model: nn.Module) -> nn.Module:
    """Run ``model`` in bild's loop by its own forward, not the lean one (to compare the two, to rule the lean one
    out when a model misbehaves, or where forward hooks on the model itself must see every forward). Returns
    ``model``."""
    if model in _LEAN_FORWARDS and _LEAN_FORWARDS[model].compiled_step is not None:
        raise ValueError("This drafter's step was compiled (bild.compile_drafter), which needs the lean forward.")
    _OWN_FORWARD.add(model)
    return model


@contextlib.contextmanager
def own_forward(model: nn.Module):
    """`keep_own_forward` inside a ``with`` block only (e.g. to time a verifier both ways in one run)."""
    kept = model in _OWN_FORWARD
    keep_own_forward(model)
    try:
        yield model
    finally:
        if not kept:
            _OWN_FORWARD.discard(model)


def compile_drafter(model: PreTrainedModel, backend="inductor") -> PreTrainedModel:
    """Run ``model``'s one-token drafting steps in bild's loop compiled by ``torch.compile(backend=backend)``.

    For a Llama-family drafter (see `lean_obstacle`), typically after `bild.compress_drafter`. The first step
    compiles (about 55 s for the int4 Qwen2.5-Coder-0.5B on 2 CPU cores, about 20 s in a later process, from
    torch's compile cache); each later step skips most of the eager forward's overhead (there 43 ms by the model's
    forward, 37 ms lean, 27 ms compiled; the int8-dynamic one on 2 AVX2 cores 37.6 ms lean, 30.1 compiled). The
    model's own forward (its generate(), stock assisted generation) is not changed. Every compiled drafter's graphs
    share one function's compile cache, which torch caps at its recompile limit (8 graphs: four drafters, each at
    one and at several rows). Returns ``model``.
    """
    reason = "bild.lean.keep_own_forward was called on it" if model in _OWN_FORWARD else lean_obstacle(model)
    if reason is not None:
        raise ValueError(f"bild.compile_drafter cannot compile this drafter's step ({reason}); use it uncompiled.")
    if backend == "inductor" and model.device.type == "cpu" and not any(map(shutil.which, ("g++", "c++", "clang++"))):
        raise ValueError("bild.compile_drafter: torch.compile needs a C++ compiler on CPU and none was found "
                         "(install g++, e.g. `apt install g++`), or use the drafter uncompiled.")  # fmt: skip
    lean_forward(model).compile(backend)
    return model


class LeanForward:
    """A Llama-family decoder's forward over a chunk of tokens, on the model's own modules and `DynamicCache`."""

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.compiled_step = None  # torch.compile'd `decoder_step` for one-token chunks, after `compile`
        self.n_compiled_steps = 0
        self._fused: list[LayerFusions] = []  # each layer's q/k/v and gate/up projections as one layer each: `fused`
        self._made: list[tuple[nn.Module, ...]] = []  # the projections `_fused` was made from
        self._hooks: OrderedDict[int, tuple] = OrderedDict()  # (before, after) around each run: `register_hooks`

    def register_hooks(self, before, after) -> RemovableHandle:
        """Call ``before()`` and ``after()`` around each forward this runs (the model's own forward hooks do not
        see it); ``handle.remove()`` removes them."""
        handle = RemovableHandle(self._hooks)
        self._hooks[handle.id] = (before, after)
        return handle

    def compile(self, backend="inductor") -> None:
        self.compiled_step = torch.compile(decoder_step, dynamic=True, backend=backend)

    def fused(self, inner: nn.Module) -> list[LayerFusions]:
        """Each layer's fused projections (None where the parts are not quantized alike), made again whenever a
        layer's projections were replaced (e.g. by `bild.fit_kernels` after the first step)."""
        projections = [(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.gate_proj,
                        layer.mlp.up_proj) for layer in inner.layers]  # fmt: skip
        if projections != self._made:  # modules compare by identity
            # gate and up fused only for int8-dynamic parts, where each call also quantizes its input: the AVX2 step
            # 6% cheaper; int4 and int8 would copy 105-209 MB for under 1% (docs/measured.md, "Fused q/k/v")
            self._fused = [
                LayerFusions(Fused.of(q, k, v), Fused.of(gate, up) if isinstance(gate, DynamicInt8Linear) else None)
                for q, k, v, gate, up in projections
            ]
            self._made = projections
        return self._fused

    def __call__(
        self, model: PreTrainedModel, input_ids: torch.Tensor, visible: torch.Tensor | None,
        position_ids: torch.Tensor, cache, logits_to_keep: int | None = None,
    ) -> torch.Tensor | None:  # fmt: skip
        """Logits `(batch_size, logits_to_keep or L, V)` of the chunk ``input_ids`` `(batch_size, L)`, its keys and
        values appended to ``cache``; None (nothing run) when ``cache`` is not a plain dynamic cache.

        ``visible`` `(batch_size, S + L)`: which cached slots and chunk tokens each row may see (None: all); each
        token sees, besides, the chunk tokens up to itself. ``position_ids`` `(batch_size, L)`.
        """
        past = cache_past(cache, self.n_layers)
        if past is None:
            return None
        for before, _ in list(self._hooks.values()):
            before()
        inner = model.model
        if self.compiled_step is not None and input_ids.shape[1] == 1 and all(p is not None for p in past):
            if visible is None:  # one graph per batch size: the mask is always given
                visible = torch.ones(input_ids.shape[0], past[0][0].shape[2] + 1, dtype=torch.bool,
                                     device=input_ids.device)  # fmt: skip
            past = [(keys.contiguous(), values.contiguous()) for keys, values in past]  # a cropped cache is a view
            # fresh ids and positions: a view's guards read its base, so a slice would compile another graph
            input_ids, position_ids = (t.clone(memory_format=torch.contiguous_format)
                                       for t in (input_ids, position_ids))  # fmt: skip
            # q, k and v apart: inductor compiles the fused int4 layer into a slower step (65.9 ms against 48.1 apart;
            # eager 53.4 fused; bf16, 300 cached tokens: docs/measured.md, "The verifier's forward")
            hidden, keys, values = self.compiled_step(inner, input_ids, position_ids, visible.bool(), past, None)
            self.n_compiled_steps += 1
        else:
            hidden, keys, values = decoder_step(inner, input_ids, position_ids, visible, past, self.fused(inner))
        for i in range(self.n_layers):
            store_past(cache, i, keys[i], values[i])
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = model.lm_head(hidden)
        for _, after in list(self._hooks.values()):
            after()
        return logits


class Fused(NamedTuple):
    """Projections of one input as one quantized layer (`bild.drafters.concatenated`): a layer's q, k and v (for the
    int4 Qwen2.5 0.5B drafter 15 MB more, made on its first step in 0.4 s), or its gate and up, for fewer rows than
    ``below_rows`` (where the parts hand longer inputs to their dense weights), with each part's output features to
    split by."""

    layer: nn.Module
    below_rows: float
    features: tuple[int, ...]

    @classmethod
    def of(cls, *parts: nn.Module) -> Fused | None:
        layer = concatenated(list(parts))
        if layer is None:
            return None
        below = min((part.dense_from_rows for part in parts if part.dense is not None), default=math.inf)
        return cls(layer, below, tuple(part.out_features for part in parts))

    def takes(self, x: torch.Tensor) -> bool:
        """Whether ``x`` `(..., K)` is short enough for the fused layer."""
        return x.numel() // x.shape[-1] < self.below_rows


class LayerFusions(NamedTuple):
    qkv: Fused | None
    gate_up: Fused | None


def decoder_step(
    inner: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor, visible: torch.Tensor | None,
    past: list[tuple[torch.Tensor, torch.Tensor] | None], fused: list[LayerFusions] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:  # fmt: skip
    """The decoder ``inner`` (``model.model``) over a chunk: the final-normed hidden states `(batch_size, L, D)` and
    every layer's keys and values, the cached ``past`` ones followed by the chunk's. ``fused``: each layer's fused
    projections (`LeanForward.fused`), used where given and the chunk is short enough."""
    hidden = inner.embed_tokens(input_ids)  # [B, L, D]
    cos, sin = inner.rotary_emb(hidden, position_ids)  # [B, L, head_dim]
    cos, sin = cos[:, None], sin[:, None]
    n_past = 0 if past[0] is None else past[0][0].shape[2]
    mask = attention_mask(visible, n_past, input_ids.shape[1])
    keys, values = [], []
    batch_size, length = input_ids.shape
    for i, (layer, layer_past) in enumerate(zip(inner.layers, past, strict=True)):
        attn = layer.self_attn
        heads = (batch_size, length, -1, attn.head_dim)
        x = layer.input_layernorm(hidden)
        qkv, gate_up = fused[i] if fused else (None, None)
        if qkv is not None and qkv.takes(x):
            n_q, n_k, _ = (n // attn.head_dim for n in qkv.features)
            out = qkv.layer(x).view(heads).transpose(1, 2)  # [B, Hq + Hk + Hv, L, head_dim]
            value = out[:, n_q + n_k :]
            if hasattr(attn, "q_norm"):
                query, key = attn.q_norm(out[:, :n_q]), attn.k_norm(out[:, n_q : n_q + n_k])
                query, key = rotate(query, cos, sin), rotate(key, cos, sin)
            else:  # one rotation for the queries and keys together
                rotated = rotate(out[:, : n_q + n_k], cos, sin)
                query, key = rotated[:, :n_q], rotated[:, n_q:]
        else:
            query, key = attn.q_proj(x).view(heads), attn.k_proj(x).view(heads)
            if hasattr(attn, "q_norm"):  # Qwen3: an RMSNorm over each head
                query, key = attn.q_norm(query), attn.k_norm(key)
            query, key = rotate(query.transpose(1, 2), cos, sin), rotate(key.transpose(1, 2), cos, sin)
            value = attn.v_proj(x).view(heads).transpose(1, 2)  # [B, H, L, head_dim]
        if layer_past is not None:
            key, value = torch.cat([layer_past[0], key], dim=2), torch.cat([layer_past[1], value], dim=2)
        keys.append(key)
        values.append(value)
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, is_causal=mask is None and length > 1, scale=attn.scaling,
            enable_gqa=key.shape[1] != query.shape[1],
        )  # fmt: skip
        hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(batch_size, length, -1))
        mlp = layer.mlp
        x = layer.post_attention_layernorm(hidden)
        if gate_up is not None and gate_up.takes(x):
            gate, up = gate_up.layer(x).split(gate_up.features, dim=-1)
        else:
            gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        hidden = hidden + mlp.down_proj(mlp.act_fn(gate) * up)
    return inner.norm(hidden), keys, values


def attention_mask(visible: torch.Tensor | None, n_past: int, length: int) -> torch.Tensor | None:
    """`(batch_size or 1, 1, L, S + L)` bool: chunk token ``i`` sees the ``visible`` slots up to itself, and always
    itself (a padding token would see nothing: its output is never used). None: plain causal attention."""
    if visible is None and (length == 1 or n_past == 0):
        return None
    n_keys = n_past + length
    device = visible.device if visible is not None else None
    columns = torch.arange(n_keys, device=device)
    rows = n_past + torch.arange(length, device=device)
    allowed = columns[None, :] <= rows[:, None]  # [L, S + L]
    if visible is not None:
        allowed = (allowed[None] & visible.bool()[:, None, :]) | (columns[None, None, :] == rows[None, :, None])
    return allowed[:, None] if allowed.dim() == 3 else allowed[None, None]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of ``x`` `(batch_size, H, L, head_dim)`."""
    return x * cos + rotate_half(x) * sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

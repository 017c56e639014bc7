"""`early_exit()`: a drafter made of the large model's first layers and a trained exit, sharing its weights and KV."""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .compat import crop_cache_layers, output_with_cache, run_decoder_layer

# B: batch rows, T: sequence length, L: chunk fed in one forward, S: cache slots, H: hidden size,
# V: vocabulary, k: exit layer, N: decoder layers of the large model.

# Families whose CausalLM is model.model.{embed_tokens, layers, norm, rotary_emb} + lm_head, layers taking a 4-D mask
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")  # the ones that take a 4-D additive mask
ADAPTER_INITS = ("identity", "copy")
LOSSES = ("kl", "ce")
ADAPTER_WEIGHTS = "exit_adapter.safetensors"
ADAPTER_CONFIG = "exit_adapter.json"
MIN_CAPACITY = 64  # sequence indices of hidden states kept per row up front; the buffer doubles when it fills
TARGET_TOP_K = 32  # large-model next-token probabilities kept per position for the adapter's KL
EXIT_LEARNING_RATE = 1e-4  # adapter AdamW step size; 5e-4 was unstable on Qwen2.5-Coder-1.5B


def early_exit(
    large: PreTrainedModel, exit_layer: int, adapter: str | Path | None = None, init: str = "identity"
) -> EarlyExitDrafter:
    """A drafter made of ``large``'s first ``exit_layer`` decoder layers, an adapter layer, its final norm and head.

    Every weight but the adapter's is the large model's own (shared, not copied), and so is the KV cache of
    layers ``< exit_layer`` during BiLD decoding.

    Args:
        large: a Llama/Qwen2/Qwen3-family decoder-only model (eager or sdpa attention).
        exit_layer: k in ``1 .. num_layers - 1``: the drafter runs layers ``0 .. k-1``.
        adapter: a folder written by `EarlyExitDrafter.save_adapter` (None: a new, untrained adapter).
        init: a new adapter's weights: "identity" (output projections zero: it starts as the identity) or
            "copy" (layer ``k-1``'s weights).
    """
    check_supported(large, exit_layer)
    if init not in ADAPTER_INITS:
        raise ValueError(f"init={init!r} is not one of {ADAPTER_INITS}.")
    drafter = EarlyExitDrafter(large, exit_layer, new_adapter(large, exit_layer, init))
    if adapter is not None:
        drafter.load_adapter(adapter)
    return drafter


def check_supported(large: PreTrainedModel, exit_layer: int) -> None:
    """ValueError naming what is supported when ``large`` cannot give an early exit after ``exit_layer`` layers."""
    config = large.config
    model_type = getattr(config, "model_type", None)
    inner = getattr(large, "model", None)
    parts = ("embed_tokens", "layers", "norm", "rotary_emb")
    has_parts = inner is not None and all(hasattr(inner, p) for p in parts) and hasattr(large, "lm_head")
    if config.is_encoder_decoder or model_type not in SUPPORTED_MODEL_TYPES or not has_parts:
        raise ValueError(
            f"bild.early_exit supports decoder-only {'/'.join(SUPPORTED_MODEL_TYPES)} models (model.model.layers, "
            f"model.lm_head), not {type(large).__name__} (model_type {model_type!r}): use a separate small model, "
            "bild.attach(large, small)."
        )
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        raise ValueError(
            "bild.early_exit needs full attention in every layer: load the model with use_sliding_window=False."
        )
    if config._attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"bild.early_exit calls decoder layers with a 4-D mask, which attn_implementation="
            f"{config._attn_implementation!r} cannot take: load the model with attn_implementation='sdpa' (or 'eager')."
        )
    n_layers = len(inner.layers)
    if isinstance(exit_layer, bool) or not isinstance(exit_layer, int) or not 1 <= exit_layer <= n_layers - 1:
        raise ValueError(
            f"exit_layer={exit_layer!r} must be an integer in 1..{n_layers - 1} (the model has {n_layers} layers)."
        )


def new_adapter(large: PreTrainedModel, exit_layer: int, init: str) -> nn.Module:
    """One decoder layer of ``large``'s architecture that caches its KV in slot k (right after the first k layers)."""
    template = large.model.layers[exit_layer - 1]
    adapter = type(template)(large.config, exit_layer)
    if init == "copy":
        adapter.load_state_dict(template.state_dict())
    else:  # zero output projections: the residual stream passes through unchanged until training moves them
        nn.init.zeros_(adapter.self_attn.o_proj.weight)
        nn.init.zeros_(adapter.mlp.down_proj.weight)
    weight = template.input_layernorm.weight
    return adapter.to(device=weight.device, dtype=weight.dtype)


def drafter_config(large: PreTrainedModel, exit_layer: int):
    """A copy of ``large``'s config describing the drafter: ``exit_layer + 1`` layers (the first k, the adapter)."""
    config = copy.deepcopy(large.config)
    config.num_hidden_layers = exit_layer + 1
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[: exit_layer + 1]
    return config


def additive_mask(key_slots: torch.Tensor, query_index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`(B, 1, L, S)` additive attention mask: 0 where a key slot is in use and not after the query, else dtype min.

    Args:
        key_slots: `(B, S)` sequence index held by each key slot, -1 for a slot to ignore.
        query_index: `(B, L)` sequence index of each query.
    """
    key_slots = key_slots[:, None, :]  # [B, 1, S]
    is_visible = (key_slots >= 0) & (key_slots <= query_index[:, :, None])  # [B, L, S]
    mask = torch.zeros(is_visible.shape, dtype=dtype, device=key_slots.device)
    return mask.masked_fill(~is_visible, torch.finfo(dtype).min)[:, None]


@dataclass
class Chunk:
    """The tokens a group of layers has not seen yet, one row each (all `(B, L)` unless said otherwise)."""

    start: torch.Tensor  # [B] the group's n_seen before this chunk
    index: torch.Tensor  # sequence index of each position
    is_fed: torch.Tensor  # bool, a real token of an advancing row
    slot_index: torch.Tensor  # the cache slot's sequence index, -1 for left padding and unfed positions
    position_ids: torch.Tensor  # sequence index - left padding
    new_n_seen: torch.Tensor  # [B] the group's n_seen after this chunk

    @classmethod
    def unseen(cls, state, n_seen: torch.Tensor, is_advancing: torch.Tensor) -> Chunk:
        """Positions ``n_seen[b] .. state.lengths[b] - 1`` of the advancing rows (a `state.BatchState`)."""
        n_feed = torch.where(is_advancing, state.lengths - n_seen, 0)  # [B]
        offsets = torch.arange(int(n_feed.max()), device=n_seen.device)  # [L]
        index = n_seen[:, None] + offsets  # [B, L]
        is_fed = offsets < n_feed[:, None]
        slot_index = torch.where(is_fed & (index >= state.n_pads[:, None]), index, -1)
        position_ids = (index - state.n_pads[:, None]).clamp(min=0)
        return cls(
            n_seen, index, is_fed, slot_index, position_ids, torch.where(is_advancing, state.lengths, n_seen)
        )

    @property
    def length(self) -> int:
        return self.index.shape[1]

    def target_states(self, hidden: torch.Tensor, first_target: torch.Tensor, n_targets: int) -> torch.Tensor:
        """`(B, n_targets, H)` states of the positions predicting ``first_target + i`` (clamped into the chunk)."""
        columns = (first_target - 1 - self.start)[:, None] + torch.arange(n_targets, device=hidden.device)
        columns = columns.clamp(0, self.length - 1)  # [B, n_targets]
        return hidden.gather(1, columns[..., None].expand(-1, -1, hidden.shape[-1]))


@dataclass
class LayerGroup:
    """Layers that read the same tokens: their slots in the shared KV cache and the sequence index each holds."""

    kv: DynamicCache  # the cache holding the group's layers, at their layer indices
    layer_ids: range
    slot_index: torch.Tensor  # [B, S] sequence index per slot, -1: ignore
    n_seen: torch.Tensor  # [B] the group has read seq[:, :n_seen]

    @classmethod
    def empty(cls, kv: DynamicCache, layer_ids: range, batch_size: int, device: torch.device) -> LayerGroup:
        slots = torch.empty(batch_size, 0, dtype=torch.long, device=device)
        return cls(kv, layer_ids, slots, torch.zeros(batch_size, dtype=torch.long, device=device))

    def mask(self, chunk: Chunk, dtype: torch.dtype) -> torch.Tensor:
        """`(B, 1, L, S + L)` mask of the chunk's queries over the group's slots and the chunk itself."""
        return additive_mask(torch.cat([self.slot_index, chunk.slot_index], dim=1), chunk.index, dtype)

    def append(self, chunk: Chunk) -> None:
        self.slot_index = torch.cat([self.slot_index, chunk.slot_index], dim=1)
        self.n_seen = chunk.new_n_seen

    def discard_from(self, keep_len: torch.Tensor) -> None:
        """Forget sequence indices >= ``keep_len[b]``; crop the trailing slots no row uses from the group's layers."""
        self.slot_index = self.slot_index.masked_fill(self.slot_index >= keep_len[:, None], -1)
        self.n_seen = torch.minimum(self.n_seen, keep_len)
        used = (self.slot_index >= 0).any(dim=0).nonzero()
        new_length = int(used[-1]) + 1 if len(used) else 0
        crop_cache_layers(self.kv, self.layer_ids, self.slot_index.shape[1] - new_length)
        self.slot_index = self.slot_index[:, :new_length]


@dataclass
class SharedExitCache:
    """The KV caches of the drafter and the large model, plus the hidden states entering layer k.

    ``kv`` is laid out as the large model's own cache: layers ``0 .. k-1`` are the shared lower layers (written
    once, read by both models), ``k .. N-1`` the large model's upper layers. The adapter keeps its KV in layer
    k of ``adapter_kv`` (as in the drafter's own cache, after its k lower layers). Each group tracks its slots.
    """

    kv: DynamicCache
    adapter_kv: DynamicCache
    lower: LayerGroup
    upper: LayerGroup
    adapter: LayerGroup
    hidden: torch.Tensor  # [B, capacity, H] input of layer k at each sequence index the lower group has read

    @classmethod
    def empty(cls, n_layers: int, exit_layer: int, batch_size: int, hidden: torch.Tensor) -> SharedExitCache:
        device = hidden.device
        kv, adapter_kv = DynamicCache(), DynamicCache()
        return cls(
            kv,
            adapter_kv,
            LayerGroup.empty(kv, range(exit_layer), batch_size, device),
            LayerGroup.empty(kv, range(exit_layer, n_layers), batch_size, device),
            LayerGroup.empty(adapter_kv, range(exit_layer, exit_layer + 1), batch_size, device),
            hidden.new_zeros(batch_size, MIN_CAPACITY, hidden.shape[-1]),
        )

    def store_hidden(self, chunk: Chunk, hidden: torch.Tensor) -> None:
        """Keep the `(B, L, H)` layer-k inputs of the chunk's fed positions."""
        rows, columns = chunk.is_fed.nonzero(as_tuple=True)
        if len(rows) == 0:
            return
        index = chunk.index[rows, columns]
        capacity = self.hidden.shape[1]
        if int(index.max()) >= capacity:
            grown = max(int(index.max()) + 1, 2 * capacity) - capacity
            self.hidden = torch.cat(
                [self.hidden, self.hidden.new_zeros(len(self.hidden), grown, self.hidden.shape[-1])], 1
            )
        self.hidden[rows, index] = hidden[rows, columns]

    def hidden_at(self, index: torch.Tensor) -> torch.Tensor:
        """`(B, L, H)` layer-k inputs at sequence indices `(B, L)` (clamped into the buffer)."""
        index = index.clamp(max=self.hidden.shape[1] - 1)
        return self.hidden.gather(1, index[..., None].expand(-1, -1, self.hidden.shape[-1]))

    def discard_from(self, keep_len: torch.Tensor) -> None:
        """Roll both models back to the first ``keep_len[b]`` tokens of each row (hidden states past it go stale)."""
        for group in (self.lower, self.upper, self.adapter):
            group.discard_from(keep_len)


class EarlyExitDrafter(PreTrainedModel, GenerationMixin):
    """The large model's first k decoder layers, then an adapter layer and the large model's final norm and head.

    The large model is a plain attribute (``drafter.large``), not a submodule: nothing of it is copied, saved,
    moved or trained with the drafter; ``parameters()`` are the adapter's (and a compressed draft head's, see
    `set_output_embeddings`). Works as any small model
    (``bild.attach(large, drafter)``, ``drafter.generate()``); BiLD decoding goes through `bild_decoders`.
    """

    _supports_sdpa = True
    _supports_attention_backend = True

    def __init__(self, large: PreTrainedModel, exit_layer: int, adapter: nn.Module):
        super().__init__(drafter_config(large, exit_layer))
        object.__setattr__(self, "large", large)  # bypasses nn.Module's child registration
        self.exit_layer = exit_layer
        self.adapter = adapter
        self.draft_head = None  # a drafter-only output layer (set_output_embeddings: bild.compress_drafter)
        self.generation_config = copy.deepcopy(large.generation_config)

    def __deepcopy__(self, memo: dict) -> EarlyExitDrafter:
        """A copy with its own adapter over the same large model (shared, never copied)."""
        memo[id(self.large)] = self.large
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return copied

    def save_pretrained(self, *args, **kwargs):
        raise ValueError(
            "An early-exit drafter is the large model's own layers plus an adapter: save the adapter with "
            "drafter.save_adapter(path) and load it with bild.early_exit(large, exit_layer, adapter=path)."
        )

    @property
    def lower_layers(self) -> nn.ModuleList:
        return self.large.model.layers[: self.exit_layer]

    @property
    def upper_layers(self) -> nn.ModuleList:
        return self.large.model.layers[self.exit_layer :]

    def get_input_embeddings(self) -> nn.Module:
        return self.large.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.large.lm_head if self.draft_head is None else self.draft_head

    def set_output_embeddings(self, head: nn.Module) -> None:
        """Draft with ``head`` (e.g. an int4 copy of the large model's, from `bild.compress_drafter`); the large
        model keeps its own for verification, so outputs stay exact."""
        self.draft_head = head

    def tie_weights(self, *args, **kwargs) -> None:
        """Nothing to tie: the embeddings and the head are the large model's, tied (or not) there."""

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """`(B, L, V)` draft logits of `(B, L, H)` final hidden states: the large model's final norm, then the
        drafter's output layer (the large model's unless `set_output_embeddings` gave another)."""
        return self.get_output_embeddings()(self.large.model.norm(hidden))

    def large_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """`(B, L, V)` logits of the large model's last hidden states: its own final norm and output layer."""
        return self.large.lm_head(self.large.model.norm(hidden))

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: DynamicCache | None = None,
        past_key_values: DynamicCache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """A plain forward over `(B, L)` ids after the cache's tokens, for stock generate() and profiling.

        ``attention_mask`` covers cached and new tokens, `(B, S + L)`; BiLD decoding does not come here.
        """
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = DynamicCache()
        n_past = cache.get_seq_length() if cache is not None else 0
        batch_size, length = input_ids.shape
        index = torch.arange(n_past + length, device=input_ids.device).expand(batch_size, -1)  # [B, S + L]
        key_slots = index  # the sequence index of each slot, -1 where the attention mask hides it
        if attention_mask is not None:
            key_slots = index.masked_fill(attention_mask[:, -index.shape[1] :] == 0, -1)
        query_index = index[:, n_past:]  # [B, L]
        position_ids = query_index if position_ids is None else position_ids
        hidden = self.large.model.embed_tokens(input_ids)  # [B, L, H]
        mask = additive_mask(key_slots, query_index, hidden.dtype)
        layers = [*self.lower_layers, self.adapter]
        hidden = run_layers(self.large, layers, hidden, mask, position_ids, cache)
        logits = self.head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        return output_with_cache(CausalLMOutputWithPast, cache if use_cache else None, logits=logits)

    def bild_decoders(self, large_model: PreTrainedModel, inputs, vocab_size: int, batch_size: int):
        """``(large, small, caches)`` for BiLD's loop: two decoders over one `SharedExitCache`."""
        if large_model is not self.large:
            raise ValueError(
                "This early-exit drafter shares layers with another model than the one generating: build it from "
                "the model you call generate() on, bild.early_exit(large, exit_layer)."
            )
        hidden = self.large.model.embed_tokens.weight
        if self.adapter.input_layernorm.weight.device != hidden.device:
            raise ValueError(
                f"The exit adapter is on another device than the large model: call drafter.to({str(hidden.device)!r})."
            )
        cache = SharedExitCache.empty(len(self.large.model.layers), self.exit_layer, batch_size, hidden)
        large = ExitDecoder(self, cache, vocab_size, is_large=True)
        small = ExitDecoder(self, cache, vocab_size, is_large=False)
        return large, small, cache

    def bild_forward_bytes(self) -> int:
        """Bytes of weights one drafter forward reads: layers < k, the adapter, the final norm and the head."""
        modules = [*self.lower_layers, self.adapter, self.large.model.norm, self.get_output_embeddings()]
        return sum(t.numel() * t.element_size() for m in modules for t in (*m.parameters(), *m.buffers()))

    def save_adapter(self, path: str | Path) -> Path:
        """Write the adapter's weights and what it fits (exit layer, architecture) into the folder ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file(
            {name: t.detach().contiguous() for name, t in self.adapter.state_dict().items()},
            path / ADAPTER_WEIGHTS,
        )
        (path / ADAPTER_CONFIG).write_text(json.dumps(self._adapter_fit(), indent=2) + "\n", encoding="utf-8")
        return path

    def load_adapter(self, path: str | Path) -> None:
        """Load weights written by `save_adapter`; ValueError when they were trained for another model or layer."""
        path = Path(path).expanduser()
        if not (path / ADAPTER_WEIGHTS).is_file():
            raise ValueError(
                f"{path} holds no {ADAPTER_WEIGHTS}: pass a folder written by drafter.save_adapter()."
            )
        saved = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        if saved != self._adapter_fit():
            raise ValueError(f"The adapter in {path} was trained for {saved}, not {self._adapter_fit()}: "
                             f"use bild.early_exit(large, {saved.get('exit_layer')}) with its large model.")  # fmt: skip
        self.adapter.load_state_dict(
            load_file(path / ADAPTER_WEIGHTS, device=str(self.adapter.input_layernorm.weight.device))
        )

    def _adapter_fit(self) -> dict:
        config = self.large.config
        return {"exit_layer": self.exit_layer, "model_type": config.model_type, "hidden_size": config.hidden_size,
                "num_hidden_layers": len(self.large.model.layers), "vocab_size": self.large.lm_head.weight.shape[0]}  # fmt: skip


def run_layers(
    model: PreTrainedModel, layers: Sequence[nn.Module], hidden: torch.Tensor, mask: torch.Tensor,
    position_ids: torch.Tensor, cache: DynamicCache | None,
) -> torch.Tensor:  # fmt: skip
    """Run `(B, L, H)` states through ``layers`` in turn, with rotary embeddings of `(B, L)` positions."""
    position_embeddings = model.model.rotary_emb(hidden, position_ids)
    for layer in layers:
        hidden = run_decoder_layer(layer, hidden, mask, position_ids, position_embeddings, cache)
    return hidden


class ExitDecoder:
    """The drafter (``is_large=False``) or the large model over a `SharedExitCache`, with `Decoder.forward`'s contract.

    Both first bring the shared lower layers up to date (embedding and layers < k, once per token), then run
    their own top on the tokens it has not seen, reading layer k's input from the cache: the drafter its
    adapter, the large model its layers >= k. Drafted tokens therefore never pass layers < k twice.
    """

    def __init__(self, drafter: EarlyExitDrafter, cache: SharedExitCache, vocab_size: int, is_large: bool):
        self.drafter = drafter
        self.cache = cache
        self.vocab_size = vocab_size
        self.group = cache.upper if is_large else cache.adapter
        self.layers = drafter.upper_layers if is_large else [drafter.adapter]
        self.head = drafter.large_head if is_large else drafter.head

    def forward(
        self, state, is_advancing: torch.Tensor, first_target: torch.Tensor, n_targets: int
    ) -> torch.Tensor:
        """Read the unseen tokens of the ``is_advancing`` rows; `(B, n_targets, V)` float32 logits (see `Decoder`)."""
        self.run_lower(state, is_advancing)
        chunk = Chunk.unseen(state, self.group.n_seen, is_advancing)
        hidden = self.cache.hidden_at(chunk.index)  # [B, L, H] input of layer k
        hidden = self._run(self.layers, hidden, self.group, chunk)
        logits = self.head(chunk.target_states(hidden, first_target, n_targets))  # [B, n_targets, V]
        return logits[..., : self.vocab_size].float()

    def run_lower(self, state, is_advancing: torch.Tensor) -> None:
        """Embed and run layers < k on the tokens they have not seen; keep their outputs (layer k's input)."""
        chunk = Chunk.unseen(state, self.cache.lower.n_seen, is_advancing)
        if chunk.length == 0:
            return
        input_ids = state.tokens_at(chunk.index).masked_fill(~chunk.is_fed, 0)  # [B, L]
        hidden = self.drafter.large.model.embed_tokens(input_ids)  # [B, L, H]
        hidden = self._run(self.drafter.lower_layers, hidden, self.cache.lower, chunk)
        self.cache.store_hidden(chunk, hidden)

    def _run(self, layers, hidden: torch.Tensor, group: LayerGroup, chunk: Chunk) -> torch.Tensor:
        mask = group.mask(chunk, hidden.dtype)
        hidden = run_layers(self.drafter.large, layers, hidden, mask, chunk.position_ids, group.kv)
        group.append(chunk)
        return hidden


# --- Training the exit adapter by self-distillation ------------------------------------------------------


def train_exit(
    large: PreTrainedModel,
    drafter: EarlyExitDrafter,
    texts_or_token_ids: Sequence,
    *,
    eval_texts_or_token_ids: Sequence | None = None,
    tokenizer=None,
    steps: int = 200,
    lr: float = EXIT_LEARNING_RATE,
    batch_size: int = 4,
    seq_len: int = 256,
    loss: str = "kl",
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Train ``drafter``'s adapter to match the frozen large model; return next-token agreement before and after.

    Each step draws ``batch_size`` windows of ``seq_len`` tokens. The frozen large model runs once per window, the
    first time a step draws it (`TargetCache`): its hidden states at layer k are the adapter's input, its top
    `TARGET_TOP_K` next-token probabilities the target (``loss="kl"``: KL(large || drafter) over them;
    ``"ce"``: cross-entropy on its argmax). Only the adapter is trained (AdamW, float32 master weights).

    Args:
        texts_or_token_ids: strings (with ``tokenizer``) or token id sequences, cut into windows of ``seq_len``.
        eval_texts_or_token_ids: held-out examples for the agreement (None: the last tenth of the examples).
    Returns:
        ``{"before", "after"}``: share of held-out positions where the drafter's argmax is the large model's,
        plus ``first_loss``, ``last_loss``, ``n_train_windows``, ``n_eval_tokens``, ``seconds``.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r} is not one of {LOSSES}.")
    if drafter.large is not large:
        raise ValueError(
            "The drafter was built from another model: use bild.early_exit(large, k) on this one."
        )
    train_examples, eval_examples = split_examples(texts_or_token_ids, eval_texts_or_token_ids)
    pad_id = large.config.pad_token_id if large.config.pad_token_id is not None else 0
    train_ids, train_mask = token_windows(train_examples, tokenizer, seq_len, pad_id)  # [N, T]
    eval_ids, eval_mask = token_windows(eval_examples, tokenizer, seq_len, pad_id)
    started = time.perf_counter()
    device = drafter.adapter.input_layernorm.weight.device
    eval_targets = TargetCache(large, drafter.exit_layer, eval_ids, eval_mask, 1, device)  # argmax, before and after
    before = exit_agreement(drafter, eval_targets, batch_size)
    losses = fit_adapter(large, drafter, train_ids, train_mask, steps, lr, batch_size, loss, seed, progress)
    after = exit_agreement(drafter, eval_targets, batch_size)
    return {
        "before": before, "after": after, "first_loss": losses[0] if losses else math.nan,
        "last_loss": losses[-1] if losses else math.nan, "n_train_windows": len(train_ids),
        "n_eval_tokens": int(eval_mask.sum()), "seconds": time.perf_counter() - started,
    }  # fmt: skip


def split_examples(examples: Sequence, eval_examples: Sequence | None) -> tuple[list, list]:
    """``(train, held out)``: the held-out examples as given, else the last tenth (at least one) of ``examples``."""
    examples = list(examples)
    if eval_examples is not None:
        return examples, list(eval_examples)
    if len(examples) < 2:
        raise ValueError("Give at least two examples (one is held out), or pass eval_texts_or_token_ids.")
    n_eval = max(1, len(examples) // 10)
    return examples[:-n_eval], examples[-n_eval:]


def token_windows(
    examples: Sequence, tokenizer, seq_len: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(N, seq_len)` ids and mask: each example cut into consecutive windows, the last right-padded."""
    windows = []
    for example in examples:
        if isinstance(example, str):
            if tokenizer is None:
                raise ValueError(
                    "Texts need a tokenizer: pass train_exit(..., tokenizer=tokenizer), or token ids."
                )
            example = tokenizer(example, add_special_tokens=False)["input_ids"]
        ids = torch.as_tensor(example, dtype=torch.long).reshape(-1)
        windows += [ids[i : i + seq_len] for i in range(0, len(ids) - 1, seq_len) if len(ids) - i >= 2]
    if not windows:
        raise ValueError("No example has two tokens or more: give longer texts to train the exit on.")
    token_ids = torch.full((len(windows), seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros(len(windows), seq_len, dtype=torch.long)
    for n, window in enumerate(windows):
        token_ids[n, : len(window)] = window
        mask[n, : len(window)] = 1
    return token_ids, mask


def large_targets(large: PreTrainedModel, exit_layer: int, token_ids: torch.Tensor, mask: torch.Tensor):
    """One frozen large forward: ``(h_k [B, T, H] input of layer k, logits [B, T, V])``."""
    with torch.no_grad():
        out = large(input_ids=token_ids, attention_mask=mask, output_hidden_states=True)
    return out.hidden_states[exit_layer], out.logits


def exit_logits(
    drafter: EarlyExitDrafter, adapter: nn.Module, hidden: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """`(B, T, V)` logits of the exit (``adapter``, norm, head) on layer-k inputs `(B, T, H)` of right-padded rows.

    The norm and head weights are used detached: gradients reach the adapter only.
    """
    large = drafter.large
    positions = torch.arange(hidden.shape[1], device=hidden.device).expand(len(hidden), -1)  # [B, T]
    dtype = next(adapter.parameters()).dtype
    causal = additive_mask(positions.masked_fill(mask == 0, -1), positions, dtype)  # [B, 1, T, T]
    hidden = run_layers(large, [adapter], hidden.to(dtype), causal, positions, cache=None).to(large.dtype)
    frozen = {m: {n: p.detach() for n, p in m.named_parameters()} for m in (large.model.norm, large.lm_head)}
    hidden = torch.func.functional_call(large.model.norm, frozen[large.model.norm], (hidden,))
    return torch.func.functional_call(large.lm_head, frozen[large.lm_head], (hidden,))


def distillation_loss(student_logits: torch.Tensor, top_logp: torch.Tensor, top_ids: torch.Tensor,
                      mask: torch.Tensor, loss: str) -> torch.Tensor:  # fmt: skip
    """Mean over real positions of KL(target || student) on the target's top-k (``"kl"``; the target renormalized
    over them) or cross-entropy on its argmax (``"ce"``). ``top_logp``/``top_ids``: `(B, T, K)`, best first."""
    is_real = mask.bool()  # [B, T]
    student = student_logits[is_real].float().log_softmax(dim=-1)  # [n, V]
    ids = top_ids[is_real]  # [n, K]
    if loss == "ce":
        return F.nll_loss(student, ids[:, 0])
    target = top_logp[is_real].float().log_softmax(dim=-1)  # [n, K]
    return (target.exp() * (target - student.gather(-1, ids))).sum(dim=-1).mean()


class TargetCache:
    """The frozen large model's side of each training window, computed the first time a step draws the window:
    layer-k inputs `(T, H)` and the top `top_k` next-token log-probabilities and ids `(T, K)`.

    The large forward is most of a training step on CPU; steps that draw a window again skip it. Memory: one
    `(T, H)` hidden state per window (0.8 MB for T=256, H=1536 in bfloat16).
    """

    def __init__(self, large: PreTrainedModel, exit_layer: int, token_ids: torch.Tensor, mask: torch.Tensor,
                 top_k: int, device: torch.device):  # fmt: skip
        self.large, self.exit_layer, self.top_k, self.device = large, exit_layer, top_k, device
        self.token_ids, self.mask = token_ids, mask  # [N, T]
        self.entries: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def get(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(hidden [B, T, H], top_logp [B, T, K], top_ids [B, T, K])`` of the windows ``rows``."""
        missing = sorted(set(rows) - set(self.entries))
        if missing:
            ids, mask = self.token_ids[missing].to(self.device), self.mask[missing].to(self.device)
            hidden, logits = large_targets(self.large, self.exit_layer, ids, mask)
            top_logp, top_ids = logits.float().log_softmax(dim=-1).topk(min(self.top_k, logits.shape[-1]), dim=-1)
            for n, row in enumerate(missing):
                self.entries[row] = (hidden[n], top_logp[n], top_ids[n])
        hidden, top_logp, top_ids = zip(*(self.entries[row] for row in rows), strict=True)
        return torch.stack(hidden), torch.stack(top_logp), torch.stack(top_ids)


def fit_adapter(
    large: PreTrainedModel, drafter: EarlyExitDrafter, token_ids: torch.Tensor, mask: torch.Tensor, steps: int,
    lr: float, batch_size: int, loss: str, seed: int, progress: bool,
) -> list[float]:  # fmt: skip
    """AdamW on a float32 copy of the adapter, copied back into ``drafter.adapter`` at the end; the losses."""
    device = drafter.adapter.input_layernorm.weight.device
    generator = torch.Generator().manual_seed(seed)
    targets = TargetCache(large, drafter.exit_layer, token_ids, mask, TARGET_TOP_K, device)
    master = copy.deepcopy(drafter.adapter).float().train()
    optimizer = torch.optim.AdamW(master.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    bar = tqdm(range(steps), desc=f"exit adapter (layer {drafter.exit_layer})", disable=not progress)
    with torch.enable_grad():
        for _ in bar:
            rows = torch.randint(len(token_ids), (min(batch_size, len(token_ids)),), generator=generator).tolist()
            hidden, top_logp, top_ids = targets.get(rows)
            row_mask = mask[rows].to(device)  # [B, T]
            step_loss = distillation_loss(exit_logits(drafter, master, hidden, row_mask), top_logp, top_ids,
                                          row_mask, loss)  # fmt: skip
            optimizer.zero_grad()
            step_loss.backward()
            optimizer.step()
            losses.append(step_loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    drafter.adapter.load_state_dict(master.state_dict())
    return losses


def exit_agreement(drafter: EarlyExitDrafter, targets: TargetCache, batch_size: int) -> float:
    """Share of real positions of the ``targets``' windows where the drafter's next token is the large model's."""
    n_agree, n_real = 0, 0
    with torch.no_grad():
        for start in range(0, len(targets.token_ids), batch_size):
            rows = list(range(start, min(start + batch_size, len(targets.token_ids))))
            hidden, _, top_ids = targets.get(rows)
            row_mask = targets.mask[rows].to(targets.device)  # [B, T]
            draft_ids = exit_logits(drafter, drafter.adapter, hidden, row_mask).argmax(dim=-1)  # [B, T]
            is_real = row_mask.bool()
            n_agree += int((draft_ids == top_ids[..., 0])[is_real].sum())
            n_real += int(is_real.sum())
    return n_agree / max(n_real, 1)

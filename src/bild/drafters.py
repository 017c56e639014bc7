"""`compress_drafter()`: a cheaper small model from int8/int4 linear layers and a draft vocabulary.

Each `nn.Linear` (the output layer included) becomes an `Int8Linear` (one scale per output row) or an
`Int4Linear` (asymmetric, a scale and a zero per group of 32 inputs), both weight-only: activations stay in the
model's dtype (bfloat16 or float32), except that a float32 layer feeds its packed matmul in bfloat16 (torch's
float32 kernels are slower than a dense float32 matmul) and casts the result back. The kernels are torch's own
packed CPU matmuls, the fastest measured on the reference CPU (2 AMD EPYC cores, AVX-512 BF16, bf16,
one step after 128 tokens: Qwen2.5-Coder-0.5B 52 ms, int8 23 ms, int4 18 ms; the 1.5B 154 ms);
torchao's int8 weight-only config was 2.8x slower than bf16 there in eager mode. Or, with "int8-dynamic", a
`DynamicInt8Linear`: int8 weights times each input token quantized to 8 bits on the fly (fbgemm's dynamic linear,
float32), the fastest on CPUs without native bf16 math (2 AMD EPYC cores, AVX2 only, float32, after 300 tokens:
a step 40.5 ms against 44.0 int8 and 46.4 int4, a chunk of 8 tokens 62.7 against 141.7 and 116.3). Other devices
get a ValueError (on a GPU an eager drafter step is bound by per-call overhead, not by weight traffic).

Defaults (quantization "auto": int8-dynamic for a float32 drafter where torch has fbgemm, else int4; int4 groups of
32; a draft vocabulary of 32k ids where the vocabulary has 100k or more) are the fastest settings measured that never
lost end to end. In bf16 (lossless BiLD at its defaults on the Qwen2.5-Coder pair, docs/measured.md "Which
drafter") int4 stepped faster than int8, the draft vocabulary that also reads its text was 1.5-5.5% faster on code,
translation and summarization, and groups of 128 were 4-5% faster on code and news but 3% slower on translation
(coarser drafts). Float32 is what `dtype="auto"` picks on CPUs without native bf16 math (AVX2 only), where the
weight-only kernels compute in emulated bf16: there int8-dynamic was 2.6-15.7% faster than int4 end to end
(docs/measured.md, "A real AVX2 machine"). Both Qwen checkpoints were made from 4-bit files, which flatters int4:
prefer "int8" for a drafter whose acceptance drops more.

Private torch operators, used only in this module, each checked before use (`_require_op`, `DynamicInt8Linear._pack`):
- `aten._weight_int8pack_mm(x [M, K], w int8 [N, K], scales [N]) -> [M, N]`, scales in x's dtype;
- `aten._convert_weight_to_int4pack_for_cpu(w int32 [N, K] in 0..15, 1) -> uint8 [N, K/2]` (N % 16 == 0);
- `aten._weight_int4pack_mm_for_cpu(x [M, K], packed, group, scales_and_zeros [K/group, N, 2]) -> [M, N]`,
  dequantizing `w = (q - 8) * scale + zero`;
- `torch._make_per_channel_quantized_tensor(q int8 [N, K], scales [N], zero points [N], 0)`, then
  `quantized.linear_prepack(w, bias)` and `quantized.linear_dynamic(x float32 [M, K], packed, reduce_range)`,
  which quantizes ``x`` with one scale per call (torch marks its quantized tensors deprecated, and 2.13 still
  runs them).

The draft vocabulary (as in FR-Spec) keeps only the `vocab_size` most frequent token ids in the
output layer (ranked by `token_counts`, else by id: BPE vocabularies are built roughly in order of
frequency); the special tokens of the config and generation config (EOS, pad, BOS, decoder start)
are always kept, and so are the ids of the text being decoded: each row's head also computes, from the
original dense rows, the logits of the ids its own text holds (a prompt's identifiers, names the output
made up), which a frequency cut alone would drop (on code, 32k ids without them lost 12 points of
acceptance). In bild's loop the text is each row's tokens; elsewhere (the drafter's own generate(), stock
assisted generation) every token fed since the cache was empty. The pruned layer still returns logits over
the full vocabulary, with the dtype's lowest value at every other id, so softmax gives them probability 0
and argmax or sampling never drafts them. The softmax is thereby renormalized over the allowed tokens, so
each one's probability can only grow: where the unpruned drafter's top token is allowed, the top
probability is at least the unpruned one and the fallback rule (``max(q) < fallback_threshold``) fires less
often; where it was pruned, the drafter proposes its best allowed token instead, and the large model rolls
back or rejects that draft whenever it disagrees. Outputs of a lossless setting (``rollback_threshold=0``)
do not change; only the share of accepted drafts can.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import statistics
import time
import warnings
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

AUTO = "auto"
INT8_DYNAMIC = "int8-dynamic"
QUANTIZATIONS = ("int8", "int4", INT8_DYNAMIC, AUTO, None)
INT4_GROUP_SIZE = 32  # inputs sharing one int4 scale and zero; the CPU kernel needs K % group == 0
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what torch's int4 CPU kernel takes
# vocab_size="auto": the draft vocabulary kept where the output layer is large (Qwen 151,936, Llama 3 128,256,
# Gemma 262,144 ids); measured on the Qwen pair (docs/measured.md, "Which drafter"): +1.5% to +5.5% end to end
AUTO_VOCAB_SIZE = 32768
AUTO_VOCAB_FROM = 100_000
INT4_ROW_MULTIPLE = 16  # the int4 CPU packing needs N % 16 == 0; other layers fall back to int8
# torch's float32 int8/int4 CPU kernels are 4-9x slower than a dense float32 matmul (bf16: 2x faster than
# dense bf16), so float32 layers run their packed matmul in bfloat16 and cast the result back
KERNEL_DTYPE = {torch.float32: torch.bfloat16}
# Rows at which a quantized layer may hand long inputs (the drafter's prompt prefill) to its dense weights: the
# packed kernels' cost grows fast with rows (int4, 64 tokens: 1.8-2.2 single large forwards against 1.0 dense)
PREFILL_ROWS = (8, 16, 32, 64)


class DensePrefill(nn.Module):
    """Mixed into quantized layers: inputs of ``dense_from_rows`` rows or more go through ``dense`` (the layer's
    original weights), fewer through the packed kernel (``_quantized``)."""

    def __init__(self):
        super().__init__()
        self.register_module("dense", None)  # the original nn.Linear, or None
        self.dense_from_rows: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., K] -> [..., N]."""
        if self.dense is not None and x.numel() // x.shape[-1] >= self.dense_from_rows:
            return self.dense(x)
        return self._quantized(x)


@dataclass(frozen=True)
class DrafterCompression:
    """What `compress_drafter` did to a model, kept as ``model.bild_compression``.

    Args:
        quantization: "int8", "int4", "int8-dynamic" or None (what "auto" chose).
        n_int8, n_int4: linear layers now held in int8 (weight-only or dynamic) / int4 (int4 layers the kernel
            cannot take are int8).
        vocab_size: rows kept in the output layer (the full vocabulary when not pruned).
        full_vocab_size: rows of the original output layer.
        n_dense_prefill: quantized layers that run long inputs (the prompt's prefill) on their dense weights.
        group_size: inputs sharing one int4 scale and zero, or None without int4 layers.
    """

    quantization: str | None
    n_int8: int
    n_int4: int
    vocab_size: int
    full_vocab_size: int
    n_dense_prefill: int = 0  # quantized layers that keep their dense weights for long inputs (prefill)
    group_size: int | None = None  # inputs per int4 scale and zero (None: no int4 layer)


def _require_op(name: str) -> torch._ops.OpOverloadPacket:
    """The private aten operator ``name``, or a ValueError saying what to do without it."""
    op = getattr(torch.ops.aten, name, None)
    if op is None:
        raise ValueError(
            f"This torch ({torch.__version__}) has no aten.{name}, which this quantization needs: "
            "upgrade torch (>= 2.6) or pass quantization=None."
        )
    return op


def _int8_rows(weight: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q [N, K] int8 in [-127, 127], scales [N] in scale_dtype)`` with ``weight ~= q * scale`` row by row."""
    w = weight.detach().float()  # [N, K]
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(scale_dtype)  # [N]
    # divide by the rounded scale, so that q * scale is exactly what the kernel multiplies by
    q = torch.round(w / scales.float().clamp(min=1e-30)[:, None]).clamp(-127, 127).to(torch.int8)  # [N, K]
    return q, scales


def _kernel_dtype(linear: nn.Linear) -> torch.dtype:
    return KERNEL_DTYPE.get(linear.weight.dtype, linear.weight.dtype)


class Int8Linear(DensePrefill):
    """A linear layer with int8 weights, one scale per output row; returns the input's dtype."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)  # [N, K] int8 (transformers' T5 leaves int8 weights alone)
        self.register_buffer("scales", scales)  # [N], the kernel's dtype
        self.register_buffer("bias", bias)  # [N] or None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """Symmetric per-row quantization: ``w ~= q * scale``, ``q`` in [-127, 127]."""
        q, scales = _int8_rows(linear.weight, _kernel_dtype(linear))
        bias = None if linear.bias is None else linear.bias.detach().clone()
        _require_op("_weight_int8pack_mm")
        return cls(q, scales, bias)

    @property
    def kernel_dtype(self) -> torch.dtype:
        """The dtype the packed kernel computes in (its scales')."""
        return self.scales.dtype

    def dequantized(self) -> torch.Tensor:
        """`(out_features, in_features)` float32 weights this layer multiplies by."""
        return self.weight.float() * self.scales.float()[:, None]

    def _quantized(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(self.kernel_dtype).contiguous()  # [M, K]
        out = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales).to(x.dtype)  # [M, N]
        if self.bias is not None:
            out += self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


class Int4Linear(DensePrefill):
    """A linear layer with int4 weights, a scale and a zero per group of inputs; returns the input's dtype."""

    weight = None  # no float weight: transformers' T5 checks ``wo.weight`` before casting its input

    def __init__(
        self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, bias: torch.Tensor | None, group: int
    ):
        super().__init__()
        self.out_features = packed.shape[0]
        self.in_features = packed.shape[1] * 2
        self.group_size = group
        self.register_buffer("packed_weight", packed)  # [N, K/2] uint8, the CPU kernel's layout
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # [K/group, N, 2], the kernel's dtype
        self.register_buffer("bias", bias)  # [N] or None

    @staticmethod
    def fits(linear: nn.Linear, group_size: int = INT4_GROUP_SIZE) -> bool:
        """Whether the int4 CPU kernel takes this layer's shape."""
        return linear.out_features % INT4_ROW_MULTIPLE == 0 and linear.in_features % group_size == 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = INT4_GROUP_SIZE) -> Int4Linear:
        """Asymmetric per-group quantization: ``w ~= (q - 8) * scale + zero``, ``q`` in [0, 15]."""
        n, k = linear.weight.shape
        w = linear.weight.detach().float().reshape(n, k // group_size, group_size)  # [N, G, group]
        low, high = w.amin(dim=-1), w.amax(dim=-1)  # [N, G]
        scale = ((high - low) / 15).clamp(min=1e-12).to(_kernel_dtype(linear))
        zero = (low + 8 * scale.float()).to(scale.dtype)  # [N, G], value of q = 8
        q = torch.round((w - zero.float()[..., None]) / scale.float().clamp(min=1e-30)[..., None] + 8)
        q = (
            q.clamp(0, 15).reshape(n, k).to(torch.int32)
        )  # [N, K] (a scale that underflowed to 0 zeroes its group)
        pack = _require_op("_convert_weight_to_int4pack_for_cpu")
        packed = pack(q, 1)  # [N, K/2] uint8
        scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # [G, N, 2]
        bias = None if linear.bias is None else linear.bias.detach().clone()
        _require_op("_weight_int4pack_mm_for_cpu")
        return cls(packed, scales_and_zeros, bias, group_size)

    @property
    def kernel_dtype(self) -> torch.dtype:
        """The dtype the packed kernel computes in (its scales' and zeros')."""
        return self.scales_and_zeros.dtype

    def int4_values(self) -> torch.Tensor:
        """`(out_features, in_features)` int32 ``q`` in [0, 15], read back through the kernel itself (the packed
        layout is the kernel's own and varies with the CPU's vector width): the identity times ``q`` with scale 1
        and zero 8, exact in any float type."""
        dtype = self.kernel_dtype
        ones = torch.tensor([1.0, 8.0], dtype=dtype).expand(*self.scales_and_zeros.shape).contiguous()
        eye = torch.eye(self.in_features, dtype=dtype)
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        return mm(eye, self.packed_weight, self.group_size, ones).T.round().to(torch.int32)  # [N, K]

    def _quantized(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(self.kernel_dtype).contiguous()  # [M, K]
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        out = mm(x2, self.packed_weight, self.group_size, self.scales_and_zeros).to(x.dtype)  # [M, N]
        if self.bias is not None:
            out += self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def fbgemm_available(*ops: str) -> bool:
    """Whether torch's quantized engine is fbgemm's (x86 CPUs) and has the ``torch.ops.quantized`` operators ``ops``."""
    return torch.backends.quantized.engine in ("x86", "fbgemm") and all(hasattr(torch.ops.quantized, op) for op in ops)


# every DynamicInt8Linear by a number, so that a compiled step can name one to the operator below
_DYNAMIC_LAYERS: weakref.WeakValueDictionary[int, DynamicInt8Linear] = weakref.WeakValueDictionary()
_DYNAMIC_KEYS = itertools.count()


def _int8_dynamic_linear(scaled: torch.Tensor, layer: int) -> torch.Tensor:
    """fbgemm's dynamic linear of the `DynamicInt8Linear` numbered ``layer``: the operator
    ``bild::int8_dynamic_linear``, which torch.compile keeps whole (dynamo cannot trace the packed weights, a C++
    object, and would break the graph at each layer). Defined on the low-level `torch.library.Library`: 7 us a call
    against 29 for `custom_op`."""
    return torch.ops.quantized.linear_dynamic(scaled, _DYNAMIC_LAYERS[layer]._packed, True)


_LIBRARY = torch.library.Library("bild", "DEF")
_LIBRARY.define("int8_dynamic_linear(Tensor scaled, int layer) -> Tensor")
_LIBRARY.impl("int8_dynamic_linear", _int8_dynamic_linear, "CPU")


@torch.library.register_fake("bild::int8_dynamic_linear")
def _(scaled: torch.Tensor, layer: int) -> torch.Tensor:
    return scaled.new_empty(scaled.shape[0], _DYNAMIC_LAYERS[layer].out_features)


class DynamicInt8Linear(DensePrefill):
    """A linear layer with int8 weights (one scale per output row) that quantizes each input token to 8 bits on the
    fly and multiplies int8 by int8 (fbgemm's dynamic linear, in float32; the layer casts to and from its input's
    dtype). On 2 AVX2-only cores a drafter step costs less than with the weight-only kernels, which compute in
    emulated bf16, and a chunk of 8 tokens a third as much (docs/measured.md, "A real AVX2 machine").

    fbgemm picks one input scale per call, from the input's least and greatest value. So that each token gets its
    own, whatever the other tokens of its chunk or rows of its batch, the layer divides every token by its largest
    magnitude and appends the inputs +1 and -1 (times zero weights): every call's range is then [-1, 1], and the
    output is multiplied back by each token's magnitude. A token's output is the same bit for bit alone or in any
    chunk or batch.
    """

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, keep_weight: bool = True):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)  # [N, K] int8
        self.register_buffer("scales", scales)  # [N] float32
        self.register_buffer("bias", bias)  # [N] float32 or None
        self.register_buffer("ends", torch.tensor([1.0, -1.0]), persistent=False)  # appended to every token
        self._packed = self._pack()
        self._number()
        if not keep_weight:  # fbgemm's packed copy alone: a layer that is never saved, copied or dequantized
            self.weight = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> DynamicInt8Linear:
        """Symmetric per-row quantization of the weights: ``w ~= q * scale``, ``q`` in [-127, 127]."""
        q, scales = _int8_rows(linear.weight, torch.float32)
        bias = None if linear.bias is None else linear.bias.detach().float().clone()
        return cls(q, scales, bias)

    @staticmethod
    def available() -> bool:
        """Whether this torch runs fbgemm's dynamic linear (x86 CPUs)."""
        return fbgemm_available("linear_prepack", "linear_dynamic")

    def _pack(self):
        """fbgemm's packed weights: ours, then two zero columns for the appended inputs +1 and -1."""
        if not self.available():
            raise ValueError(f"This torch ({torch.__version__}, quantized engine {torch.backends.quantized.engine!r}) "
                             f"has no fbgemm dynamic linear, which quantization={INT8_DYNAMIC!r} needs: use 'int8' or "
                             "'int4'.")  # fmt: skip
        weight = torch.cat([self.weight, self.weight.new_zeros(self.out_features, 2)], dim=1)  # [N, K + 2]
        zero_points = torch.zeros(self.out_features, dtype=torch.long)
        try:
            with warnings.catch_warnings():  # torch calls quantized tensors deprecated; this kernel still takes them
                warnings.simplefilter("ignore", UserWarning)
                qweight = torch._make_per_channel_quantized_tensor(weight, self.scales.double(), zero_points, 0)
            return torch.ops.quantized.linear_prepack(qweight, None)
        except RuntimeError as err:
            raise ValueError(f"quantization={INT8_DYNAMIC!r} needs torch's fbgemm (x86) quantized engine, which could "
                             f"not take it here ({err}): use 'int8' or 'int4'.") from err  # fmt: skip

    def __getstate__(self):  # the packed weights are a C++ object: packed again on copy or unpickling
        return {**self.__dict__, "_packed": None}

    def __setstate__(self, state):
        super().__setstate__(state)
        self._packed = self._pack()
        self._number()

    def _number(self) -> None:
        self._key = next(_DYNAMIC_KEYS)
        _DYNAMIC_LAYERS[self._key] = self

    @property
    def kernel_dtype(self) -> torch.dtype:
        return torch.float32

    def dequantized(self) -> torch.Tensor:
        """`(out_features, in_features)` float32 weights this layer multiplies by."""
        return self.weight.float() * self.scales[:, None]

    def _quantized(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float()  # [M, K]
        magnitude = torch.linalg.vector_norm(x2, ord=math.inf, dim=-1, keepdim=True).clamp_(min=1e-30)  # [M, 1]
        scaled = torch.cat([x2 / magnitude, self.ends.expand(len(x2), 2)], dim=-1)  # [M, K + 2], each in [-1, 1]
        # reduce_range as torch's own dynamic linear on x86: 7-bit inputs, so AVX2's int16 sums cannot saturate
        if torch.compiler.is_compiling():
            out = torch.ops.bild.int8_dynamic_linear(scaled, self._key)  # [M, N]
        else:
            out = torch.ops.quantized.linear_dynamic(scaled, self._packed, True)  # [M, N]
        out = out.mul_(magnitude) if self.bias is None else torch.addcmul(self.bias, out, magnitude)  # [M, N]
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def concatenated(layers: list[nn.Module]) -> DensePrefill | None:
    """One quantized layer whose output is ``torch.cat([layer(x) for layer in layers], dim=-1)``, computed by one
    packed matmul (a step's q, k and v projections: one kernel call instead of three, 48 us less per layer at one
    token), with the same numbers bit for bit: each output row keeps its own quantized values, scale and zero, and
    the kernel sums each row's products in the same order whatever the rows beside it. None unless every layer is
    an `Int4Linear` (one group size), every one an `Int8Linear` or every one a `DynamicInt8Linear`, all with one
    kernel dtype and input size, and all with a bias or none. The result copies the parts' weights (an int8-dynamic
    one keeps only fbgemm's packed copy: it cannot be copied or saved) and has no dense ones: feed it fewer rows than
    the parts' `dense_from_rows`."""
    kinds = {(type(layer), getattr(layer, "group_size", None), getattr(layer, "kernel_dtype", None), layer.in_features,
              layer.bias is None) for layer in layers}  # fmt: skip
    if len(kinds) != 1 or next(iter(kinds))[0] not in (Int4Linear, Int8Linear, DynamicInt8Linear):
        return None
    bias = None if layers[0].bias is None else torch.cat([layer.bias for layer in layers])
    if isinstance(layers[0], Int4Linear):
        pack = _require_op("_convert_weight_to_int4pack_for_cpu")
        packed = pack(torch.cat([layer.int4_values() for layer in layers]), 1)  # [N, K/2]
        scales_and_zeros = torch.cat([layer.scales_and_zeros for layer in layers], dim=1)  # [G, N, 2]
        return Int4Linear(packed, scales_and_zeros, bias, layers[0].group_size)
    weight, scales = torch.cat([layer.weight for layer in layers]), torch.cat([layer.scales for layer in layers])
    if isinstance(layers[0], DynamicInt8Linear):  # bild's loop only runs it: fbgemm's packed copy is enough
        return DynamicInt8Linear(weight, scales, bias, keep_weight=False)
    return Int8Linear(weight, scales, bias)


class PrunedHead(nn.Module):
    """An output layer computing only the kept token ids' logits, scattered into the full vocabulary.

    Every other id gets the dtype's lowest value, so its probability is 0 and it is never drafted, unless the
    text being decoded holds it: each row also gets the logits of the ids its text holds that the kept ones
    lack (identifiers copied from the prompt, names the text made up), from the dense rows of
    ``source_weight``. In bild's loop the text is each row's tokens (`reading`); elsewhere (the drafter's own
    generate(), stock assisted generation) it is every token the model was fed since its cache was empty
    (`hear_inputs`, a forward pre-hook that `compress_drafter` installs). An encoder-decoder drafter's text also
    holds its source, the ids its encoder last read (`hear_source`, a pre-hook on the encoder), for every row
    alike (rows of a batch may be decoded one at a time after one encoder pass over all of them): a summary
    copies names from its article, a translation numbers and names from its sentence.
    """

    weight = None  # the full-size weight is gone: read the vocabulary size from ``out_features``

    def __init__(self, kept_head: nn.Module, kept_ids: torch.Tensor, out_features: int, source_weight: torch.Tensor):
        super().__init__()
        self.kept_head = kept_head  # [K] -> [V'] rows of the kept ids, maybe quantized
        self.register_buffer("kept_ids", kept_ids)  # [V'] ascending token ids
        is_kept = torch.zeros(out_features, dtype=torch.bool, device=kept_ids.device)
        self.register_buffer("is_kept", is_kept.index_fill_(0, kept_ids, True), persistent=False)  # [V]
        # [V, K] the original dense output rows (the tied input embedding shares them); not saved twice
        self.register_buffer("source_weight", source_weight, persistent=False)
        self.in_features = kept_head.in_features
        self.out_features = out_features  # V, the full vocabulary
        self.text: torch.Tensor | None = None  # [B, V] ids each row's text holds, set by `reading`
        self.heard: torch.Tensor | None = None  # [B, V] ids fed since the cache was empty, outside `reading`
        self.source: torch.Tensor | None = None  # [V] ids the encoder last read, all rows (encoder-decoder drafters)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, ..., K] -> logits [B, ..., V]."""
        kept_logits = self.kept_head(hidden)  # [B, ..., V']
        lowest = torch.finfo(kept_logits.dtype).min
        logits = kept_logits.new_full((*kept_logits.shape[:-1], self.out_features), lowest)  # [B, ..., V]
        logits.index_copy_(-1, self.kept_ids, kept_logits)
        text = self.text
        if text is None and self.heard is not None and len(self.heard) == len(hidden):
            text = self.heard
        ids, row_holds = self._missing(text)  # [E], [B, E]
        if len(ids):
            extra = F.linear(hidden, self.source_weight[ids].to(hidden.dtype)).to(logits.dtype)  # [B, ..., E]
            is_held = row_holds.reshape(row_holds.shape[0], *[1] * (hidden.dim() - 2), -1)  # [B, 1.., E]
            logits.index_copy_(-1, ids, extra.masked_fill(~is_held, lowest))
        return logits

    def _holds(self, token_ids: torch.Tensor, is_text: torch.Tensor) -> torch.Tensor:
        """`(B, V)` bool: the ids among ``token_ids`` `(B, S)` where ``is_text``."""
        holds = torch.zeros(len(token_ids), self.out_features + 1, dtype=torch.bool, device=token_ids.device)
        holds.scatter_(1, torch.where(is_text, token_ids, self.out_features).clamp(0, self.out_features), True)
        return holds[:, :-1]  # column V: not text

    def _missing(self, holds: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids [E], row_holds [B, E])``: the ids some row's text holds (its ``holds`` `(B, V)`, or None: no
        text), or the source does, that the kept ones lack."""
        if self.source is not None:
            holds = self.source[None] if holds is None else holds | self.source  # [B or 1, V]
        if holds is None:
            return self.kept_ids[:0], self.is_kept[None, :0]
        holds = holds & ~self.is_kept  # [B, V]
        ids = holds.any(0).nonzero().squeeze(1)  # [E]
        return ids, holds[:, ids]

    @contextlib.contextmanager
    def reading(self, token_ids: torch.Tensor, lengths: torch.Tensor):
        """Within this context, row ``b`` may also draft the ids in ``token_ids[b, :lengths[b]]``.

        token_ids: `(batch_size, S)`; lengths: `(batch_size,)`.
        """
        is_text = torch.arange(token_ids.shape[1], device=token_ids.device) < lengths[:, None]  # [B, S]
        self.text = self._holds(token_ids, is_text)
        try:
            yield
        finally:
            self.text = None

    def hear(self, token_ids: torch.Tensor, is_new_text: bool) -> None:
        """Remember ``token_ids`` `(B, S)` as text (forgetting what came before when ``is_new_text``); nothing
        inside `reading`, whose text wins."""
        if self.text is not None:
            return
        holds = self._holds(token_ids, torch.ones_like(token_ids, dtype=torch.bool))
        if is_new_text or self.heard is None or self.heard.shape != holds.shape:
            self.heard = holds
        else:
            self.heard = self.heard | holds


def hear_inputs(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a drafter with a `PrunedHead`: its head hears the decoder's input ids; an empty or
    absent cache starts a new text."""
    token_ids = kwargs.get("decoder_input_ids" if model.config.is_encoder_decoder else "input_ids")
    if token_ids is None and args and not model.config.is_encoder_decoder:
        token_ids = args[0]
    if not isinstance(token_ids, torch.Tensor) or token_ids.dim() != 2:
        return  # embeddings fed instead of ids: no text to hear
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    is_new_text = cache is None or not hasattr(cache, "get_seq_length") or cache.get_seq_length() == 0
    model.get_output_embeddings().hear(token_ids, is_new_text)


def hear_source(head: PrunedHead, encoder: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of an encoder-decoder drafter's encoder: ``head`` hears the source ids (every row's) as
    part of each row's text until the encoder runs again; embeddings fed instead of ids: no source."""
    token_ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(token_ids, torch.Tensor) or token_ids.dim() != 2:
        head.source = None
        return
    head.source = head._holds(token_ids, torch.ones_like(token_ids, dtype=torch.bool)).any(0)  # [V]


def reading_text(model: nn.Module, token_ids: torch.Tensor, lengths: torch.Tensor):
    """`PrunedHead.reading` for a drafter with a pruned output layer; a null context for any other model."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, PrunedHead):
        return head.reading(token_ids, lengths)
    return contextlib.nullcontext()


def special_token_ids(model: nn.Module) -> set[int]:
    """EOS, pad, BOS and decoder-start ids named by the model's config and generation config."""
    ids: set[int] = set()
    configs = [model.config.get_text_config(), getattr(model, "generation_config", None)]
    for config in filter(None, configs):
        for name in ("eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id"):
            value = getattr(config, name, None)
            values = value if isinstance(value, (list, tuple)) else [value]
            ids.update(int(v) for v in values if v is not None)
    return ids


def _count_tokens(token_counts, n_vocab: int) -> torch.Tensor:
    """`(n_vocab,)` float counts from counts per id or from token-id sequences to count."""
    if isinstance(token_counts, Mapping):  # a tokenizer's output
        token_counts = token_counts["input_ids"]
    if isinstance(token_counts, torch.Tensor) and token_counts.dim() == 1:
        counts = token_counts
    elif isinstance(token_counts, torch.Tensor) and token_counts.dim() == 2:
        return _count_tokens(list(token_counts), n_vocab)
    elif len(token_counts) > 0 and hasattr(token_counts[0], "__len__"):
        ids = torch.cat([torch.as_tensor(row, dtype=torch.long).reshape(-1) for row in token_counts])  # [n]
        if len(ids) and (ids.min() < 0 or ids.max() >= n_vocab):
            raise ValueError(
                f"token_counts holds token ids outside [0, {n_vocab}): tokenize with the drafter's tokenizer."
            )
        return torch.bincount(ids, minlength=n_vocab).float()
    else:
        counts = torch.as_tensor(token_counts)
    if counts.shape != (n_vocab,):
        raise ValueError(
            f"token_counts has shape {tuple(counts.shape)} but the drafter has {n_vocab} output rows: pass one count "
            "per token id, or a list of token-id sequences to count."
        )
    return counts.float()


def draft_vocabulary(model: nn.Module, vocab_size: int, token_counts=None) -> torch.Tensor:
    """`(vocab_size,)` ascending token ids to keep: the special tokens, then the most frequent ids.

    Args:
        token_counts: `(V,)` counts per token id, or token-id sequences (e.g. a tokenized corpus) to count;
            None ranks ids by value (BPE vocabularies are built roughly in order of frequency).
            Ties go to the lower id.
    """
    n_vocab = model.get_output_embeddings().out_features
    specials = sorted(i for i in special_token_ids(model) if 0 <= i < n_vocab)
    if not len(specials) <= vocab_size <= n_vocab:
        raise ValueError(
            f"vocab_size={vocab_size} must lie between the {len(specials)} special tokens {specials} and the "
            f"{n_vocab} rows of the drafter's output layer."
        )
    if token_counts is None:
        ranked = torch.arange(n_vocab)
    else:
        counts = _count_tokens(token_counts, n_vocab)  # [V]
        ranked = torch.sort(-counts, stable=True).indices  # [V] most frequent first
    is_kept = torch.zeros(n_vocab, dtype=torch.bool)
    is_kept[specials] = True
    others = ranked[~is_kept[ranked]][: vocab_size - len(specials)]
    is_kept[others] = True
    return is_kept.nonzero().squeeze(1)  # [vocab_size]


def _quantize(
    linear: nn.Linear, quantization: str | None, crossovers: dict | None = None, group_size: int = INT4_GROUP_SIZE
) -> nn.Module:
    """``linear`` quantized; with ``crossovers`` (a dict shared by the layers of one model), it keeps ``linear`` for
    inputs of as many rows as the timing of its shape says the dense weights are faster from (if any)."""
    if quantization == "int4" and Int4Linear.fits(linear, group_size):
        quantized = Int4Linear.from_linear(linear, group_size)
    elif quantization in ("int4", "int8"):
        quantized = Int8Linear.from_linear(linear)
    elif quantization == INT8_DYNAMIC:
        quantized = DynamicInt8Linear.from_linear(linear)
    else:
        return linear
    if crossovers is not None:
        shape = (type(quantized), linear.in_features, linear.out_features, linear.weight.dtype)
        if shape not in crossovers:
            crossovers[shape] = _dense_crossover(quantized, linear)
        if crossovers[shape] is not None:
            quantized.dense, quantized.dense_from_rows = linear, crossovers[shape]
    return quantized


@torch.inference_mode()
def _dense_crossover(quantized: DensePrefill, linear: nn.Linear, repeats: int = 5) -> int | None:
    """The fewest rows (of `PREFILL_ROWS`) at which ``linear`` runs faster than ``quantized`` here, or None."""

    def ms(layer, x):
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            layer(x)
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:])

    for rows in PREFILL_ROWS:
        x = torch.randn(rows, linear.in_features, dtype=linear.weight.dtype, device=linear.weight.device)
        if ms(linear, x) < ms(quantized._quantized, x):
            return rows
    return None


def _keep_rows(linear: nn.Linear, kept_ids: torch.Tensor) -> nn.Linear:
    """A new `nn.Linear` with only the rows ``kept_ids`` (the original weight, maybe tied, is untouched)."""
    rows = nn.Linear(linear.in_features, len(kept_ids), bias=linear.bias is not None, device="meta")
    rows.weight = nn.Parameter(linear.weight.detach()[kept_ids].clone(), requires_grad=False)
    if linear.bias is not None:
        rows.bias = nn.Parameter(linear.bias.detach()[kept_ids].clone(), requires_grad=False)
    return rows


def auto_quantization(weight: torch.Tensor) -> str | None:
    """What ``quantization="auto"`` picks for a drafter whose weights are like ``weight``: None off the CPU (the
    packed kernels are CPU only; the draft vocabulary still applies); "int8-dynamic" for float32 weights where torch
    has fbgemm's dynamic linear (x86: what `dtype="auto"` loads on CPUs without native bf16 math, where the
    weight-only kernels compute in emulated bf16; measured on AVX2: docs/measured.md, "A real AVX2 machine");
    else "int4"."""
    if weight.device.type != "cpu":
        return None
    return INT8_DYNAMIC if weight.dtype == torch.float32 and DynamicInt8Linear.available() else "int4"


def _check_arguments(
    model: nn.Module, quantization, linears: list[tuple[str, nn.Linear]], vocab_size, group_size
) -> None:
    if hasattr(model, "bild_compression"):
        raise ValueError(
            f"This drafter is already compressed ({model.bild_compression}): compress a freshly loaded model instead."
        )
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"Unknown quantization {quantization!r}: use one of {QUANTIZATIONS}.")
    if isinstance(vocab_size, bool) or not (vocab_size in (None, AUTO) or isinstance(vocab_size, int)):
        raise ValueError(f"vocab_size={vocab_size!r}: use a number of token ids, None (all of them) or 'auto'.")
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size={group_size!r} is not one the int4 CPU kernel takes: use one of {INT4_GROUP_SIZES}.")
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layers to compress.")
    device = linears[0][1].weight.device
    if quantization not in (None, AUTO) and device.type != "cpu":
        raise ValueError(
            f"quantization={quantization!r} runs on CPU only (torch's packed kernels), but the drafter is on {device}: "
            "pass quantization=None there (the draft vocabulary still applies), or compress on CPU."
        )
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{type(model).__name__}'s output layer is {type(head).__name__}, not an nn.Linear.")


@torch.no_grad()
def compress_drafter(
    small: nn.Module, quantization: str | None = AUTO, vocab_size: int | str | None = "auto", token_counts=None,
    dense_prefill: bool = True, group_size: int = INT4_GROUP_SIZE,
) -> nn.Module:
    """Make a small (drafter) model cheaper to run, in place, and return it.

    Args:
        small: a transformers model (decoder-only or encoder-decoder) whose output layer is an nn.Linear.
        quantization: "int4" (group ``group_size``; layers the kernel cannot take get int8), "int8" (per-row
            scales), "int8-dynamic" (`DynamicInt8Linear`), None, or "auto" (default: `auto_quantization`); all but
            None on CPU only.
        vocab_size: keep only this many output rows (special tokens + most frequent ids; in bild's loop and
            wherever the drafter hears its text, the ids the text holds as well, an encoder-decoder's source
            included); None keeps all; "auto" (default): `AUTO_VOCAB_SIZE` where the output layer has at least
            `AUTO_VOCAB_FROM` rows, else all.
        token_counts: `(V,)` counts per token id, or token-id sequences to count; None ranks by token id.
        dense_prefill: keep each layer's original weights for long inputs (the prompt's prefill), from the number
            of rows at which timing its shape here shows them faster than the packed kernel (if any). Memory: the
            dense weights stay alive; pass False to keep only the quantized ones.
        group_size: inputs sharing one int4 scale and zero (a divisor of every layer's input size, else that layer
            gets int8): larger groups read fewer bytes per step and round a little more coarsely.

    The logits keep their full `(..., V)` shape. What was done is recorded as ``small.bild_compression``.
    """
    linears = [(name, m) for name, m in small.named_modules() if isinstance(m, nn.Linear)]
    _check_arguments(small, quantization, linears, vocab_size, group_size)
    if quantization == AUTO:
        quantization = auto_quantization(linears[0][1].weight)
    head = small.get_output_embeddings()
    n_vocab = head.out_features
    if vocab_size == AUTO:
        vocab_size = AUTO_VOCAB_SIZE if n_vocab >= AUTO_VOCAB_FROM else None
    kept_ids = None if vocab_size is None else draft_vocabulary(small, vocab_size, token_counts)
    if kept_ids is not None and len(kept_ids) == n_vocab:
        kept_ids = None  # every row kept: nothing to prune
    crossovers = {} if dense_prefill else None
    for name, linear in linears:
        if linear is head:
            continue
        replace_module(small, name, _quantize(linear, quantization, crossovers, group_size))
    new_head = head if kept_ids is None else _keep_rows(head, kept_ids.to(head.weight.device))
    new_head = _quantize(new_head, quantization, crossovers, group_size)
    if kept_ids is not None:  # the original rows stay readable for ids the decoded text holds
        new_head = PrunedHead(new_head, kept_ids.to(head.weight.device), n_vocab, head.weight.detach())
    small.set_output_embeddings(new_head)
    if kept_ids is not None:
        small.register_forward_pre_hook(hear_inputs, with_kwargs=True)
        if small.config.is_encoder_decoder:
            small.get_encoder().register_forward_pre_hook(functools.partial(hear_source, new_head), with_kwargs=True)
    n_int4 = sum(isinstance(m, Int4Linear) for m in small.modules())
    n_int8 = sum(isinstance(m, (Int8Linear, DynamicInt8Linear)) for m in small.modules())
    n_dense = sum(isinstance(m, DensePrefill) and m.dense is not None for m in small.modules())
    small.bild_compression = DrafterCompression(
        quantization, n_int8, n_int4, n_vocab if kept_ids is None else len(kept_ids), n_vocab, n_dense,
        group_size if n_int4 else None,
    )
    return small


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where the submodule called ``name`` (dotted) is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)

"""Machine fit: a model's linear layers on the fastest kernel this machine has, chosen by measurement.

On a few CPU cores the kernel, not the algorithm, sets BiLD's price: a verification forward over a few
tokens should cost little more than a single-token one (the weights are read once either way), but torch's
default float32 path (MKL) costs about twice a single-token forward for 2 tokens on an AVX2-only CPU.
Two paths for every ``nn.Linear`` keep its numbers (`PATHS`, timed and chosen by default):

- ``"stock"``: ``F.linear`` as torch dispatches it (MKL in float32 on x86 CPUs);
- ``"onednn"``: the weight reordered once into oneDNN's blocked layout (``mkldnn._reorder_linear_weight``,
  packed for a chunk of `CHUNK_ROWS` rows) and multiplied by ``mkldnn._linear_pointwise``, the path
  torch.compile's weight freezing takes on CPUs, here without compiling anything.

A third changes them, so it runs only where a user names it (`HALF`):

- ``"fp16"``: a float32 model's weights stored in float16 and multiplied in float32 by fbgemm's fp16 GEMM
  (``quantized.linear_dynamic_fp16``; x86 CPUs): half the bytes a step reads, as OpenVINO keeps a model's
  weights by default. Each weight rounds to float16 (a bf16 checkpoint's weight exactly where its magnitude lies
  in [6.1e-5, 65504]), and a row's output depends, at float32 rounding, on how many rows share its call, as in
  bf16.

`fit_kernels` times the model's own forward over 1 token and over `CHUNK_ROWS` tokens after a short
context on each path and keeps the path with the smaller sum (the decoding step and the verification
chunk). The choice is stored under ``$BILD_HOME/fit`` per model shape and machine (`machine_key`), so
later loads pack without timing. Timing happens here, once, never during generation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .drafters import fbgemm_available, replace_module
from .home import fit_file, write_json
from .timing import forwards_ms, machine_key, model_device

logger = logging.getLogger(__name__)

PATHS = ("stock", "onednn")  # the same numbers: timed and chosen by default
HALF = "fp16"  # float16 weights: chosen only when named
ALL_PATHS = (*PATHS, HALF)
FP16_MAX = 65504.0  # the largest float16: a layer with a larger weight stays as it is
CHUNK_ROWS = 8  # rows of a typical verification chunk: what oneDNN weights are packed for, and timed at
FIT_CONTEXT = 32  # cached tokens before the timed forwards
FIT_REPEATS = 3


def _onednn_ops():
    """``(reorder, linear)`` oneDNN operators, or None where this torch build lacks them."""
    mkldnn = torch.ops.mkldnn
    try:
        return mkldnn._reorder_linear_weight, mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and _onednn_ops() is not None


def fp16_available() -> bool:
    """Whether this torch has fbgemm's fp16 GEMM (x86 CPUs)."""
    return fbgemm_available("linear_prepack_fp16", "linear_dynamic_fp16", "linear_unpack_fp16")


class PackedLinear(nn.Module):
    """An ``nn.Linear`` whose weight lives packed for one kernel (`OneDNNLinear`, `HalfLinear`); inference only.

    The packed weight is opaque (no storage a state dict could hold): it is a plain attribute, copied by
    `copy.deepcopy` through its dense form, and saved in state dicts as a dense float32 ``weight``.
    """

    weight = None  # no dense weight kept (transformers' T5 checks ``wo.weight`` before casting its input)
    bytes_per_weight = 4

    def __init__(self, dense_weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = dense_weight.shape
        self.register_buffer("bias", None if bias is None else bias.detach().clone())  # [N] or None
        self.packed = self._pack(dense_weight.detach().contiguous())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        return cls(linear.weight, linear.bias)

    def _pack(self, weight: torch.Tensor):
        raise NotImplementedError

    def dense_weight(self) -> torch.Tensor:
        """`(out_features, in_features)` float32: the weights this layer multiplies by."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes of weight a forward reads (the packed weight is not a parameter or buffer)."""
        return self.out_features * self.in_features * self.bytes_per_weight

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the same weights."""
        weight = self.dense_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.clone(), requires_grad=False)
        return linear

    def __deepcopy__(self, memo):
        copied = type(self)(self.dense_weight(), self.bias)
        copied.train(self.training)
        return copied

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.dense_weight()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class OneDNNLinear(PackedLinear):
    """The ``"onednn"`` path: the weight in oneDNN's blocked layout, packed for a chunk of `CHUNK_ROWS` rows. The
    same numbers as ``F.linear`` up to float rounding, and a row's output is the same in any chunk."""

    def _pack(self, weight: torch.Tensor):
        reorder, _ = _onednn_ops()
        return reorder(weight, CHUNK_ROWS)  # [N, K] opaque oneDNN layout

    def dense_weight(self) -> torch.Tensor:
        return self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., K] -> [..., N]."""
        _, linear = _onednn_ops()
        out = linear(x.reshape(-1, self.in_features), self.packed, self.bias, "none", [], "")  # [M, N]
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, onednn (rows hint {CHUNK_ROWS})"


class HalfLinear(PackedLinear):
    """The ``"fp16"`` path: float16 weights multiplied in float32 by fbgemm's fp16 GEMM (each weight read as two
    bytes and widened in registers), for float32 inputs. On 2 AVX2-only cores the Qwen2.5-Coder-1.5B steps in
    123 ms against 233 on oneDNN float32 (docs/measured.md, "The large model in float16 weights")."""

    bytes_per_weight = 2

    def _pack(self, weight: torch.Tensor):
        return torch.ops.quantized.linear_prepack_fp16(weight.float(), self.bias)

    def dense_weight(self) -> torch.Tensor:
        return torch.ops.quantized.linear_unpack_fp16(self.packed)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., K] float32 -> [..., N]."""
        out = torch.ops.quantized.linear_dynamic_fp16(x.reshape(-1, self.in_features), self.packed)  # [M, N]
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp16 weights"


@dataclass(frozen=True)
class KernelFit:
    """What `fit_kernels` chose for a model, kept as ``model.bild_kernels``.

    path: one of `ALL_PATHS`: "stock", "onednn" or "fp16".
    ms: per path timed, ``{tokens fed: milliseconds}`` of one forward after `FIT_CONTEXT` cached tokens
        (empty when the choice came from the stored file or nothing was timed).
    reason: why this path, in words.
    """

    path: str
    ms: dict
    reason: str


def model_fingerprint(model: nn.Module) -> dict:
    """A model's shape as far as cost goes: its config (names and paths left out), compression and kernels."""
    config = model.config.to_dict()
    shape = {k: v for k, v in config.items() if not k.startswith("_") and k not in ("transformers_version", "dtype", "torch_dtype")}
    fingerprint = {"config": hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:16]}
    packed = sum(m.out_features * m.in_features for m in model.modules() if isinstance(m, PackedLinear))
    fingerprint["parameters"] = sum(p.numel() for p in model.parameters()) + packed
    compression = getattr(model, "bild_compression", None)
    if compression is not None:
        fingerprint["compression"] = asdict(compression)
    fingerprint["kernels"] = kernel_path(model)
    return fingerprint


def kernel_path(model: nn.Module) -> str:
    """The path `fit_kernels` put the model's linear layers on ("stock" when it never ran)."""
    fit = getattr(model, "bild_kernels", None)
    return "stock" if fit is None else fit.path


def fit_kernels(model: nn.Module, paths: tuple[str, ...] = PATHS, use_stored: bool = True) -> nn.Module:
    """Put every ``nn.Linear`` of ``model`` on the fastest of ``paths`` on this machine, in place; return it.

    Args:
        model: a transformers model (compressed drafters included: their int8/int4 layers stay as they are).
        paths: the candidates, among `ALL_PATHS`; ``("onednn",)`` forces a path without timing. The default
            `PATHS` keep the model's numbers; ``"fp16"`` (float16 weights, a float32 model on an x86 CPU) only
            runs where named, e.g. ``("fp16",)``, or ``(*PATHS, "fp16")`` to let the timing choose it.
        use_stored: reuse the choice stored for this model shape and machine (``$BILD_HOME/fit``).

    Only CPUs have a choice: elsewhere the model is left as it is (``model.bild_kernels.path == "stock"``).
    Packed layers are for inference: to train or save the model, load it again (state dicts do hold
    dense weights).
    """
    unknown = [p for p in paths if p not in ALL_PATHS]
    if unknown or not paths:
        raise ValueError(f"Unknown kernel paths {unknown or paths!r}: choose among {ALL_PATHS}.")
    if hasattr(model, "bild_kernels"):
        raise ValueError(f"This model's kernels were already fitted ({model.bild_kernels.path}): load it again to refit.")
    if HALF in paths:
        _check_half(model)
    if model_device(model).type != "cpu" or not onednn_available() or not _linears(model):
        model.bild_kernels = KernelFit("stock", {}, "only CPUs with oneDNN have a choice of linear kernels")
        return model
    if len(paths) == 1:
        return _apply(model, KernelFit(paths[0], {}, "asked for"))
    fit_file = _fit_file(model)
    stored = _stored_fit(fit_file, paths) if use_stored else None
    if stored is not None:
        return _apply(model, KernelFit(stored["path"], {}, f"stored in {fit_file}"))
    ms, originals = {}, {}
    for i, path in enumerate(paths):
        if i:
            _restore(model, originals)
        originals = _pack_linears(model, path, keep=True)
        ms[path] = _time_model(model)
    best = min(paths, key=lambda p: sum(ms[p].values()))
    if best != paths[-1]:  # the last path timed is still on: packing it again would cost as long as the first time
        _restore(model, originals)
        _pack_linears(model, best)
    reason = ", ".join(f"{p}: {ms[p][1]:.1f} ms for 1 token, {ms[p][CHUNK_ROWS]:.1f} for {CHUNK_ROWS}" for p in paths)
    model.bild_kernels = KernelFit(best, ms, reason)
    _store_fit(fit_file, model, paths)
    logger.info("bild: %s linear layers on %s kernels (%s)", type(model).__name__, best, reason)
    return model


def _check_half(model: nn.Module) -> None:
    """A clear error where the fp16 path cannot run: not a float32 model, or no fbgemm."""
    if not fp16_available():
        raise ValueError(f"The 'fp16' kernel path needs fbgemm (x86 CPUs); this torch ({torch.__version__}, quantized "
                         f"engine {torch.backends.quantized.engine!r}) lacks it: choose among {PATHS}.")  # fmt: skip
    dtypes = {linear.weight.dtype for _, linear in _linears(model)}
    if dtypes - {torch.float32}:
        raise ValueError(f"The 'fp16' kernel path multiplies in float32 and this model's linear layers are "
                         f"{sorted(map(str, dtypes))}: load it with dtype=torch.float32, or keep to {PATHS}.")


def _apply(model: nn.Module, fit: KernelFit) -> nn.Module:
    _pack_linears(model, fit.path)
    model.bild_kernels = fit
    return model


def _linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


_PACKED = {"onednn": OneDNNLinear, HALF: HalfLinear}


@torch.no_grad()
def _pack_linears(model: nn.Module, path: str, keep: bool = False) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` on ``path``'s layer (none for "stock"); on the fp16 path a layer with a weight beyond
    float16's range stays as it is. ``keep``: return the fp16 path's replaced layers by name, to put back (float16
    cannot give them back; oneDNN's packing can)."""
    originals = {}
    for name, linear in _linears(model) if path in _PACKED else []:
        if path == HALF and linear.weight.abs().max() > FP16_MAX:
            continue
        replace_module(model, name, _PACKED[path].from_linear(linear))
        if keep and path == HALF:
            originals[name] = linear
    return originals


@torch.no_grad()
def _restore(model: nn.Module, originals: dict[str, nn.Linear]) -> None:
    """Every packed layer back to an ``nn.Linear``: its original where kept, else unpacked (oneDNN's is exact)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, PackedLinear):
            replace_module(model, name, originals[name] if name in originals else module.to_linear())


def _time_model(model: nn.Module) -> dict[int, float]:
    with torch.inference_mode():
        return forwards_ms(model, FIT_CONTEXT, (1, CHUNK_ROWS), FIT_REPEATS)


def _fit_file(model: nn.Module) -> Path:
    key = {"model": {k: v for k, v in model_fingerprint(model).items() if k != "kernels"}, "machine": machine_key(model)}
    return fit_file("kernels", key)


def _stored_fit(path: Path, paths: tuple[str, ...]) -> dict | None:
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored["path"] in paths and sorted(stored["paths"]) == sorted(paths):
            return stored
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:
        warnings.warn(f"bild: ignoring unreadable kernel choice {path} ({err}); timing again.", stacklevel=3)
        return None


def _store_fit(path: Path, model: nn.Module, paths: tuple[str, ...]) -> None:
    fit = model.bild_kernels
    record = {"path": fit.path, "paths": list(paths), "ms": fit.ms, "machine": machine_key(model)}
    try:
        write_json(path, record)
    except OSError as err:  # a read-only home still decodes, it just times again next time
        warnings.warn(f"bild: could not store the kernel choice in {path} ({err}).", stacklevel=3)

"""Machine fit: a model's linear layers on the fastest kernel this machine has, chosen by measurement.

On a few CPU cores the kernel, not the algorithm, sets BiLD's price: a verification forward over a few
tokens should cost little more than a single-token one (the weights are read once either way), but torch's
default float32 path (MKL) costs about twice a single-token forward for 2 tokens on an AVX2-only CPU.
Two paths for every ``nn.Linear``:

- ``"stock"``: ``F.linear`` as torch dispatches it (MKL in float32 on x86 CPUs);
- ``"onednn"``: the weight reordered once into oneDNN's blocked layout (``mkldnn._reorder_linear_weight``,
  packed for a chunk of `CHUNK_ROWS` rows) and multiplied by ``mkldnn._linear_pointwise``, the path
  torch.compile's weight freezing takes on CPUs, here without compiling anything.

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

from .drafters import replace_module
from .home import fit_file, write_json
from .timing import forward_ms, machine_key, model_device

logger = logging.getLogger(__name__)

PATHS = ("stock", "onednn")
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


class PackedLinear(nn.Module):
    """An ``nn.Linear`` whose weight lives in oneDNN's blocked layout; inference only.

    The packed weight is an opaque tensor (no storage): it is held as a plain attribute, copied by
    `copy.deepcopy` through its dense form, and saved in state dicts as a dense ``weight``.
    """

    weight = None  # no dense weight kept (transformers' T5 checks ``wo.weight`` before casting its input)

    def __init__(self, dense_weight: torch.Tensor, bias: torch.Tensor | None, rows_hint: int = CHUNK_ROWS):
        super().__init__()
        reorder, _ = _onednn_ops()
        self.out_features, self.in_features = dense_weight.shape
        self.rows_hint = rows_hint
        self.packed = reorder(dense_weight.detach().contiguous(), rows_hint)  # [N, K] opaque oneDNN layout
        self.register_buffer("bias", None if bias is None else bias.detach().clone())  # [N] or None

    @classmethod
    def from_linear(cls, linear: nn.Linear, rows_hint: int = CHUNK_ROWS) -> PackedLinear:
        return cls(linear.weight, linear.bias, rows_hint)

    @property
    def nbytes(self) -> int:
        """Bytes of weight a forward reads (the packed tensor is not a parameter or buffer)."""
        return self.out_features * self.in_features * self.packed.element_size()

    def dense_weight(self) -> torch.Tensor:
        return self.packed.to_dense()

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the same weights."""
        weight = self.dense_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.clone(), requires_grad=False)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., K] -> [..., N]."""
        _, linear = _onednn_ops()
        out = linear(x.reshape(-1, self.in_features), self.packed, self.bias, "none", [], "")  # [M, N]
        return out.reshape(*x.shape[:-1], self.out_features)

    def __deepcopy__(self, memo):
        copied = PackedLinear(self.dense_weight(), self.bias, self.rows_hint)
        copied.train(self.training)
        return copied

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.dense_weight()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, onednn (rows hint {self.rows_hint})"


@dataclass(frozen=True)
class KernelFit:
    """What `fit_kernels` chose for a model, kept as ``model.bild_kernels``.

    path: "stock" or "onednn".
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
        paths: the candidates, among `PATHS`; ``("onednn",)`` forces a path without timing.
        use_stored: reuse the choice stored for this model shape and machine (``$BILD_HOME/fit``).

    Only CPUs have a choice: elsewhere the model is left as it is (``model.bild_kernels.path == "stock"``).
    Packed layers are for inference: to train or save the model, load it again (state dicts do hold
    dense weights).
    """
    unknown = [p for p in paths if p not in PATHS]
    if unknown or not paths:
        raise ValueError(f"Unknown kernel paths {unknown or paths!r}: choose among {PATHS}.")
    if hasattr(model, "bild_kernels"):
        raise ValueError(f"This model's kernels were already fitted ({model.bild_kernels.path}): load it again to refit.")
    if model_device(model).type != "cpu" or not onednn_available() or not _linears(model):
        model.bild_kernels = KernelFit("stock", {}, "only CPUs with oneDNN have a choice of linear kernels")
        return model
    if len(paths) == 1:
        return _apply(model, KernelFit(paths[0], {}, "asked for"))
    fit_file = _fit_file(model)
    stored = _stored_fit(fit_file, paths) if use_stored else None
    if stored is not None:
        return _apply(model, KernelFit(stored["path"], {}, f"stored in {fit_file}"))
    ms = {"stock": _time_model(model)}
    _pack_linears(model)
    ms["onednn"] = _time_model(model)
    best = min(paths, key=lambda p: sum(ms[p].values()))
    if best == "stock":
        _unpack_linears(model)
    reason = ", ".join(f"{p}: {ms[p][1]:.1f} ms for 1 token, {ms[p][CHUNK_ROWS]:.1f} for {CHUNK_ROWS}" for p in paths)
    model.bild_kernels = KernelFit(best, ms, reason)
    _store_fit(fit_file, model, paths)
    logger.info("bild: %s linear layers on %s kernels (%s)", type(model).__name__, best, reason)
    return model


def _apply(model: nn.Module, fit: KernelFit) -> nn.Module:
    if fit.path == "onednn":
        _pack_linears(model)
    model.bild_kernels = fit
    return model


def _linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


@torch.no_grad()
def _pack_linears(model: nn.Module) -> None:
    for name, linear in _linears(model):
        replace_module(model, name, PackedLinear.from_linear(linear))


@torch.no_grad()
def _unpack_linears(model: nn.Module) -> None:
    for name, module in list(model.named_modules()):
        if isinstance(module, PackedLinear):
            replace_module(model, name, module.to_linear())


def _time_model(model: nn.Module) -> dict[int, float]:
    with torch.inference_mode():
        return {n: forward_ms(model, FIT_CONTEXT, n, FIT_REPEATS) for n in (1, CHUNK_ROWS)}


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

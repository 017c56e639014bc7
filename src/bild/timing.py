"""Measuring a model on this machine: what its forward's cost depends on (`machine_key`), and how long one
forward takes by tokens fed (`forwards_ms`). Below both users of such measurements: the kernel fit (kernels.py)
and the draft costs (schedule.py)."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from .compat import cache_kwarg, crop_cache, keep_recurrent_states, new_cache
from .lean import lean_forward


def machine_key(model: nn.Module) -> dict:
    """What a forward's cost depends on besides the model's shape: device, dtype, threads, kernels, torch."""
    device = model_device(model)
    key = {
        "device": device.type,
        "dtype": str(model_dtype(model)).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    if device.type == "cpu":
        key["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        key["onednn_isa"] = os.environ.get("ONEDNN_MAX_CPU_ISA", "")
        key["cpu_model"] = cpu_model_name()
    elif device.type == "cuda":
        key["gpu"] = torch.cuda.get_device_name(device)
    return key


def forward_ms(model: PreTrainedModel, context: int, n_new: int, repeats: int, in_loop: bool = False) -> float:
    """Median wall time (ms) of one forward over ``n_new`` tokens after ``context`` cached tokens (`forwards_ms`)."""
    return forwards_ms(model, context, (n_new,), repeats, in_loop)[n_new]


def forwards_ms(
    model: PreTrainedModel, context: int, tokens: tuple[int, ...], repeats: int, in_loop: bool = False
) -> dict[int, float]:
    """``{n: median wall time (ms) of one forward over n tokens after context cached tokens}`` for each n of ``tokens``.

    The context is fed once; after each timed forward the cache is cropped back to it. ``in_loop``: run it as
    bild's loop runs it, by its lean forward (compiled one-token step included) where that applies.
    """
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (1, context + max(tokens)), generator=torch.Generator().manual_seed(0))
    ids = ids.to(model.device)
    extra = {}
    if model.config.is_encoder_decoder:  # the encoder runs once per generate(): not part of a step
        extra["encoder_outputs"] = model.get_encoder()(input_ids=ids[:, :context], return_dict=True)
    cache = new_cache(model)
    lean = lean_forward(model) if in_loop else None
    _feed(model, ids[:, :context], cache, extra, lean)
    keep_recurrent_states(cache, max(tokens) + 1)  # recurrent layers can go back before the timed tokens
    medians = {}
    for n_new in tokens:
        times = []
        for _ in range(repeats + 1):  # the first is a warm-up
            start = _clock(model.device)
            _feed(model, ids[:, context : context + n_new], cache, extra, lean, first=context)
            times.append(1000 * (_clock(model.device) - start))
            crop_cache(cache, n_new)
        medians[n_new] = statistics.median(times[1:])
    return medians


def _feed(model: PreTrainedModel, ids: torch.Tensor, cache, extra: dict, lean=None, first: int = 0) -> None:
    if lean is not None:
        positions = torch.arange(first, first + ids.shape[1], device=ids.device)[None]
        if lean(model, ids, None, positions, cache) is not None:
            return
    name = "decoder_input_ids" if model.config.is_encoder_decoder else "input_ids"
    model(**{name: ids, cache_kwarg(model): cache}, **extra, use_cache=True)


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()

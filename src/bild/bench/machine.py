"""The machine a benchmark runs on: device and dtype choice, a clock, and the facts a reader needs."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from functools import cache

import torch
import transformers

import bild
from bild.timing import cpu_model_name

DEVICES = ("auto", "cpu", "cuda")  # "cuda:N" is accepted too
DTYPES = ("auto", "float32", "bfloat16", "float16")
# linear-layer kernels of every model: fit (the path bild.fit_kernels times fastest here, same numbers), stock (as
# loaded) or fp16 (float16 weights, fbgemm; float32 models on x86 CPUs: changes the numbers, so only when asked)
KERNELS = ("fit", "stock", "fp16")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs with native bfloat16 math


def add_machine_options(parser: argparse.ArgumentParser, defaults: bool = True) -> None:
    """``--device``, ``--dtype`` and ``--threads`` for a ``bild`` verb (``defaults=False``: None, the config decides)."""
    parser.add_argument("--device", default="auto" if defaults else None, help=f"{', '.join(DEVICES)} or cuda:N")
    parser.add_argument(
        "--dtype", default="auto" if defaults else None,
        help=f"{', '.join(DTYPES)} (auto: bfloat16 on a GPU or CPU that computes in it, else float32)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--kernels", choices=KERNELS, default="fit" if defaults else None,
        help="linear-layer kernels: fit (the path timed fastest on this machine, bild.fit_kernels), stock, or fp16 "
             "(a float32 model's weights in float16: half the bytes a step reads, the numbers rounded)",
    )  # fmt: skip


def resolve_device(device: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ValueError naming the choices otherwise."""
    if device not in DEVICES and not device.startswith("cuda:"):
        raise ValueError(f"device must be one of {list(DEVICES)} or cuda:N, got {device!r}.")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available; use cpu (or auto).")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 on a GPU or CPU with native bfloat16 math, else float32.

    On a 2-core AVX-512 BF16 CPU every model runs twice as fast in bfloat16 as in float32, and a forward
    over 11 tokens costs 1.4 single-token ones instead of 2.9 (docs/measured.md, "Where the time goes").
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}.")
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16() else torch.float32


@cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX-512 BF16 or AMX) and torch uses those kernels.

    ``ATEN_CPU_CAPABILITY=avx2`` (with ``ONEDNN_MAX_CPU_ISA=AVX2``) makes an AVX-512 machine run the kernels
    of an AVX2-only one: then this is False, as it would be there.
    """
    if not torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AMX")):
        return False
    return any(flag in cpu_flags() for flag in CPU_BF16_FLAGS)


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return frozenset()


def clock(device: torch.device) -> float:
    """``time.perf_counter()`` after the GPU has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def environment(device: torch.device, dtype: torch.dtype, batch_size: int, kernels: dict | None = None) -> dict:
    """Versions, device and machine: what a reader needs to judge the timings.

    ``kernels``: the linear-layer path of each model by name (`bild.fit_kernels`).
    """
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    cpu = {}
    if device.type == "cpu":
        cpu = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_flags": cpu_vector_flags(),
               "onednn_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "")}  # fmt: skip
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bild": bild.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "device_name": name,
        "dtype": str(dtype).removeprefix("torch."),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "batch_size": batch_size,
        **cpu,
        "kernels": kernels or {},
    }


def cpu_vector_flags() -> str:
    """The CPU's vector-math flags that decide kernels (AVX2, AVX-512, bf16, AMX), from /proc/cpuinfo."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return " ".join(flag for flag in wanted if flag in cpu_flags())


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else `platform.processor()`."""
    return cpu_model_name() or "unknown CPU"

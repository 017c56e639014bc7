"""Big Little Decoder (BiLD) as a decoding mode of Hugging Face transformers' generate()."""

import importlib

from .cache import BildCache
from .config import BildGenerationConfig, BildSettings
from .drafters import compress_drafter
from .early_exit import EarlyExitDrafter, early_exit, train_exit
from .integration import BildGenerateOutput, BildGenerationMixin, attach, detach
from .kernels import fit_kernels
from .lean import compile_drafter
from .schedule import DraftCosts
from .stats import BildStats, collect_stats

__all__ = [
    "AlignResult",
    "BildCache",
    "BildGenerateOutput",
    "BildGenerationConfig",
    "BildGenerationMixin",
    "BildSettings",
    "BildStats",
    "Budget",
    "CalibrationResult",
    "DraftCosts",
    "EarlyExitDrafter",
    "align",
    "attach",
    "calibrate",
    "collect_stats",
    "compile_drafter",
    "compress_drafter",
    "detach",
    "early_exit",
    "fit_kernels",
    "train_exit",
]
__version__ = "0.1.0"

# The tools (`bild.bench`: the benchmark, calibration, alignment) are built on the core and pull in peft,
# datasets and metrics (seconds to import): their names are loaded on first use, not with `import bild`, and
# no core module imports them (tests/test_layout.py).
_LAZY = {
    "align": "bench.alignment", "AlignResult": "bench.alignment",
    "calibrate": "bench.calibration", "Budget": "bench.calibration", "CalibrationResult": "bench.calibration",
}  # fmt: skip


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

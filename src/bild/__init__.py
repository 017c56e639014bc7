"""Big Little Decoder (BiLD) as a decoding mode of Hugging Face transformers' generate()."""

from .cache import BildCache
from .config import BildGenerationConfig, BildSettings
from .integration import BildGenerateOutput, BildGenerationMixin, attach, detach
from .stats import BildStats, collect_stats

__all__ = [
    "BildCache",
    "BildGenerateOutput",
    "BildGenerationConfig",
    "BildGenerationMixin",
    "BildSettings",
    "BildStats",
    "attach",
    "collect_stats",
    "detach",
]
__version__ = "0.1.0"

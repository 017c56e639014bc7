"""`BildGenerationConfig` and the validation of BiLD's settings."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np
from transformers import GenerationConfig

BILD_MODE = "bild"
DEFAULT_FALLBACK_THRESHOLD = 0.6
DEFAULT_ROLLBACK_THRESHOLD = 2.0
DEFAULT_MAX_DRAFT_TOKENS = 10
BILD_FIELDS = ("fallback_threshold", "rollback_threshold", "max_draft_tokens")


@dataclass(frozen=True)
class BildSettings:
    """The three numbers that steer BiLD, validated.

    fallback_threshold: alpha_FB in [0, 1]; the small model stops drafting when its top probability is below it.
    rollback_threshold: alpha_RB >= 0 (``inf`` allowed); a draft the large model disagrees with is rolled back
        when its cross-entropy under the large model exceeds it. 0 makes BiLD lossless.
    max_draft_tokens: N >= 1; the large model is called after at most N drafts.
    """

    fallback_threshold: float = DEFAULT_FALLBACK_THRESHOLD
    rollback_threshold: float = DEFAULT_ROLLBACK_THRESHOLD
    max_draft_tokens: int = DEFAULT_MAX_DRAFT_TOKENS

    def __post_init__(self):
        validate_settings(self.fallback_threshold, self.rollback_threshold, self.max_draft_tokens)
        # plain Python numbers (not numpy scalars), so configs and reports serialize cleanly
        object.__setattr__(self, "fallback_threshold", float(self.fallback_threshold))
        object.__setattr__(self, "rollback_threshold", float(self.rollback_threshold))
        object.__setattr__(self, "max_draft_tokens", int(self.max_draft_tokens))

    @classmethod
    def from_config(cls, generation_config: GenerationConfig | None, **overrides: Any) -> BildSettings:
        """Settings from a generation config's attributes, with generate() kwargs taking precedence.

        Attributes missing from the config (or set to None) take the defaults; an explicit 0 stays 0.
        """
        values = {}
        for name in BILD_FIELDS:
            value = overrides.get(name)
            if value is None:
                value = getattr(generation_config, name, None)
            if value is not None:
                values[name] = value
        return cls(**values)


def validate_settings(fallback_threshold: Any, rollback_threshold: Any, max_draft_tokens: Any) -> None:
    """Raise a ValueError that says what to change when a BiLD setting is out of range."""
    if not is_real(fallback_threshold) or not 0.0 <= float(fallback_threshold) <= 1.0:
        raise ValueError(
            f"`fallback_threshold` must be a probability in [0, 1], got {fallback_threshold!r}. "
            "Higher values hand over to the large model more often (1.0: every token)."
        )
    if not is_real(rollback_threshold) or math.isnan(rollback_threshold) or float(rollback_threshold) < 0.0:
        raise ValueError(
            f"`rollback_threshold` must be >= 0 (float('inf') allowed), got {rollback_threshold!r}. "
            "0 makes BiLD lossless (output equals the large model's greedy output); inf never rolls back."
        )
    if not is_integer(max_draft_tokens) or max_draft_tokens < 1:
        raise ValueError(
            f"`max_draft_tokens` must be an integer >= 1, got {max_draft_tokens!r}: it is the most tokens the "
            "small model drafts before the large model is called anyway."
        )


def is_integer(value: Any) -> bool:
    """An integer (numpy integers included), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_real(value: Any) -> bool:
    """A real number (int or float, numpy scalars included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


class BildGenerationConfig(GenerationConfig):
    """A `GenerationConfig` that selects BiLD decoding (``generation_mode="bild"``) and carries its thresholds.

    Pass it as ``model.generate(generation_config=...)`` on a model prepared with `bild.attach`, or use it as a
    `Seq2SeqTrainingArguments.generation_config`. It saves and loads like any `GenerationConfig`.

    Args:
        fallback_threshold: alpha_FB in [0, 1] (default 0.6).
        rollback_threshold: alpha_RB >= 0, ``inf`` allowed (default 2.0).
        max_draft_tokens: N >= 1, the most small-model steps before the large model is called (default 10).
        **kwargs: any `GenerationConfig` argument (``max_new_tokens``, ``eos_token_id``, ...).
    """

    def __init__(
        self,
        fallback_threshold: float = DEFAULT_FALLBACK_THRESHOLD,
        rollback_threshold: float = DEFAULT_ROLLBACK_THRESHOLD,
        max_draft_tokens: int = DEFAULT_MAX_DRAFT_TOKENS,
        **kwargs: Any,
    ):
        # GenerationConfig keeps unknown keyword arguments as attributes and validates at the end of __init__.
        kwargs.update(
            generation_mode=BILD_MODE,
            fallback_threshold=fallback_threshold,
            rollback_threshold=rollback_threshold,
            max_draft_tokens=max_draft_tokens,
        )
        super().__init__(**kwargs)

    def validate(self, *args: Any, **kwargs: Any) -> None:
        super().validate(*args, **kwargs)
        validate_settings(self.fallback_threshold, self.rollback_threshold, self.max_draft_tokens)

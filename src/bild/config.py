"""`BildGenerationConfig` and the validation of BiLD's settings."""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from transformers import GenerationConfig

from .compat import SeenByGenerate
from .policies import NLL, ROLLBACK_RULES
from .schedule import AUTO, AUTO_MAX_CANDIDATES, DraftCosts

BILD_MODE = "bild"
DEFAULT_FALLBACK_THRESHOLD = 0.6
# the paper's 2.0 lost 0.5-1.6 chrF on De-En where 1.0 kept it at the same speed: docs/lossy-decoding.md, "Measured"
DEFAULT_ROLLBACK_THRESHOLD = 1.0
DEFAULT_ROLLBACK_RULE = NLL  # the paper's: alpha_RB bounds a draft's cross-entropy under the large model
DEFAULT_MAX_DRAFT_TOKENS = 20  # measured against 10, 'auto' and context drafts: docs/measured.md, "Which defaults"
DEFAULT_VERIFY_FALLBACK_TOKEN = False
DEFAULT_FALLBACK_CANDIDATES = AUTO  # measured: docs/measured.md, "Which candidates to check"
# greedy decoding with prompt_lookup_num_tokens unset: docs/measured.md, "Context drafts by default?"
DEFAULT_PROMPT_LOOKUP_NUM_TOKENS = 10
BILD_FIELDS = (
    "fallback_threshold", "rollback_threshold", "max_draft_tokens", "verify_fallback_token", "draft_costs",
    "fallback_candidates", "rollback_rule",
)  # fmt: skip
# Stock GenerationConfig fields that BiLD reads too: context drafts (prompt lookup), see bild.context_drafts
CONTEXT_FIELDS = ("prompt_lookup_num_tokens", "max_matching_ngram_size")
INF_JSON = "inf"  # an infinite threshold in saved configs: standard JSON has no Infinity
# True inside an attached model's generate(): only there may stock generate() meet a BildGenerationConfig.
_IN_ATTACHED_GENERATE = contextvars.ContextVar("bild_in_attached_generate", default=False)


@dataclass(frozen=True)
class BildSettings:
    """The settings that steer BiLD, validated.

    fallback_threshold: alpha_FB in [0, 1]; the small model stops drafting when its top probability is below it.
    rollback_threshold: alpha_RB >= 0 (``inf`` allowed); a draft the large model disagrees with is rolled back
        when its cross-entropy under the large model exceeds it (``rollback_rule``). 0 makes BiLD lossless.
    max_draft_tokens: N >= 1, the large model is called after at most N drafts; or ``"auto"``, a cap chosen
        each round from the pair's forward costs and recent acceptance (`bild.schedule`). It caps small-model
        steps: context drafts (``prompt_lookup_num_tokens``) come on top.
    verify_fallback_token: on a fallback, the large model also checks the token the small model was unsure
        of, in the same forward; it is kept only if it is exactly the large model's own choice.
    draft_costs: for ``"auto"`` (either setting): a `bild.DraftCosts`, its dict, or a JSON file of one; None
        measures the pair on first use (`DraftCosts.for_pair`).
    fallback_candidates: K >= 0, the small model's top-K tokens at the unsure position that the large model
        checks as siblings in its verification forward (one is kept if it is exactly the large model's own
        choice); 1 is ``verify_fallback_token``; 0 drops the unsure token (the paper's rule); ``"auto"`` (the
        default): the unsure token, and up to `AUTO_MAX_CANDIDATES` - 1 more where their probability pays for
        the extra verification cost.
    prompt_lookup_num_tokens: k >= 1 (the stock `GenerationConfig` field): each round first copies up to k tokens
        as free drafts from where the row's last n-gram occurred earlier in its text (`bild.context_drafts`); 0:
        none; None (unset): `DEFAULT_PROMPT_LOOKUP_NUM_TOKENS` in greedy decoding, none when sampling
        (`for_decoding`).
    max_matching_ngram_size: the longest n-gram looked up (>= 1; None: 2, like stock prompt lookup).
    rollback_rule: what ``rollback_threshold`` bounds: ``"nll"`` (the default, the paper's), a draft's
        cross-entropy under the large model, ``-log p(x)``; ``"margin"``, how far its log-probability falls below
        the large model's top token's, ``log max p - log p(x)`` (`bild.policies.draft_scores`).
    """

    fallback_threshold: float = DEFAULT_FALLBACK_THRESHOLD
    rollback_threshold: float = DEFAULT_ROLLBACK_THRESHOLD
    max_draft_tokens: int | str = DEFAULT_MAX_DRAFT_TOKENS
    verify_fallback_token: bool = DEFAULT_VERIFY_FALLBACK_TOKEN
    draft_costs: DraftCosts | dict | str | None = None
    fallback_candidates: int | str = DEFAULT_FALLBACK_CANDIDATES
    prompt_lookup_num_tokens: int | None = None
    max_matching_ngram_size: int | None = None
    rollback_rule: str = DEFAULT_ROLLBACK_RULE

    def __post_init__(self):
        validate_context_settings(self.prompt_lookup_num_tokens, self.max_matching_ngram_size)
        for name in CONTEXT_FIELDS:
            if getattr(self, name) is not None:
                object.__setattr__(self, name, int(getattr(self, name)))
        validate_settings(self.fallback_threshold, self.rollback_threshold, self.max_draft_tokens,
                          self.verify_fallback_token, self.fallback_candidates, self.rollback_rule)  # fmt: skip
        if self.fallback_candidates != AUTO:
            object.__setattr__(self, "fallback_candidates", int(self.fallback_candidates))
        # plain Python numbers (not numpy scalars), so configs and reports serialize cleanly
        object.__setattr__(self, "fallback_threshold", float(self.fallback_threshold))
        object.__setattr__(self, "rollback_threshold", float(self.rollback_threshold))
        if self.max_draft_tokens != AUTO:
            object.__setattr__(self, "max_draft_tokens", int(self.max_draft_tokens))
        if self.draft_costs is not None:
            object.__setattr__(self, "draft_costs", DraftCosts.load(self.draft_costs))

    def for_decoding(self, do_sample: bool) -> BildSettings:
        """These settings as one generate() call runs them: an unset ``prompt_lookup_num_tokens`` resolved (context
        drafts by default in greedy decoding only, where the small model checks them and they are priced; with
        sampling every copied token would go unchecked to the large model), 0 read as None."""
        n_lookup = self.prompt_lookup_num_tokens
        if n_lookup is None and not do_sample:
            n_lookup = DEFAULT_PROMPT_LOOKUP_NUM_TOKENS
        return replace(self, prompt_lookup_num_tokens=n_lookup or None)

    @property
    def n_candidates(self) -> int:
        """The most tokens the large model checks at an unsure position: ``fallback_candidates`` ("auto": up to
        `AUTO_MAX_CANDIDATES`), at least 1 with ``verify_fallback_token``."""
        most = AUTO_MAX_CANDIDATES if self.fallback_candidates == AUTO else self.fallback_candidates
        return max(most, int(self.verify_fallback_token))

    @classmethod
    def from_config(cls, *generation_configs: GenerationConfig | None, **overrides: Any) -> BildSettings:
        """Settings from generate() kwargs, else the first config that sets each (like stock generate()).

        Pass the configs in order of precedence, e.g. the one passed to generate(), then the model's own.
        Fields no one sets (or sets to None) take the defaults; an explicit 0 stays 0.
        """
        values = {}
        for name in (*BILD_FIELDS, *CONTEXT_FIELDS):
            value = overrides.get(name)
            for config in generation_configs:
                if value is None:
                    value = from_json_value(getattr(config, name, None))
            if value is not None:
                values[name] = value
        return cls(**values)


def validate_settings(
    fallback_threshold: Any, rollback_threshold: Any, max_draft_tokens: Any, verify_fallback_token: Any = False,
    fallback_candidates: Any = 0, rollback_rule: Any = DEFAULT_ROLLBACK_RULE,
) -> None:
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
    if max_draft_tokens != AUTO and (not is_integer(max_draft_tokens) or max_draft_tokens < 1):
        raise ValueError(
            f"`max_draft_tokens` must be an integer >= 1 or 'auto', got {max_draft_tokens!r}: it is the most tokens "
            "the small model drafts before the large model is called anyway ('auto': chosen by cost each round)."
        )
    if not isinstance(verify_fallback_token, (bool, np.bool_)):
        raise ValueError(f"`verify_fallback_token` must be True or False, got {verify_fallback_token!r}.")
    if fallback_candidates != AUTO and (not is_integer(fallback_candidates) or fallback_candidates < 0):
        raise ValueError(
            f"`fallback_candidates` must be an integer >= 0 or 'auto', got {fallback_candidates!r}: the number of the "
            "small model's top tokens at an unsure position that the large model checks (0: none, the paper's rule; "
            "'auto': those whose probability pays for the extra verification cost)."
        )
    if rollback_rule not in ROLLBACK_RULES:
        raise ValueError(
            f"`rollback_rule` must be one of {list(ROLLBACK_RULES)}, got {rollback_rule!r}: what rollback_threshold "
            "bounds, a draft's cross-entropy under the large model ('nll', the paper's rule) or how far its "
            "log-probability falls below the large model's top token's ('margin')."
        )


def validate_context_settings(prompt_lookup_num_tokens: Any, max_matching_ngram_size: Any) -> None:
    """Raise a ValueError that says what to change when a context-draft (prompt lookup) setting is out of range."""
    if not is_count_or_none(prompt_lookup_num_tokens, minimum=0):
        raise ValueError(
            f"`prompt_lookup_num_tokens` must be an integer >= 0 or None, got {prompt_lookup_num_tokens!r}: in BiLD "
            "mode it is the most tokens copied as free drafts each round from where the text's last n-gram occurred "
            f"before. 0 drafts with the small model only; None (unset) copies up to {DEFAULT_PROMPT_LOOKUP_NUM_TOKENS} "
            "in greedy decoding."
        )
    if not is_count_or_none(max_matching_ngram_size):
        raise ValueError(
            f"`max_matching_ngram_size` must be an integer >= 1 or None (2), got {max_matching_ngram_size!r}: the "
            "longest n-gram looked up for context drafts (prompt_lookup_num_tokens)."
        )


def is_count_or_none(value: Any, minimum: int = 1) -> bool:
    """None, or an integer >= ``minimum``."""
    return value is None or (is_integer(value) and value >= minimum)


def from_json_value(value: Any) -> Any:
    """A setting as Python reads it: ``"inf"`` (how configs are saved) -> ``math.inf``, numpy scalars -> Python."""
    if isinstance(value, str) and value == INF_JSON:
        return math.inf
    return value.item() if isinstance(value, np.generic) else value


def to_json_value(value: Any) -> Any:
    """A setting as standard JSON can hold it: ``math.inf`` -> ``"inf"``."""
    return INF_JSON if isinstance(value, float) and math.isinf(value) and value > 0 else value


@contextlib.contextmanager
def in_attached_generate():
    """Mark the code inside as an attached model's generate(): BildGenerationConfigs are expected there."""
    token = _IN_ATTACHED_GENERATE.set(True)
    try:
        yield
    finally:
        _IN_ATTACHED_GENERATE.reset(token)


def is_integer(value: Any) -> bool:
    """An integer (numpy integers included), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_real(value: Any) -> bool:
    """A real number (int or float, numpy scalars included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


class BildGenerationConfig(SeenByGenerate, GenerationConfig):
    """A `GenerationConfig` that selects BiLD decoding (``generation_mode="bild"``) and carries its thresholds.

    Pass it as ``model.generate(generation_config=...)`` on a model prepared with `bild.attach`, or use it as a
    `Seq2SeqTrainingArguments.generation_config`; on a model that was not attached, generate() raises. It saves
    and loads like any `GenerationConfig`, as standard JSON (an infinite threshold is written ``"inf"``).
    Settings left at None take the model's ``generation_config`` value, else the default (like stock fields).

    Args:
        fallback_threshold: alpha_FB in [0, 1] (default 0.6).
        rollback_threshold: alpha_RB >= 0, ``inf`` allowed (default 1.0).
        max_draft_tokens: N >= 1, the most small-model steps before the large model is called (default 20),
            or ``"auto"`` (a cost-aware cap each round).
        verify_fallback_token: let the large model check the small model's unsure token on a fallback.
        draft_costs: for ``"auto"`` (either setting): a JSON file or dict of `bild.DraftCosts` (None: the pair's,
            measured on first use and stored).
        fallback_candidates: K, the small model's top-K tokens at an unsure position checked by the large model
            (0: the paper's rule), or ``"auto"`` (default: the unsure token, and the next ones that pay).
        rollback_rule: what ``rollback_threshold`` bounds: ``"nll"`` (default, the paper's: a draft's
            cross-entropy under the large model) or ``"margin"`` (how far its log-probability falls below the top
            token's).
        **kwargs: any `GenerationConfig` argument (``max_new_tokens``, ``eos_token_id``, ...).
    """

    def __init__(
        self,
        fallback_threshold: float | None = None,
        rollback_threshold: float | None = None,
        max_draft_tokens: int | str | None = None,
        verify_fallback_token: bool | None = None,
        draft_costs: dict | str | None = None,
        fallback_candidates: int | str | None = None,
        rollback_rule: str | None = None,
        **kwargs: Any,
    ):
        # GenerationConfig keeps unknown keyword arguments as attributes and validates at the end of __init__.
        settings = dict(
            fallback_threshold=fallback_threshold,
            rollback_threshold=rollback_threshold,
            max_draft_tokens=max_draft_tokens,
            verify_fallback_token=verify_fallback_token,
            draft_costs=draft_costs,
            fallback_candidates=fallback_candidates,
            rollback_rule=rollback_rule,
        )
        kwargs.update(generation_mode=BILD_MODE, **{name: from_json_value(v) for name, v in settings.items()})
        super().__init__(**kwargs)

    def validate(self, *args: Any, **kwargs: Any) -> None:
        super().validate(*args, **kwargs)
        BildSettings.from_config(self)

    def to_dict(self) -> dict[str, Any]:
        return {name: to_json_value(value) for name, value in super().to_dict().items()}

    def _on_generate(self) -> None:
        if not _IN_ATTACHED_GENERATE.get():
            raise ValueError(
                "This generation config asks for BiLD decoding (generation_mode='bild'), but the model was not "
                "prepared for it: call bild.attach(model, small_model) first (in every process: after loading, "
                "unpickling or bild.detach), or use a plain GenerationConfig for stock decoding."
            )

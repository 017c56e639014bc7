"""`BildStats`: per-row counters of one BiLD generate() call."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields

import torch


@dataclass
class BildStats:
    """Per-row counts of one BiLD generate() call; index ``i`` of every field is batch row ``i``.

    Every generated token is an accepted draft or a large-model token, and each large forward yields
    at most one token: ``accepted[i] <= generated[i] <= accepted[i] + large_forwards[i]``.
    Context drafts (``prompt_lookup_num_tokens``) are drafts too: ``context_drafted <= drafted`` and
    ``context_accepted <= accepted``; they cost no small forward.
    While a batch decodes, the fields are `(batch_size,)` long tensors (`zeros`, then `tolist`); users
    get lists of ints.
    """

    generated: Sequence[int] = field(default_factory=list)  # new tokens in the output (EOS included)
    small_forwards: Sequence[int] = field(default_factory=list)  # small-model forwards that advanced the row
    large_forwards: Sequence[int] = field(default_factory=list)  # large-model forwards (= rounds) of the row
    drafted: Sequence[int] = field(default_factory=list)  # drafts the large model checked (see verify_fallback_token)
    accepted: Sequence[int] = field(default_factory=list)  # drafts kept after verification
    fallbacks: Sequence[int] = field(default_factory=list)  # rounds ended by low small-model confidence
    rollbacks: Sequence[int] = field(default_factory=list)  # rounds in which a draft was rolled back
    undrafted: Sequence[int] = field(default_factory=list)  # rounds without a small forward (max_draft_tokens="auto")
    context_drafted: Sequence[int] = field(default_factory=list)  # drafts copied from the text (prompt lookup)
    context_accepted: Sequence[int] = field(default_factory=list)  # of those, kept after verification
    siblings: Sequence[int] = field(default_factory=list)  # next-best tokens checked beside an unsure one (in drafted)
    siblings_kept: Sequence[int] = field(default_factory=list)  # of those, kept in the unsure token's place (in accepted)

    @classmethod
    def zeros(cls, batch_size: int, device: torch.device | None = None) -> BildStats:
        """Tensor counters for a batch being decoded: every field `(batch_size,)` zeros."""
        return cls(**{name: torch.zeros(batch_size, dtype=torch.long, device=device) for name in cls.names()})

    def tolist(self) -> BildStats:
        """The same counts as lists of ints."""
        return type(self)(**self.to_dict())

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def concat(cls, parts: Iterable[BildStats]) -> BildStats:
        """Stack the rows of several stats objects (e.g. rows decoded one by one, or many calls)."""
        parts = list(parts)
        return cls(**{name: [int(n) for part in parts for n in getattr(part, name)] for name in cls.names()})

    def __len__(self) -> int:
        return len(self.generated)

    def row(self, i: int) -> BildStats:
        """Row ``i`` alone, as a one-row `BildStats`."""
        return type(self)(**{name: [int(getattr(self, name)[i])] for name in self.names()})

    def total(self, name: str) -> int:
        """Sum of one counter over all rows, e.g. ``stats.total("large_forwards")``."""
        return int(sum(getattr(self, name)))

    def to_dict(self) -> dict[str, list[int]]:
        return {name: [int(n) for n in getattr(self, name)] for name in self.names()}

    def summary(self) -> dict[str, float | int | None]:
        """Counts summed over rows and the rates derived from them; a rate is None when its denominator is 0.

        Rounds are large forwards: each round ends with one.
        """
        totals = {name: self.total(name) for name in self.names()}
        n_tokens, n_rounds = totals["generated"], totals["large_forwards"]
        return {
            **totals,
            "large_forwards_per_token": _ratio(n_rounds, n_tokens),
            "small_forwards_per_token": _ratio(totals["small_forwards"], n_tokens),
            "acceptance_rate": _ratio(totals["accepted"], totals["drafted"]),
            "fallback_rate": _ratio(totals["fallbacks"], n_rounds),
            "rollback_rate": _ratio(totals["rollbacks"], n_rounds),
            "context_acceptance_rate": _ratio(totals["context_accepted"], totals["context_drafted"]),
            "sibling_acceptance_rate": _ratio(totals["siblings_kept"], totals["siblings"]),
        }


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


_collectors: contextvars.ContextVar[tuple[list[BildStats], ...]] = contextvars.ContextVar(
    "bild_collectors", default=()
)


@contextlib.contextmanager
def collect_stats() -> Iterator[list[BildStats]]:
    """Collect the `BildStats` of every BiLD generate() call made inside the block, e.g. by a Trainer.

    >>> with bild.collect_stats() as calls:
    ...     metrics = trainer.evaluate()
    >>> metrics.update({f"eval_bild_{k}": v for k, v in BildStats.concat(calls).summary().items()})
    """
    calls: list[BildStats] = []
    token = _collectors.set((*_collectors.get(), calls))
    try:
        yield calls
    finally:
        _collectors.reset(token)


def report(stats: BildStats) -> None:
    """Hand one call's stats to every active `collect_stats` block."""
    for calls in _collectors.get():
        calls.append(stats)

"""`BildStats`: per-row counters of one BiLD generate() call."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field, fields


@dataclass
class BildStats:
    """Per-row counts of one BiLD generate() call; index ``i`` of every field is batch row ``i``.

    Every generated token is an accepted draft or a large-model token, and each large forward yields
    at most one token: ``accepted[i] <= generated[i] <= accepted[i] + large_forwards[i]``.
    """

    generated: list[int] = field(default_factory=list)  # new tokens in the output (EOS included, padding not)
    small_forwards: list[int] = field(default_factory=list)  # small-model forwards that advanced the row
    large_forwards: list[int] = field(default_factory=list)  # large-model forwards that advanced the row
    drafted: list[int] = field(
        default_factory=list
    )  # draft tokens proposed (the dropped unconfident one is not)
    accepted: list[int] = field(default_factory=list)  # drafts kept after verification
    fallbacks: list[int] = field(default_factory=list)  # rounds ended by low small-model confidence
    rollbacks: list[int] = field(default_factory=list)  # rounds in which a draft was rolled back

    @classmethod
    def concat(cls, parts: list[BildStats]) -> BildStats:
        """Stack the rows of several stats objects (e.g. rows decoded one by one)."""
        return cls(**{f.name: [n for part in parts for n in getattr(part, f.name)] for f in fields(cls)})

    def total(self, name: str) -> int:
        """Sum of one counter over all rows, e.g. ``stats.total("large_forwards")``."""
        return sum(getattr(self, name))

    def to_dict(self) -> dict[str, list[int]]:
        return {f.name: list(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def summary(self) -> dict[str, float]:
        """Rates over all rows: what a benchmark or an evaluation loop reports."""
        n_tokens = max(self.total("generated"), 1)
        n_rounds = max(self.total("large_forwards"), 1)
        return {
            "generated_tokens": self.total("generated"),
            "large_forwards_per_token": self.total("large_forwards") / n_tokens,
            "small_forwards_per_token": self.total("small_forwards") / n_tokens,
            "acceptance_rate": self.total("accepted") / max(self.total("drafted"), 1),
            "fallback_rate": self.total("fallbacks") / n_rounds,
            "rollback_rate": self.total("rollbacks") / n_rounds,
        }


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

"""`BildStats`: per-row counters of one BiLD generate() call."""

from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass
class BildStats:
    """Per-row counts of one BiLD generate() call; index ``i`` of every field is batch row ``i``.

    Every generated token is an accepted draft or a large-model token, and each large forward yields
    at most one token, so ``generated(i) == accepted[i] + (tokens the large model chose)``.
    """

    small_forwards: list[int] = field(default_factory=list)  # small-model forwards that advanced the row
    large_forwards: list[int] = field(default_factory=list)  # large-model forwards that advanced the row
    drafted: list[int] = field(
        default_factory=list
    )  # draft tokens proposed (the dropped unconfident one is not)
    accepted: list[int] = field(default_factory=list)  # drafts kept after verification
    fallbacks: list[int] = field(default_factory=list)  # rounds ended by low small-model confidence
    rollbacks: list[int] = field(default_factory=list)  # rounds in which a draft was rolled back

    @classmethod
    def zeros(cls, batch_size: int) -> BildStats:
        return cls(**{f.name: [0] * batch_size for f in fields(cls)})

    @classmethod
    def concat(cls, parts: list[BildStats]) -> BildStats:
        """Stack the rows of several stats objects (e.g. rows decoded one by one)."""
        return cls(**{f.name: [n for part in parts for n in getattr(part, f.name)] for f in fields(cls)})

    @property
    def batch_size(self) -> int:
        return len(self.large_forwards)

    def total(self, name: str) -> int:
        """Sum of one counter over all rows, e.g. ``stats.total("large_forwards")``."""
        return sum(getattr(self, name))

    def to_dict(self) -> dict[str, list[int]]:
        return {f.name: list(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in fields(cls)]

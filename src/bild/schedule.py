"""How many tokens to draft each round: a fixed cap, or ``"auto"``, a cost-aware cap from stored costs.

``max_draft_tokens="auto"`` picks, before each round, the cap ``k`` in ``0..AUTO_MAX_DRAFT_TOKENS`` that
maximizes the expected tokens per unit of cost of that round, from

- `DraftCosts`: the cost of a small-model forward and of a large-model forward by the number of tokens
  fed (all rows together), in units of one single-token large forward. Measured once per pair and machine
  on first use and stored (`DraftCosts.for_pair`), or given (`DraftCosts.measure`, saved as JSON): never
  from live timings during generation, so the same call gives the same output;
- per row, how often the small model stayed confident (``r``, it drafts another token) and how often the
  large model kept a draft (``a``) in recent rounds (decayed counts with a prior).

With independent steps, a row drafts ``j`` tokens with probability ``r^j`` and keeps them with ``a^j``:
expected tokens of a round with cap ``k`` are ``sum_b 1 + sum_{j=1..k} (r_b a_b)^j`` (the large model's
own token is always one), expected cost ``sum_{j<k} small(rows still drafting at step j) +
large(tokens fed)``. ``k = 0`` is a plain large-model step: it wins where drafting does not pay (a small
model that is rarely confident, or batches whose verification is compute-bound on a few CPU cores).
The same costs price the round's other choices: how many context drafts a row proposes
(`DraftSchedule.context_caps`) and which candidates the large model checks at an unsure position
(`CandidateRule`, ``fallback_candidates="auto"``).
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

from .home import fit_file, write_json
from .kernels import PackedLinear, model_fingerprint
from .lean import loop_forward
from .timing import forwards_ms, machine_key

logger = logging.getLogger(__name__)

AUTO = "auto"
AUTO_MAX_DRAFT_TOKENS = 20  # the largest cap "auto" considers
AUTO_MAX_CANDIDATES = 4  # the most tokens fallback_candidates="auto" checks at an unsure position
PROFILE_TOKENS = (1, 2, 4, 8, 16, 32, 64)  # tokens fed per forward that `DraftCosts.measure` times
# what `DraftCosts.for_pair` times on first use: enough to price drafting and verification, in seconds
COST_TOKENS = (1, 2, 4, 8, 16, 32)
COST_CONTEXT = 64
COST_REPEATS = 3
COSTS_VERSION = 2  # in the stored costs' key: 2 made them non-decreasing in tokens fed (`DraftCosts.from_ms`)
# Extra cost of each further token fed to one forward, relative to a single-token forward, measured on
# the project's reference machines (README, "Where the time goes"): GPUs are bound by per-call overhead,
# CPUs by weight bytes in bfloat16 and by arithmetic in float32.
TOKEN_SLOPE = {"cuda": 0.01, "cpu-bfloat16": 0.04, "cpu-float32": 0.19}
PRIOR_RATE = 0.8  # assumed confidence / acceptance before a row has drafted
PRIOR_WEIGHT = 2.0  # how many drafts' worth of evidence the prior counts for
DECAY = 0.8  # weight kept by past evidence each round (recent rounds matter most)


@dataclass(frozen=True)
class DraftCosts:
    """Forward costs of a pair, in units of one large-model forward over one token (batch of one).

    small / large: ``(tokens fed, cost)`` points, tokens fed counted over all rows of a batch; costs in
    between are interpolated linearly, beyond the last point extrapolated from the last two.
    """

    small: tuple[tuple[int, float], ...]
    large: tuple[tuple[int, float], ...]

    def __post_init__(self):
        for name, least in (("small", 0.0), ("large", 1e-9)):  # a free drafter is a limit worth stating
            points = getattr(self, name)
            if not points or any(len(p) != 2 or p[0] < 1 or not p[1] >= least for p in points):
                raise ValueError(
                    f"DraftCosts.{name} must be a non-empty list of (tokens fed >= 1, cost {'>= 0' if least == 0 else '> 0'}) "
                    f"pairs, got {points!r}. Make one with bild.DraftCosts.measure(large, small) or "
                    "scripts/profile_pair.py --save."
                )
            object.__setattr__(self, name, tuple(sorted((int(n), float(c)) for n, c in points)))

    def small_cost(self, n_tokens: float) -> float:
        return _interpolate(self.small, n_tokens)

    def large_cost(self, n_tokens: float) -> float:
        return _interpolate(self.large, n_tokens)

    @classmethod
    def estimate(cls, large: PreTrainedModel, small: PreTrainedModel) -> DraftCosts:
        """Costs without timing anything: a forward costs the weight bytes it reads, plus a per-token slope.

        A rough guess (the slope comes from the project's reference machines): `for_pair` measures instead.
        """
        ratio = forward_bytes(small) / forward_bytes(large)
        slope = TOKEN_SLOPE["cuda"] if large.device.type == "cuda" else TOKEN_SLOPE[
            "cpu-float32" if large.dtype == torch.float32 else "cpu-bfloat16"]  # fmt: skip
        points = (1, PROFILE_TOKENS[-1])
        return cls(
            small=tuple((n, ratio * (1 + slope * (n - 1))) for n in points),
            large=tuple((n, 1 + slope * (n - 1)) for n in points),
        )

    @classmethod
    def measure(cls, large: PreTrainedModel, small: PreTrainedModel, context: int = 128, repeats: int = 5,
                tokens: tuple[int, ...] = PROFILE_TOKENS) -> DraftCosts:  # fmt: skip
        """Time one forward of each model by tokens fed, after ``context`` cached tokens (median of ``repeats``), each
        as bild's loop runs it (by its lean forward where that applies)."""
        with torch.no_grad():  # as generate() runs (inference mode would make a compiled drafter compile again)
            large_ms = forwards_ms(large, context, tokens, repeats, in_loop=True)
            small_ms = forwards_ms(small, context, tokens, repeats, in_loop=True)
        return cls.from_ms(small_ms, large_ms)

    @classmethod
    def for_pair(cls, large: PreTrainedModel, small: PreTrainedModel) -> DraftCosts:
        """The pair's costs on this machine: measured on first use (seconds), stored, and read back after.

        Stored as JSON under ``$BILD_HOME/fit``, one file per (both models' shapes, compression and kernels, and
        how the loop runs each (`bild.lean.loop_forward`); device, dtype, threads, CPU kernels, torch version:
        `bild.timing.machine_key`; `COSTS_VERSION`). A file that cannot be read, or that was written for another key,
        is measured again with a warning. A drafter that runs inside the large model (`bild.early_exit`) is not timed
        alone: its costs are estimated.
        """
        if hasattr(small, "bild_decoders"):
            return cls.estimate(large, small)
        key = {"large": model_fingerprint(large), "small": model_fingerprint(small), "machine": machine_key(large),
               "small_forward": loop_forward(small), "large_forward": loop_forward(large),
               "version": COSTS_VERSION}  # fmt: skip
        path = fit_file("costs", key)
        if path.is_file():
            try:
                stored = json.loads(path.read_text(encoding="utf-8"))
                if stored.get("key") != key:
                    raise ValueError("it was measured for other models or another machine")
                return cls.load({"small": stored["small"], "large": stored["large"]})
            except (OSError, ValueError, KeyError, TypeError) as err:
                warnings.warn(f"bild: draft costs in {path} are unusable ({err}); measuring them again.", stacklevel=2)
        start = time.perf_counter()
        costs = cls.measure(large, small, context=COST_CONTEXT, repeats=COST_REPEATS, tokens=COST_TOKENS)
        try:
            write_json(path, {"key": key, **asdict(costs)})
        except OSError as err:
            warnings.warn(f"bild: could not store draft costs in {path} ({err}).", stacklevel=2)
        logger.warning(
            "bild: measured draft costs in %.0f s, stored in %s: small %s, large %s (x one single-token large forward)",
            time.perf_counter() - start, path, _points(costs.small), _points(costs.large),
        )  # fmt: skip
        return costs

    @classmethod
    def from_ms(cls, small_ms: dict[int, float], large_ms: dict[int, float]) -> DraftCosts:
        """Costs from forward times by tokens fed, in units of the large model's fewest-token forward.

        A forward over fewer tokens never costs more than one over more, so a time above a later point's is timing
        noise (a shared machine put a drafter's 1-token forward at 0.26 of a large step and its 2-token one at 0.17):
        each point is lowered to the least time at or after it."""
        small_ms, large_ms = _non_decreasing(small_ms), _non_decreasing(large_ms)
        unit = large_ms[min(large_ms)]
        return cls(tuple((n, ms / unit) for n, ms in small_ms.items()), tuple((n, ms / unit) for n, ms in large_ms.items()))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, source: str | Path | dict | DraftCosts) -> DraftCosts:
        """A `DraftCosts`, a mapping ``{"small": [[n, cost], ...], "large": [...]}``, or a JSON file of one."""
        if isinstance(source, DraftCosts):
            return source
        if isinstance(source, (str, Path)):
            try:
                source = json.loads(Path(source).read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as err:
                raise ValueError(f"Could not read draft costs from {str(source)!r}: {err}") from err
        if not isinstance(source, dict) or set(source) != {"small", "large"}:
            raise ValueError(f"Draft costs need exactly the keys 'small' and 'large', got {source!r}.")
        return cls(tuple(map(tuple, source["small"])), tuple(map(tuple, source["large"])))


def _non_decreasing(ms: dict[int, float]) -> dict[int, float]:
    """``{tokens: ms}`` with each time lowered to the least at that many tokens or more."""
    least, out = math.inf, {}
    for n in sorted(ms, reverse=True):
        least = out[n] = min(least, ms[n])
    return dict(sorted(out.items()))


def forward_bytes(model: PreTrainedModel) -> int:
    """Bytes of weights a forward reads: all but the input embedding table (one row a token)."""
    if hasattr(model, "bild_forward_bytes"):  # a drafter that runs part of another model (bild.early_exit)
        return model.bild_forward_bytes()
    prefill_only = {id(t) for m in model.modules() if getattr(m, "dense", None) is not None  # read for prefill only
                    for t in (*m.dense.parameters(), *m.dense.buffers())}  # fmt: skip
    total = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()) if id(t) not in prefill_only)
    total += sum(m.nbytes for m in model.modules() if isinstance(m, PackedLinear) and id(m.packed) not in prefill_only)
    embeddings = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if embeddings is not None and getattr(head, "weight", None) is not embeddings.weight:
        total -= embeddings.weight.numel() * embeddings.weight.element_size()
    return max(total, 1)


def _points(points: tuple[tuple[int, float], ...]) -> str:
    return " ".join(f"{n}:{c:.2f}" for n, c in points)


def _interpolate(points: tuple[tuple[int, float], ...], n: float) -> float:
    """Piecewise-linear cost at ``n`` tokens fed; extrapolated from the nearest segment outside the points."""
    if len(points) == 1:
        return points[0][1] * max(n, 1) / points[0][0]  # one point: proportional to tokens fed
    segment = next((i for i in range(len(points) - 1) if n <= points[i + 1][0]), len(points) - 2)
    (n0, c0), (n1, c1) = points[segment], points[segment + 1]
    return max(c0 + (c1 - c0) * (n - n0) / (n1 - n0), 0.0)


class DraftSchedule:
    """The draft cap of each round: ``fixed`` every round, or chosen by the cost model ("auto")."""

    def __init__(
        self, batch_size: int, device: torch.device, fixed: int | None,
        costs: DraftCosts | Callable[[], DraftCosts] | None,
    ):  # fmt: skip
        """``costs``: the pair's draft costs (needed for ``fixed=None``, the "auto" cap), or a callable that measures
        them when first needed (`pair_costs`: a call that never prices anything never pays the seconds it takes)."""
        self.fixed = fixed
        self._costs = costs
        self.candidates = CandidateRule(0)  # how many tokens the large model checks at an unsure position
        # decayed evidence per row: [B] small steps, drafts (= confident steps), accepted drafts
        self.steps = torch.zeros(batch_size, device=device)
        self.drafted = torch.zeros(batch_size, device=device)
        self.accepted = torch.zeros(batch_size, device=device)
        # and context drafts (prompt lookup): [B] kept, and copies cut short (fewer kept than proposed)
        self.context_kept = torch.zeros(batch_size, device=device)
        self.context_stops = torch.zeros(batch_size, device=device)

    def next_cap(self, is_active: torch.Tensor) -> int:
        """The most drafts any active row may make this round (0: a plain large-model step)."""
        if self.fixed is not None:
            return self.fixed
        r = (self.drafted + PRIOR_RATE * PRIOR_WEIGHT) / (self.steps + PRIOR_WEIGHT)  # [B]
        a = (self.accepted + PRIOR_RATE * PRIOR_WEIGHT) / (self.drafted + PRIOR_WEIGHT)  # [B]
        return best_cap(r[is_active].tolist(), a[is_active].tolist(), self.pair_costs())

    def pair_costs(self) -> DraftCosts | None:
        """The pair's draft costs, which price the cap, context drafts and candidates; measured once if a callable."""
        if callable(self._costs):
            self._costs = self._costs()
        return self._costs

    def context_caps(self, n_lookup: int | None, sampling: bool) -> torch.Tensor | None:
        """Greedy, under either cap: the most context drafts each row may propose this round, `(batch_size,)`;
        None: ``n_lookup`` for every row (or no context drafts at all).

        The small model checks a row's context drafts in its next forward, which reads them all: ``n`` of them
        cost ``small(n + 1) - small(1)`` more than one step, and each it keeps saves a step (``small(1)``).
        With ``c`` the chance that a copy goes on one more token, ``n`` drafts keep ``c + c^2 + ... + c^n`` on
        average; the cap is the ``n`` in ``0..n_lookup`` with the largest saving over cost. ``c`` is estimated as
        a geometric rate cut short by the cap: tokens kept over tokens kept plus copies that ended before their
        proposal did (kept over proposed would read a copy of 10 that keeps 6 of them as 0.6 where it is 0.86,
        and copies are mostly either right for long or wrong at once). (Sampling has no check: every context
        draft goes to the large model, and ``n_lookup`` stays.)
        """
        if self._costs is None or sampling or not n_lookup:
            return None
        costs = self.pair_costs()
        c = ((self.context_kept + PRIOR_RATE * PRIOR_WEIGHT)
             / (self.context_kept + self.context_stops + PRIOR_WEIGHT)).tolist()  # fmt: skip
        step = costs.small_cost(1)
        extra = [costs.small_cost(n + 1) - step for n in range(n_lookup + 1)]
        caps = []
        for rate in c:
            kept = [sum(rate**i for i in range(1, n + 1)) for n in range(n_lookup + 1)]
            caps.append(max(range(n_lookup + 1), key=lambda n: (kept[n] * step - extra[n], -n)))
        return torch.tensor(caps, dtype=torch.long, device=self.steps.device)

    def update_context(self, is_active, n_proposed, n_kept) -> None:
        """Learn from this round's context drafts: proposed and kept per row, `(batch_size,)` each."""
        keep = torch.where(is_active, DECAY, 1.0)
        self.context_kept = self.context_kept * keep + n_kept * is_active
        self.context_stops = self.context_stops * keep + (n_kept < n_proposed) * is_active

    def update(self, is_active, n_steps, n_drafted, n_accepted) -> None:
        """Learn from this round: small steps taken, drafts made, drafts kept; `(batch_size,)` each."""
        if self.fixed is not None:
            return
        keep = torch.where(is_active, DECAY, 1.0)
        self.steps = self.steps * keep + n_steps * is_active
        self.drafted = self.drafted * keep + n_drafted * is_active
        self.accepted = self.accepted * keep + n_accepted * is_active


def best_cap(r: list[float], a: list[float], costs: DraftCosts, max_cap: int = AUTO_MAX_DRAFT_TOKENS) -> int:
    """The cap ``k`` that maximizes expected tokens per cost for rows with confidence ``r`` and acceptance ``a``."""
    n_rows = len(r)
    best_k, best_rate = 0, n_rows / costs.large_cost(n_rows)
    tokens, cost_small, drafted = float(n_rows), 0.0, 0.0
    for k in range(1, max_cap + 1):
        drafting = sum(rb ** (k - 1) for rb in r)  # expected rows that reach step k - 1
        cost_small += min(1.0, drafting) * costs.small_cost(max(1.0, drafting))
        drafted += sum(rb**k for rb in r)
        tokens += sum((rb * ab) ** k for rb, ab in zip(r, a, strict=True))
        rate = tokens / (cost_small + costs.large_cost(n_rows + drafted))
        if rate >= best_rate:
            best_k, best_rate = k, rate
    return best_k


@dataclass
class CandidateRule:
    """How many of the small model's most likely tokens the large model checks at an unsure position.

    most: K, the most per row (0: none, the paper's rule; 1: the unsure token; more: siblings too).
    costs: for ``fallback_candidates="auto"``: the unsure token is always checked, and each next candidate ``j``
        (its small-model probability ``q_j``, in order) when ``q_j`` is at least the extra cost of verifying one
        more token, in single-token large forwards: its expected gain is ``q_j`` tokens, a plain large step
        yields one token per unit of cost. (At unsure positions the top token was right 42% of the time against
        a mean ``q_1`` of 0.26, the others about as often as ``q_j`` says: docs/measured.md.)
        Where a few more tokens cost the large forward almost nothing (bfloat16, oneDNN kernels) likely
        candidates are checked; where cost grows fast with tokens (stock float32 kernels on AVX2), none are.
        A callable returning the pair's costs (`DraftSchedule.pair_costs`), called the first time a sibling
        could be checked (measuring a pair takes seconds: a call that never falls back, or checks the unsure token
        alone, never pays it). None: always ``most``.
    """

    most: int
    costs: Callable[[], DraftCosts] | None = None

    def per_row(self, probs: torch.Tensor, n_fed: torch.Tensor) -> torch.Tensor:
        """`(batch_size,)` candidates to check for rows unsure with processed probabilities `(batch_size, V)`,
        when each row's part of the large model's forward would otherwise read ``n_fed[b]`` tokens. Each row is
        priced as if it ran alone, so its choice, and so its output, never depends on its batch-mates."""
        if self.costs is None or self.most <= 1:
            return torch.full((len(probs),), self.most, dtype=torch.long, device=probs.device)
        top = probs.topk(self.most, dim=-1).values  # [B, K]
        large = self.costs().large_cost
        extra = torch.tensor(
            [[large(n + j) - large(n + j - 1) for j in range(1, self.most + 1)] for n in n_fed.tolist()],
            dtype=top.dtype, device=top.device,
        )  # fmt: skip
        pays = top >= extra
        pays[:, 0] = True  # the unsure token itself: the small model's top token is right more often than it says
        return pays.long().cumprod(dim=-1).sum(dim=-1)

"""Simulate lossless greedy BiLD's rounds from the final text and one teacher-forced small forward.

In lossless greedy BiLD (``rollback_threshold=0``) every draft the large model keeps is its own greedy token,
so a round only ever sees the small model's distribution ``q(t)`` at positions ``t`` whose prefix is the
final text ``y`` (the large model's greedy output): one teacher-forced forward of the small model over
prompt + ``y`` gives every one of them. Drafting goes on past a wrong draft until the small model stops
(unsure, cap, EOS, length limit): those drafts are off the path and are rejected, but their small forwards
count; they are replayed once per position where the small model's top token is wrong ("rollouts", one
token at a time from a copy of the teacher-forced cache). With both, the round structure of any drafting
policy is counted exactly, without the large model (ties between a forward over many tokens and one over
one token aside):

- ``plain``: ``fallback_candidates=1`` (the default): the unsure token is the round's last draft;
- ``+cK``: its K - 1 next-best tokens are checked beside it (``fallback_candidates=K``);
- ``+cK+pM`` (not in the loop): the small model drafts M tokens past each of the K candidates (M forwards
  over K rows); the large model verifies the tree in its one forward. Where the large model's token is
  one of the K, the continuation after it is kept up to its first mismatch, and the large model's token
  after that comes free. ``...s``: the continuation also stops at its own first unsure token (kept when
  right); without ``s`` it drafts all M;
- ``+cK chainN`` (not in the loop): drafting does not stop at the first unsure token: the top token goes on,
  the K - 1 next-best stay leaves at that position; drafting stops at the N-th unsure token (the last
  candidate, with its leaves) or the cap. A leaf the large model chooses is kept and the token after it
  comes free.

Counts per policy: tokens per large forward, small forwards per token, small rows per token (a forward
over K rows counts K), tokens verified per large forward (the tree: the large model's previous token,
drafts, candidates, leaves, continuations), and a projected time per token in single-token large forwards
(``sum c_large(verified) + sum c_small(rows)``, prompt prefills excluded: both models read the prompt once
whatever the policy) under the pair's measured forward costs on two machine kinds (`COSTS`).

    .venv/bin/python scripts/simulate_rounds.py --config configs/variants/qwen-coder-de-en.yaml [--limit N]

``--validate`` also runs the real loop (plain and +c3) on every example and compares its ``bild_stats``
with the simulated counts of the same example.

``--candidates`` also asks which of the small model's top tokens to check at an unsure position: fixed K
(``+cK``), candidate j >= 2 while ``q_j >= tau`` (``+c<=8 q>=tau``), or while ``q_j * v >=`` the extra cost of
one more verified token under a machine's costs (``q*v>=dcost [machine]``; v = 1 at most 4 is
``fallback_candidates="auto"``, and counts as the loop does: tests/test_simulate_rounds.py), with the
candidates checked per unsure round; and the small model's calibration at the unsure positions plain's rounds
reach on the path: per rank j, mean q_j against how often the large model's token is the j-th, and the same
by bins of q_j. ``--traces FILE`` writes the traces (or reads them when FILE exists, loading no model), so
new policies are counted again in seconds. Context drafts (prompt lookup) are not simulated: where the small
model agrees with a wrong context draft it drafts on from an off-path prefix no forward here has seen.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from bild.compat import cache_kwarg, crop_cache, new_cache
from bild.schedule import DraftCosts

THRESHOLD = 0.5  # fallback_threshold, as in configs/variants/*.yaml
CAP = 20  # max_draft_tokens
K_MAX = 8  # top tokens kept per position

# Forward costs of the pair (Qwen2.5-Coder 1.5B large, 0.5B int4 drafter, oneDNN kernels), in single-token
# large forwards, by tokens fed.
COSTS = {
    # docs/measured.md, "One forward by tokens fed" (scripts/profile_pair.py --compress int4 --kernels both),
    # AVX-512 BF16 machine, bfloat16: the "large oneDNN" and "int4 drafter" columns divided by large oneDNN's
    # single-token forward (0.62); the large model's 4-token point (0.57, below its 1-token 0.62: noise) is
    # raised to its 2-token cost so that reading more never costs less.
    "bf16": DraftCosts(
        small=((1, 0.194), (2, 0.242), (4, 0.274), (8, 0.468), (16, 0.855), (32, 1.565), (64, 3.129)),
        large=((1, 1.0), (2, 1.097), (4, 1.097), (8, 1.226), (16, 1.468), (32, 2.403), (64, 4.323)),
    ),
    # ~/.cache/bild/fit/costs-a4b6988e49b207b10bf3.json: DraftCosts.for_pair on the AVX2 float32 machine
    # (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2, 2 threads, oneDNN kernels, int4 drafter with dense prefill)
    "avx2-fp32": DraftCosts(
        small=((1, 0.154), (2, 0.164), (4, 0.188), (8, 0.348), (16, 0.633), (32, 1.003)),
        large=((1, 1.0), (2, 1.151), (4, 1.208), (8, 1.373), (16, 1.793), (32, 2.604)),
    ),
}


@dataclass(frozen=True)
class Policy:
    """How a round drafts: K candidates at an unsure position, stop at the n-th unsure token, M tokens past
    each candidate (``stop_past``: past drafts stop at their own unsure token).

    With a rule, ``k`` is the most candidates and candidate j (1-based, small-model probability q_j, in order)
    is checked while: ``tau``: j = 1 or q_j >= tau; ``value``: j = 1 or q_j * value >= the extra cost of verifying
    one more token in the round's large forward under ``COSTS[machine]`` (value 1, at most 4: ``fallback_candidates=
    "auto"``, `bild.schedule.CandidateRule`); 0 candidates drop the unsure token (the paper's rule).
    """

    k: int = 1
    n_unsure: int = 1
    m_past: int = 0
    stop_past: bool = False
    tau: float | None = None
    value: float | None = None
    machine: str | None = None

    @property
    def name(self) -> str:
        if self.tau is not None:
            return f"+c<={self.k} q>={self.tau:g}"
        if self.value is not None:
            return f"+c<={self.k} q*{self.value:g}>=dcost [{self.machine}]"
        name = "plain" if self.k == 1 and not self.m_past else f"+c{self.k}"
        if self.m_past:
            name += f"+p{self.m_past}" + ("s" if self.stop_past else "")
        if self.n_unsure > 1:
            name += f" chain{self.n_unsure}"
        return name

    def n_candidates(self, probs: list[float], n_fed: int) -> int:
        """Candidates checked at an unsure position with top probabilities ``probs``, when the large forward
        would otherwise read ``n_fed`` tokens (the round's drafts before it, and the large model's previous one)."""
        if self.tau is None and self.value is None:
            return self.k
        costs = COSTS[self.machine] if self.value is not None else None
        n = 0
        for j, q in enumerate(probs[: self.k], start=1):
            if self.tau is not None:
                pays = j == 1 or q >= self.tau
            else:
                pays = j == 1 or q * self.value >= costs.large_cost(n_fed + j) - costs.large_cost(n_fed + j - 1)
            if not pays:
                break
            n = j
        return n


POLICIES = (
    Policy(1),
    Policy(3),
    Policy(1, m_past=2),
    Policy(3, m_past=1),
    Policy(3, m_past=2),
    Policy(3, m_past=4),
    Policy(3, m_past=4, stop_past=True),
    Policy(1, n_unsure=2),
    Policy(3, n_unsure=2),
    Policy(3, n_unsure=3),
)
# --candidates: which of the small model's top tokens to check at an unsure position
CANDIDATE_POLICIES = (
    *(Policy(k) for k in (1, 2, 3, 4, 6, 8)),
    *(Policy(K_MAX, tau=tau) for tau in (0.2, 0.1, 0.05, 0.02, 0.01)),  # tau 0 is +c8
    *(Policy(k, value=v, machine=m) for m in COSTS for k, v in ((4, 1), (K_MAX, 1), (K_MAX, 2), (K_MAX, 4))),
)
Q_BINS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.5)  # calibration bins of q_j (an unsure position's q_1 < 0.5)


@dataclass
class Trace:
    """What the small model sees along one example's final text, and where it would go off it.

    y: the large model's tokens (at least ``n_end``; past it where a stop string ended the output early).
    n_end: tokens in the output. limit: max_new_tokens.
    top: `(T, K_MAX)` the small model's top tokens at position t given ``y[:t]``; probs: their probabilities.
    rollouts: for each t whose top token is not y[t]: the small model's own steps after it, each
        ``(top tokens, their probabilities)``, drafting one token at a time as the loop does.
    """

    y: list[int]
    n_end: int
    limit: int
    top: list[list[int]]
    probs: list[list[float]]
    rollouts: dict[int, list[tuple[list[int], list[float]]]] = field(default_factory=dict)

    @property
    def maxp(self) -> list[float]:
        return [p[0] for p in self.probs]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Trace:
        rollouts = {
            int(t): [(top, probs) for top, probs in steps] for t, steps in data.pop("rollouts").items()
        }
        return cls(**data, rollouts=rollouts)


@dataclass
class Counts:
    """Simulated counts of one policy over examples; names as in `bild.BildStats` where they exist."""

    generated: int = 0
    large_forwards: int = 0
    small_forwards: int = 0
    accepted: int = 0
    fallbacks: int = 0
    drafted: int = 0  # tokens verified besides the large model's previous one (drafts, candidates, leaves)
    siblings: int = 0
    small_rows: int = 0  # small forwards weighted by the rows (tokens) each reads
    verified: int = 0  # tokens fed to the large model, its previous token included (prompt prefill excluded)
    candidates: int = 0  # tokens checked at unsure positions (the unsure token and its siblings)
    large_fed: list[int] = field(default_factory=list, repr=False)  # per large forward
    small_fed: list[int] = field(default_factory=list, repr=False)  # per small forward
    # per round that ends unsure on the path (its drafts before right): (top probabilities, rank of the large
    # model's token among the top tokens, 1-based; 0: not among them)
    unsure_on_path: list[tuple[list[float], int]] = field(default_factory=list, repr=False)

    def add(self, other: Counts) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    def stats(self) -> dict[str, int]:
        """The fields `bild.BildStats` also counts."""
        return {n: getattr(self, n) for n in ("generated", "large_forwards", "small_forwards", "accepted",
                                               "fallbacks", "drafted", "siblings")}  # fmt: skip

    def time_per_token(self, costs: DraftCosts) -> float:
        """Single-token large forwards per generated token (large alone: 1.0), prompt prefills excluded."""
        total = sum(costs.large_cost(n) for n in self.large_fed) + sum(
            costs.small_cost(n) for n in self.small_fed
        )
        return total / max(self.generated, 1)


@torch.inference_mode()
def trace(small, prompt_ids: torch.Tensor, y: list[int], n_end: int, limit: int, eos_ids: set[int],
          vocab_size: int, threshold: float = THRESHOLD, cap: int = CAP, n_unsure: int = 3) -> Trace:  # fmt: skip
    """One teacher-forced forward of ``small`` over prompt + ``y``, and its rollouts off the path.

    ``prompt_ids``: `(1, P)`. Rollouts go at most ``cap - 1`` tokens, to ``limit``, an EOS, or ``n_unsure``
    unsure tokens: as far as any policy with at most ``n_unsure`` unsure tokens per round drafts.
    """
    n_prompt = prompt_ids.shape[1]
    ids = torch.cat([prompt_ids, torch.tensor([y[:-1]], dtype=torch.long, device=prompt_ids.device)], dim=1)
    cache = new_cache(small)
    out = small(input_ids=ids, use_cache=True, logits_to_keep=len(y), **{cache_kwarg(small): cache})
    logits = out.logits[0, -len(y) :]  # position t predicts y[t] from prompt + y[:t]
    top, probs = _top(logits[:, :vocab_size])
    maxp = [p[0] for p in probs]
    result = Trace(list(y), n_end, limit, top, probs)
    for t in range(len(y)):
        first = top[t][0]
        if first == y[t] or first in eos_ids or t + 1 >= limit:
            continue  # on the path, or drafting stops at this token: nothing drafted after it
        branch = copy.deepcopy(cache)
        crop_cache(branch, ids.shape[1] - (n_prompt + t))  # keep prompt + y[:t]
        steps, token, n_seen_unsure = [], first, int(maxp[t] < threshold)
        for _ in range(t + 1, min(limit, t + cap)):
            out = small(input_ids=torch.tensor([[token]], device=ids.device), use_cache=True,
                        **{cache_kwarg(small): branch})  # fmt: skip
            step_top, step_probs = _top(out.logits[0, -1:, :vocab_size])
            steps.append((step_top[0], step_probs[0]))
            token = step_top[0][0]
            n_seen_unsure += step_probs[0][0] < threshold
            if token in eos_ids or n_seen_unsure >= n_unsure:
                break
        result.rollouts[t] = steps
    return result


def _top(logits: torch.Tensor) -> tuple[list[list[int]], list[list[float]]]:
    probs = logits.float().softmax(dim=-1)
    values, indices = probs.topk(K_MAX, dim=-1)
    return indices.tolist(), values.tolist()


def simulate(
    tr: Trace, policy: Policy, eos_ids: set[int], threshold: float = THRESHOLD, cap: int = CAP
) -> Counts:
    """The rounds of ``policy`` on one example: counted as the loop counts them (`bild.BildStats`)."""
    c = Counts(generated=tr.n_end)
    s = 0
    while s < tr.n_end:
        written, n_unsure, ends_unsure = draft_round(tr, policy, s, eos_ids, threshold, cap, c)
        n_leaves = sum(max(w[2] - 1, 0) for w in written)
        c.candidates += sum(w[2] for w in written)
        k = written[-1][2] if written else 0
        past = 0  # tokens drafted past the last candidate (each of its K rows)
        if ends_unsure and policy.m_past and k:
            past = min(policy.m_past, tr.limit - written[-1][0] - 1)
            c.small_forwards += past
            c.small_fed += [k] * past
        n_tokens = kept_tokens(tr, policy, written, ends_unsure, past, eos_ids, threshold)
        c.large_forwards += 1
        c.fallbacks += n_unsure > 0
        c.drafted += len(written) + n_leaves + k * past
        c.siblings += n_leaves
        c.large_fed.append(1 + len(written) + n_leaves + k * past)
        c.accepted += min(n_tokens - 1, tr.n_end - s)
        s += min(n_tokens, tr.n_end - s)
    c.small_rows = sum(c.small_fed)
    c.verified = sum(c.large_fed)
    return c


def draft_round(
    tr: Trace, policy: Policy, s: int, eos_ids: set[int], threshold: float, cap: int, c: Counts
) -> tuple[list, int, bool]:
    """The small model's steps of the round starting at ``s``, counted into ``c``: ``(written, n_unsure,
    ends_unsure)``, ``written`` the round's drafts in order as (position, top tokens, candidates, right)."""
    written = []
    off = None  # position of the round's first wrong draft: later drafts come from its rollout
    n_unsure, ends_unsure, t = 0, False, s
    for _ in range(cap):
        if t >= tr.limit:
            break
        if off is None:
            top, probs = tr.top[t], tr.probs[t]
        else:
            top, probs = tr.rollouts[off][t - off - 1]
        c.small_forwards += 1
        c.small_fed.append(1)
        right = off is None and top[0] == tr.y[t]
        unsure = probs[0] < threshold
        n_unsure += unsure
        k = policy.n_candidates(probs, len(written) + 1) if unsure else 0
        if unsure and off is None and t < tr.n_end:
            c.unsure_on_path.append((probs, top.index(tr.y[t]) + 1 if tr.y[t] in top else 0))
        if k or not unsure:
            written.append((t, top, k, right))
        if off is None and not right:
            off = t
        if unsure and n_unsure == policy.n_unsure:
            ends_unsure = True
            break
        if top[0] in eos_ids:
            break
        t += 1
    return written, n_unsure, ends_unsure


def kept_tokens(
    tr: Trace, policy: Policy, written: list, ends_unsure: bool, past: int, eos_ids: set[int], threshold: float
) -> int:
    """The verification: drafts are kept up to the first wrong one; a leaf (or candidate) equal to the large model's
    token there is kept too, and the token after it (or after its continuation) comes free. Returns the tokens the
    round adds, the large model's own included."""
    y = tr.y
    for i, (pos, top, n_checked, right) in enumerate(written):
        is_last = i == len(written) - 1
        if right and not is_last:
            continue
        in_top = y[pos] in top[:n_checked] if pos < len(y) else False
        if not right and not in_top:
            return i + 1
        if is_last and ends_unsure and policy.m_past and n_checked:
            return i + 2 + continuation(tr, pos, past, policy.stop_past, eos_ids, threshold)
        return i + 2
    return len(written) + 1


def continuation(tr: Trace, pos: int, m: int, stop: bool, eos_ids: set[int], threshold: float) -> int:
    """Tokens kept of the small model's ``m`` drafts after the right candidate at ``pos`` (teacher-forced:
    that candidate is y[pos]): up to the first wrong one; with ``stop``, up to its first unsure one too."""
    n = 0
    for u in range(pos + 1, pos + 1 + m):
        if u >= len(tr.y) or tr.top[u][0] != tr.y[u]:
            break
        n += 1
        if tr.y[u] in eos_ids or (stop and tr.probs[u][0] < threshold):
            break
    return n


def stop_length(criteria, prompt_ids: torch.Tensor, y: list[int]) -> int | None:
    """The first number of new tokens at which ``criteria`` (e.g. stop strings) end the output, or None."""
    if not criteria:
        return None
    ids = torch.cat([prompt_ids, torch.tensor([y], dtype=torch.long, device=prompt_ids.device)], dim=1)
    for n in range(1, len(y) + 1):
        if bool(criteria(ids[:, : prompt_ids.shape[1] + n], None).any()):
            return n
    return None


def bild_call(large, prompt_ids, max_new_tokens, eos_ids, pad_id, criteria=None, **settings):
    """``(new tokens through the first EOS, BildStats)`` of one real lossless BiLD call, without context drafts
    (the simulation does not model them)."""
    kwargs = dict(fallback_threshold=THRESHOLD, rollback_threshold=0.0, max_draft_tokens=CAP,
                  prompt_lookup_num_tokens=0)
    kwargs.update(settings)
    out = large.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), generation_mode="bild",
                         do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=sorted(eos_ids),
                         pad_token_id=pad_id, stopping_criteria=criteria, return_dict_in_generate=True,
                         **kwargs)  # fmt: skip
    ids = out.sequences[0, prompt_ids.shape[1] :].tolist()
    end = next((i + 1 for i, token in enumerate(ids) if token in eos_ids), len(ids))
    return ids[:end], out.bild_stats


def example_trace(large, small, prompt_ids, max_new_tokens, eos_ids, pad_id, vocab_size, criteria=None,
                  validate: bool = False):  # fmt: skip
    """The trace of one example and, with ``validate``, the real stats of plain and +c3 on it
    (``{name: (stats dict, same output as the trace)}``)."""
    y, plain_stats = bild_call(large, prompt_ids, max_new_tokens, eos_ids, pad_id, fallback_candidates=1)
    n_end = len(y)
    if criteria:  # y went on past the stop string: the round that crosses it drafts past it too
        n_end = stop_length(criteria, prompt_ids, y) or len(y)
    tr = trace(small, prompt_ids, y, n_end, max_new_tokens, eos_ids, vocab_size)
    real = {}
    if validate:
        for policy in (Policy(1), Policy(3)):
            if policy.k == 1 and not criteria:
                ids, stats = y, plain_stats
            else:
                ids, stats = bild_call(large, prompt_ids, max_new_tokens, eos_ids, pad_id, criteria,
                                       fallback_candidates=policy.k)  # fmt: skip
            real[policy.name] = ({n: int(v[0]) for n, v in stats.to_dict().items()}, ids == y[:n_end])
    return tr, real


def summarize(counts: dict[str, Counts], policies=POLICIES) -> list[dict]:
    rows = []
    for policy in policies:
        c = counts[policy.name]
        row = {
            "policy": policy.name,
            "tok/L fwd": c.generated / c.large_forwards,
            "S fwd/tok": c.small_forwards / c.generated,
            "S rows/tok": c.small_rows / c.generated,
            "verified/L fwd": c.verified / c.large_forwards,
            "fallback": c.fallbacks / c.large_forwards,
        }
        if policies is not POLICIES:
            row["cand/unsure round"] = c.candidates / max(c.fallbacks, 1)
        for machine, costs in COSTS.items():
            # a rule priced for one machine's costs is projected on that machine only
            row[f"speedup {machine}"] = (
                "-" if policy.machine not in (None, machine) else 1 / c.time_per_token(costs)
            )
        rows.append(row)
    return rows


def unsure_positions(traces: list[Trace], threshold: float = THRESHOLD) -> list[tuple[list[float], int]]:
    """``(top probabilities, rank of the large model's token)`` at every position of the texts where the small
    model is unsure (reached by a round or not: the text's tokens there come free after a wrong or checked one)."""
    return [
        (tr.probs[t], tr.top[t].index(tr.y[t]) + 1 if tr.y[t] in tr.top[t] else 0)
        for tr in traces
        for t in range(tr.n_end)
        if tr.probs[t][0] < threshold
    ]


def calibration(records: list[tuple[list[float], int]]) -> tuple[list[dict], list[dict]]:
    """At unsure positions on the path: per rank j, mean q_j and how often the large model's token is the
    j-th; per bin of q_j, mean q_j and that hit rate, all ranks pooled and ranks >= 2 only."""
    n = max(len(records), 1)
    by_rank = [{"rank": j + 1, "n": len(records), "mean q": sum(p[j] for p, _ in records) / n,
                "hit rate": sum(rank == j + 1 for _, rank in records) / n} for j in range(K_MAX)]  # fmt: skip
    by_rank.append({"rank": "none of 8", "n": len(records), "mean q": sum(1 - sum(p) for p, _ in records) / n,
                    "hit rate": sum(rank == 0 for _, rank in records) / n})  # fmt: skip
    by_bin = []
    for lo, hi in zip(Q_BINS, Q_BINS[1:], strict=False):
        row = {"q bin": f"[{lo:g}, {hi:g})"}
        for label, first in (("all", 0), ("rank>=2", 1)):
            cells = [
                (p[j], rank == j + 1) for p, rank in records for j in range(first, K_MAX) if lo <= p[j] < hi
            ]
            row[f"n {label}"] = len(cells)
            row[f"mean q {label}"] = sum(q for q, _ in cells) / len(cells) if cells else float("nan")
            row[f"hit {label}"] = sum(hit for _, hit in cells) / len(cells) if cells else float("nan")
        by_bin.append(row)
    return by_rank, by_bin


def markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|---|" + "---:|" * (len(keys) - 1)]
    for row in rows:
        cells = [row[k] if isinstance(row[k], str) else str(row[k]) if isinstance(row[k], int)
                 else f"{row[k]:.3f}" if k != "tok/L fwd" else f"{row[k]:.2f}" for k in keys]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a bench config (configs/variants/qwen-coder-*.yaml)")
    parser.add_argument("--limit", type=int, help="first N of the config's examples")
    parser.add_argument(
        "--skip", type=int, help="start at this example instead of the config's skip (--limit N: N)"
    )
    parser.add_argument("--dtype", default="auto", help="auto (bf16 where native) | float32 | bfloat16")
    parser.add_argument(
        "--validate", action="store_true", help="also run the real loop (plain, +c3) and compare"
    )
    parser.add_argument("--json", help="write the counts and the table here")
    parser.add_argument(
        "--candidates", action="store_true",
        help="also: the small model's calibration at unsure positions, and which candidates to check (fixed K, "
        "q_j >= tau, q_j * v >= the extra cost of one more verified token)",
    )  # fmt: skip
    parser.add_argument(
        "--traces", help="a JSON file of the traces: read when it exists (no model is loaded), else written"
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    dtype, eos_ids, traces = load_traces(args)
    policies = (
        POLICIES + tuple(p for p in CANDIDATE_POLICIES if p not in POLICIES) if args.candidates else POLICIES
    )
    counts = {p.name: Counts() for p in policies}
    validation = []
    for index, tr, real in traces:
        for policy in policies:
            counts[policy.name].add(simulate(tr, policy, eos_ids))
        for name, (stats, same_output) in real.items():
            simulated = simulate(tr, next(p for p in POLICIES if p.name == name), eos_ids).stats()
            diff = {key: (stats[key], value) for key, value in simulated.items() if stats[key] != value}
            validation.append({"example": index, "policy": name, "same_output": same_output,
                               "real_vs_simulated": diff})  # fmt: skip

    rows = summarize(counts)
    print(f"{args.config}: {len(traces)} examples, {dtype}, fallback {THRESHOLD}, cap {CAP}, lossless")
    print(markdown(rows))
    result = {"config": args.config, "dtype": str(dtype), "n_examples": len(traces), "table": rows}
    if args.candidates:
        result |= report_candidates(counts, traces)
    if args.validate:
        report_validation(validation)
    if args.json:
        result |= {
            "counts": {name: c.stats() | {"small_rows": c.small_rows, "verified": c.verified,
                                          "candidates": c.candidates} for name, c in counts.items()},
            "validation": validation,
        }  # fmt: skip
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


def load_traces(args: argparse.Namespace) -> tuple:
    """``(dtype, EOS ids, [(example index, trace, real stats)])``: from ``--traces`` when that file exists, else from
    running the models (stored in ``--traces`` when given)."""
    if args.traces and Path(args.traces).exists():
        if args.validate:
            raise SystemExit("--validate runs the models: give --traces a file that does not exist yet")
        data = json.loads(Path(args.traces).read_text(encoding="utf-8"))
        traces = [(index, Trace.from_json(tr), {}) for index, tr in data["traces"]]
        return data["dtype"], set(data["eos_ids"]), traces[: args.limit] if args.limit is not None else traces
    dtype, eos_ids, traces = run_models(args)
    if args.traces:
        Path(args.traces).write_text(json.dumps({
            "config": args.config, "dtype": str(dtype), "eos_ids": sorted(eos_ids),
            "traces": [(index, tr.to_json()) for index, tr, _ in traces],
        }) + "\n", encoding="utf-8")  # fmt: skip
    return dtype, eos_ids, traces


def report_candidates(counts: dict, traces: list) -> dict:
    """Print the candidate policies' table and the small model's calibration at unsure positions; return them."""
    result = {"candidates": summarize(counts, CANDIDATE_POLICIES)}
    print(f"\ncandidates at an unsure position (at most {K_MAX}; 'cand/unsure round': tokens checked there)")
    print(markdown(result["candidates"]))
    samples = {
        "rounds": ("the rounds of plain that end unsure on the path", counts[Policy(1).name].unsure_on_path),
        "positions": ("every position of the text where the small model is unsure", unsure_positions(
            [tr for _, tr, _ in traces])),
    }  # fmt: skip
    for key, (label, records) in samples.items():
        by_rank, by_bin = calibration(records)
        print(f"\ncalibration at {label} ({len(records)}): q_j against how often the large model's token "
              "is the j-th")  # fmt: skip
        print(markdown(by_rank))
        print(markdown(by_bin))
        result[f"calibration_{key}"] = {"by_rank": by_rank, "by_bin": by_bin, "records": records}
    return result


def report_validation(validation: list[dict]) -> None:
    bad = [v for v in validation if v["real_vs_simulated"] or not v["same_output"]]
    print(f"validation: {len(validation) - len(bad)} of {len(validation)} (example, policy) pairs match exactly")
    for v in bad:
        print(f"  example {v['example']} {v['policy']}: same output {v['same_output']}, "
              f"(real, simulated) {v['real_vs_simulated']}")  # fmt: skip


def run_models(args: argparse.Namespace) -> tuple[torch.dtype, set[int], list[tuple[int, Trace, dict]]]:
    """Load the config's pair and trace each example: ``(dtype, EOS ids, [(example index, trace, real stats)])``."""
    import bild
    from bild.bench.bench_config import load_config
    from bild.bench.loading import load_pair, make_batches
    from bild.bench.machine import resolve_device, resolve_dtype
    from bild.bench.methods import stop_string_criteria
    from bild.bench.tasks import get_task
    from bild.drafters import compress_drafter
    from bild.integration import vocab_size

    config = load_config(args.config)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    task = get_task(config.task)
    if args.skip is None:
        skip, n = (
            config.skip,
            config.limit if args.limit is None else min(args.limit, config.limit or args.limit),
        )
    else:  # other examples than the config's
        skip, n = args.skip, args.limit or config.limit
    examples = task.load(config.data, skip + n)[skip:]
    device = resolve_device(config.device)
    dtype = resolve_dtype(args.dtype, device)
    # stock kernels (fit_kernels and dense prefill would time layers); the drafter int4 as in the config,
    # without dense prefill: the teacher-forced forward then runs the same quantized kernels as drafting
    pair = load_pair(config.large, config.small, device, dtype, attach=False, kernels="stock")
    quantization = (
        next(iter(config.drafters.values()), {}).get("quantization", "int4") if config.drafters else "int4"
    )
    compress_drafter(pair.small, quantization=quantization, dense_prefill=False)
    bild.attach(pair.large, pair.small)
    prompts = [task.prompt(ex, pair.tokenizer, chat=config.chat, prefix=config.prefix) for ex in examples]
    batches = make_batches(prompts, pair, 1, device, chat=config.chat)
    criteria = stop_string_criteria(pair, config.stop_strings)
    eos_ids = set(pair.eos_token_ids)
    vocab = min(vocab_size(pair.large), vocab_size(pair.small))
    traces = []
    for batch in tqdm(batches, desc=Path(args.config).stem, unit="example", file=sys.stderr):
        tr, real = example_trace(pair.large, pair.small, batch.inputs["input_ids"], config.max_new_tokens, eos_ids,
                                 pair.pad_token_id, vocab, criteria, args.validate)  # fmt: skip
        traces.append((batch.indices[0], tr, real))
    return dtype, eos_ids, traces


if __name__ == "__main__":
    sys.exit(main())
